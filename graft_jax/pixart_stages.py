"""PixArt's stages in the main job: "synthesize" (the teacher-generated training set) and the sample stage of a PixArt
model (prompts in, PNGs out). configs/pixart_sigma_hyena_x.py runs synthesize -> distill -> finetune -> sample.

Sampling is PixArt-Sigma's: DPM-Solver++ (20 steps), cfg 4.5 against the learned null caption, then the VAE decodes
(vae.path, a diffusers AutoencoderKL folder or weights file; vae.scale 0.13025 for the SDXL VAE). Without a VAE
the latents are kept and the run says plainly that no PNGs were written.
"""
from __future__ import annotations

import pathlib
import time

import jax
import numpy as np
from PIL import Image

from graft_jax import hosts, pipeline, prompts
from graft_jax.data.images import save_grid, to_uint8
from graft_jax.data.latents import DataError, read_metadata
from graft_jax.files import write_atomic
from graft_jax.models.pixart import PixArt
from graft_jax.samplers.pixart import make_pixart_sampler, sample_latents
from graft_jax.train import partition

LATENTS = "samples_latents.npz"


def check_inputs(config, workdir: pathlib.Path) -> None:
  """The teacher, the text encoder (or embeddings), the prompt files and the VAE of the stages still to run, checked
  before any of them starts: the first missing one is a UserError of one sentence."""
  pipeline.teacher_config(config)  # a missing teacher folder names the conversion command
  todo = [s for s in config.stages if not (pathlib.Path(workdir) / "stages" / f"{s}.json").exists()]
  try:
    if "synthesize" in todo:
      prompts.read_prompts(config.data.prompts, "prompt file (data.prompts)")
      prompts.check_text(config.text, config.data.get("embeddings", ""))
    if "sample" in todo:
      prompts.read_prompts(config.sample.prompts, "sample prompt file (sample.prompts)")
      prompts.check_text(config.text, config.sample.get("embeddings", ""))
      if config.vae.path and not pathlib.Path(config.vae.path).exists():
        raise DataError(f"the VAE {config.vae.path} does not exist; give a diffusers AutoencoderKL folder or weights "
                        f"file (vae.path), or leave vae.path empty to keep the latents only.")
  except DataError as e:
    raise pipeline.UserError(str(e)) from None


def _teacher(config):
  model, params = pipeline.load_teacher(config)
  if not isinstance(model, PixArt):
    raise pipeline.UserError(f"this stage needs a PixArt teacher, but {config.model.checkpoint or 'the config'} "
                             f"describes a {type(model).__name__}.")
  return model, params


def negative_caption(config, block, params, model_config, stage: str) -> tuple[str | None, tuple | None]:
  """(negative prompt, its (caption, mask)) for guidance, or (None, None) for the learned null caption, from
  `block.negative_prompt` (see graft_jax.prompts.encode_negative)."""
  try:
    text, negative, note = prompts.encode_negative(config.text, params, block.get("negative_prompt"),
                                                   model_config.caption_length, model_config.caption_channels)
  except DataError as e:
    raise pipeline.UserError(f"the negative prompt cannot be encoded: {e}") from None
  if note:
    print(f"{stage}: {note}", flush=True)
  return text, negative


def embed(config, prompt_file: str, embeddings: str, model_config, what: str):
  """(prompts, caption embeddings, mask) for a prompt file, with DataError turned into a UserError."""
  try:
    prompt_list = prompts.read_prompts(prompt_file, what)
    caption, mask = prompts.embed_prompts(config.text, prompt_list, model_config.caption_length,
                                          model_config.caption_channels, embeddings)
  except DataError as e:
    raise pipeline.UserError(str(e)) from None
  return prompt_list, caption, mask


