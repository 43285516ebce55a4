"""Teacher-generated text-to-image training sets: latents a PixArt teacher samples for a list of prompts.

The grafting paper distils and fine-tunes its PixArt-Sigma student on image-text pairs its teacher generated (12k,
8k of them for stage 1). Each prompt's caption embeddings are sampled `per_prompt` times with DPM-Solver++ (PixArt-
Sigma's 20 steps, cfg 4.5 against the learned null caption) and written as a latent cache in the shard format of
graft_jax.data.latents, each row carrying its caption embeddings (float16, as PixArt's extracted features) and mask;
y is the prompt's index in the file. Captions are stored cut to the longest real caption of the set: the tokens
past it are padding for every row, and the trainers pad back to the model's caption length (exact, see
graft_jax.train.conditioning.pad_caption).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from graft_jax.data.latents import DataError, ShardWriter, reuse_cache, tree_digest
from graft_jax.data.synthetic import sampling_mesh
from graft_jax.models.vae import SDXL_SCALING_FACTOR
from graft_jax.samplers.pixart import SIGMA_CFG, SIGMA_STEPS, make_pixart_sampler, sample_latents

KIND = "synthetic_pixart"
VAE_DOWNSAMPLING = 8  # PixArt-Sigma's latents come from the SDXL VAE


@dataclasses.dataclass(frozen=True)
class PixArtSynthesisSettings:
  per_prompt: int = 1
  steps: int = SIGMA_STEPS
  cfg_scale: float = SIGMA_CFG
  seed: int = 0
  batch_size: int = 8
  shard_size: int = 1024
  scale: float = SDXL_SCALING_FACTOR  # the teacher's latent scaling, recorded so the latents can be decoded
  vae: str | None = None  # identity of the teacher's VAE, when known
  negative_prompt: str | None = None  # guidance against this prompt's encoding; None: the learned null caption
  compute_dtype: str = "bfloat16"  # the teacher's, as PixArt's half-precision inference


def used_length(mask: np.ndarray) -> int:
  """Tokens up to the last real one of any row (at least 1)."""
  real = np.flatnonzero(np.asarray(mask).any(axis=0))
  return int(real[-1]) + 1 if len(real) else 1


def text_digest(caption: np.ndarray, mask: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in (np.ascontiguousarray(caption, np.float32), np.ascontiguousarray(mask, bool)):
    h.update(f"{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
  return "sha256:" + h.hexdigest()[:16]


def synthesize_pixart(model, params: Any, caption: np.ndarray, mask: np.ndarray, prompts: Sequence[str],
                      out: str | os.PathLike, settings: PixArtSynthesisSettings, sources: dict | None = None,
                      mesh=None, negative: tuple[np.ndarray, np.ndarray] | None = None) -> pathlib.Path:
  """Samples `per_prompt` latents for every row of (caption, mask) (the embeddings of `prompts`) into the cache
  `out`. Rows run prompt 0 `per_prompt` times, then prompt 1, ...; shard i is sampled with fold_in(key(seed), i),
  so an interrupted run continues at its first missing shard and gives the same set. `negative`: the encoding of
  settings.negative_prompt (see samplers.pixart.make_pixart_sampler)."""
  if (negative is None) != (settings.negative_prompt is None):
    raise ValueError("a negative prompt and its encoding come together (settings.negative_prompt, negative).")
  if settings.per_prompt < 1 or settings.steps < 1:
    raise DataError(f"per_prompt ({settings.per_prompt}) and steps ({settings.steps}) must be at least 1.")
  if len(caption) != len(prompts) or len(mask) != len(prompts):
    raise DataError(f"{len(prompts)} prompts but {len(caption)} caption embeddings and {len(mask)} masks.")
  mesh = sampling_mesh(mesh, settings.batch_size)
  length = used_length(mask)
  caption, mask = np.asarray(caption, np.float32)[:, :length], np.asarray(mask, bool)[:, :length]
  meta = _metadata(model.config, params, settings, caption, mask, len(prompts), sources)
  if reuse_cache(out, {k: meta[k] for k in ("generator", "per_prompt", "scale", "vae")}):
    return pathlib.Path(out).absolute()
  rows = np.repeat(np.arange(len(prompts), dtype=np.int32), settings.per_prompt)
  writer = ShardWriter(out, meta)
  run = make_pixart_sampler(model, settings.steps, settings.cfg_scale, compute_dtype=settings.compute_dtype)
  key = jax.random.key(settings.seed)
  return writer.fill(meta, rows, settings.shard_size,
                     lambda index, y: sample_latents(run, params, caption[y], mask[y], jax.random.fold_in(key, index),
                                                     settings.batch_size, mesh, negative=negative),
                     lambda start, y: [f"{settings.seed}-{start + i}-prompt{p}" for i, p in enumerate(y)],
                     lambda y: {"caption": caption[y].astype(np.float16), "mask": mask[y]})


def _metadata(config, params: Any, settings: PixArtSynthesisSettings, caption: np.ndarray, mask: np.ndarray,
              num_prompts: int, sources: dict | None) -> dict[str, Any]:
  generator = {"model": config.to_json(), "teacher": tree_digest(config.to_json(), params),
               "text": text_digest(caption, mask), "sampler": "dpm_solver++2",
               **{k: v for k, v in dataclasses.asdict(settings).items() if k not in ("per_prompt", "vae", "scale")}}
  return {"kind": KIND, "resolution": config.input_size * VAE_DOWNSAMPLING, "num_classes": 0,
          "latent_shape": [config.input_size, config.input_size, config.in_channels], "scale": settings.scale,
          "vae": {"id": settings.vae} if settings.vae else None, "source": sources or {},
          "per_prompt": settings.per_prompt, "prompts": num_prompts, "seed": settings.seed,
          "caption_shape": list(caption.shape[1:]), "generator": generator}


def synthesize_from_files(teacher_dir: str | os.PathLike, prompt_file: str | os.PathLike, text: Any,
                          out: str | os.PathLike, settings: PixArtSynthesisSettings,
                          embeddings: str = "") -> pathlib.Path:
  """`synthesize_pixart` with the teacher a converted PixArt folder and the prompts a file (embedded as
  graft_jax.prompts.embed_prompts does with the config block `text`)."""
  from graft_jax import checkpoints, prompts as prompt_files  # orbax takes seconds to import
  from graft_jax.models.pixart import PixArt
  prompt_list = prompt_files.read_prompts(prompt_file)
  prompt_files.check_text(text, embeddings)
  try:
    model, params = checkpoints.load(teacher_dir)
  except FileNotFoundError as e:
    raise DataError(str(e)) from None
  if not isinstance(model, PixArt):
    raise DataError(f"{teacher_dir} holds a {type(model).__name__}, not a PixArt model.")
  caption, mask = prompt_files.embed_prompts(text, prompt_list, model.config.caption_length,
                                             model.config.caption_channels, embeddings)
  negative_prompt, negative, note = prompt_files.encode_negative(
      text, params, settings.negative_prompt, model.config.caption_length, model.config.caption_channels)
  if note:
    logging.info("synthesize-pixart: %s", note)
  settings = dataclasses.replace(settings, negative_prompt=negative_prompt)
  sources = {"teacher": str(pathlib.Path(teacher_dir).absolute()), "prompts": str(pathlib.Path(prompt_file).absolute()),
             "text": prompt_files.describe(text, embeddings)}
  return synthesize_pixart(model, params, caption, mask, prompt_list, out, settings, sources, negative=negative)