def stage_synthesize(config, workdir: pathlib.Path) -> dict:
  """The teacher's samples for data.prompts (data.synthesize settings) into data.synthetic_path."""
  from graft_jax.data import synthetic_pixart
  model, params = _teacher(config)
  negative_prompt, negative = negative_caption(config, config.synthesize, params, model.config, "synthesize")
  prompt_list, caption, mask = embed(config, config.data.prompts, config.data.get("embeddings", ""), model.config,
                                     "prompt file (data.prompts)")
  s = config.synthesize
  settings = synthetic_pixart.PixArtSynthesisSettings(
      per_prompt=s.per_prompt, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed, batch_size=s.batch_size,
      shard_size=s.shard_size, scale=config.vae.scale,  # latents in the teacher's own space: no VAE identity
      negative_prompt=negative_prompt, compute_dtype=s.get("compute_dtype", "bfloat16"))
  out = pipeline.data_path(config, "synthetic", workdir)
  sources = {"teacher": config.model.checkpoint or "fresh",
             "prompts": str(pathlib.Path(config.data.prompts).absolute()),
             "text": prompts.describe(config.text, config.data.get("embeddings", ""))}
  # One writer: the sampling mesh is this process's devices, so other processes have nothing to join.
  if hosts.is_writer():
    try:
      synthetic_pixart.synthesize_pixart(model, params, caption, mask, prompt_list, out, settings, sources,
                                         negative=negative)
    except DataError as e:
      raise pipeline.UserError(str(e)) from None
  hosts.barrier(f"synthesized {out}")
  return {"path": str(out), "rows": read_metadata(out)["count"], "prompts": len(prompt_list)}


def sample(config, workdir: pathlib.Path, model, params) -> dict:
  """Latents for every prompt of sample.prompts (sample.per_prompt each), decoded to PNGs when a VAE is given."""
  s = config.sample
  _, negative = negative_caption(config, s, params, model.config, "sample")
  prompt_list, caption, mask = embed(config, s.prompts, s.get("embeddings", ""), model.config,
                                     "sample prompt file (sample.prompts)")
  rows = np.repeat(np.arange(len(prompt_list)), int(s.get("per_prompt", 1)))
  mesh = partition.make_mesh({"data": -1}, jax.local_devices())
  batch_size = -(-s.batch_size // mesh.size) * mesh.size  # a whole number of rows per device; padding is dropped
  run = make_pixart_sampler(model, s.steps, s.cfg_scale, compute_dtype=s.get("compute_dtype", "bfloat16"))
  start = time.time()

  def progress(done, total):
    print(f"sample: {done}/{total} latents, {done / (time.time() - start):.2f}/s", flush=True)

  latents = sample_latents(run, params, caption[rows], mask[rows], jax.random.key(s.seed), batch_size, mesh, progress,
                           negative)
  texts = [prompt_list[r] for r in rows]
  if not hosts.is_writer():
    return {}
  write_atomic(workdir / LATENTS, lambda f: np.savez(f, latents=latents, prompts=np.asarray(texts, dtype=str)))
  if not config.vae.path:
    note = (f"no VAE given (vae.path is empty), so no PNGs were written; the {len(latents)} latents are in "
            f"{workdir / LATENTS}: set vae.path to a diffusers AutoencoderKL folder (the SDXL VAE for PixArt-Sigma) "
            f"to decode them.")
    print(f"sample: {note}", flush=True)
    return {"images": 0, "latents": LATENTS, "vae": None, "note": note}
  images = decode(config, latents)
  folder = workdir / "samples"
  for i, image in enumerate(images):
    write_atomic(folder / f"{i:04d}.png", lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))
  (folder / "prompts.txt").write_text("".join(f"{i:04d}.png\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
  save_grid(images, workdir / "samples.png", nrow=min(len(images), 8))
  print(f"sample: {len(images)} PNGs in {folder}, grid {workdir / 'samples.png'}", flush=True)
  return {"images": len(images), "folder": "samples", "grid": "samples.png", "latents": LATENTS}


def decode(config, latents: np.ndarray) -> np.ndarray:
  """uint8 RGB images from latents, one at a time (one compiled program; a 1024 px decode is large)."""
  from graft_jax.data.imagenet import load_vae
  try:
    vae, params = load_vae(config.vae.path, config.vae.get("groups"))
  except DataError as e:
    raise pipeline.UserError(str(e)) from None
  run = jax.jit(lambda p, z: vae.decode_latents(p, z, config.vae.scale))
  return np.concatenate([to_uint8(np.asarray(run(params, z[None]))) for z in latents]) if len(latents) else \
      np.zeros((0, 0, 0, 3), np.uint8)


STAGES = {"synthesize": stage_synthesize}
