"""The main job: the stages a config lists (distill -> finetune -> sample), in order, each recorded as done in the
workdir so a rerun resumes at the first unfinished one (and inside it, at its last checkpoint).

The teacher is a DiT (class labels) or a PixArt model (captions: model.kind "pixart", or a converted PixArt folder);
PixArt experiments add the stage "synthesize" (the teacher-generated training set, WORKDIR/synthetic by default)
and sample from prompts (graft_jax.pixart_stages: samples/NNNN.png, samples.png, samples_latents.npz).

Workdir layout: config.json; graft_summary.md/.json; stage1/ (scions, results.json); student/ (the fine-tuned
model, EMA weights, loadable with graft_jax.checkpoints.load); samples.png, samples.npz; stages/NAME.json markers;
distill/ and finetune/ (checkpoints and metrics).
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
import numpy as np

from graft_jax import checkpoints, graft, hosts
from graft_jax.data.arrays import host_iterator
from graft_jax.data.images import save_grid, to_uint8
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.config import PixArtConfig, check_compute_dtype, pixart_config
from graft_jax.models.pixart import PixArt, init_params as pixart_init_params
from graft_jax.sample import (check_config as check_sample, generate, make_sampler, sample_labels, save_npz,
                              shard_over)
from graft_jax.train import conditioning, distill, finetune, partition


class UserError(Exception):
  """A problem the user can fix (missing file, bad config); main prints it as one sentence."""


def is_pixart(config) -> bool:
  """Whether the config describes a PixArt experiment (model.kind "pixart"): its inputs are checked up front."""
  return config.model.get("kind", "dit") == "pixart"


def teacher_config(config):
  """The teacher's model config: the converted checkpoint's, else `model.preset` with `model.overrides`; then
  `model.remat`, when set, since recomputation is a training choice, not part of the weights."""
  if config.model.checkpoint:
    try:
      cfg = checkpoints.load_config(config.model.checkpoint)
    except FileNotFoundError as e:
      raise UserError(str(e)) from None
  elif is_pixart(config):
    cfg = pixart_config(config.model.image_size, **config.model.overrides)
  else:
    cfg = dit_config(config.model.preset, **config.model.overrides)
  remat = config.model.get("remat")
  if remat is None:
    return cfg
  try:
    return cfg.replace(remat=remat)
  except ValueError as e:
    raise UserError(str(e)) from None


def build_model(model_config):
  """The Flax module for a model config: PixArt for a PixArtConfig, DiT otherwise."""
  return PixArt(model_config) if isinstance(model_config, PixArtConfig) else DiT(model_config)


def load_teacher(config):
  """(model, params): the converted checkpoint `model.checkpoint`, or a fresh `model.preset` when it is empty."""
  cfg = teacher_config(config)  # a missing checkpoint fails here with the conversion command
  if config.model.checkpoint:
    return build_model(cfg), checkpoints.load_params(config.model.checkpoint)
  init = pixart_init_params if isinstance(cfg, PixArtConfig) else init_params
  params = init(cfg, jax.random.key(config.seed))
  noise = float(config.model.get("init_noise", 0.0))
  if noise > 0:
    # A fresh model's zero-initialised output layer hides every block from the loss, so LoRA factors on the blocks
    # would get no gradient at all; tiny test runs add noise to every weight to make the teacher non-degenerate.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(config.seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [p + noise * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
  return build_model(cfg), params


def data_path(config, which: str, workdir: pathlib.Path | None = None) -> pathlib.Path:
  """config.data.<which>_path ("distill", "finetune" or "synthetic"); an empty one means the set the synthesize stage
  writes: data.synthetic_path, by default WORKDIR/synthetic."""
  given = config.data.get(f"{which}_path", "")
  if given:
    return pathlib.Path(given)
  if which != "synthetic":
    return data_path(config, "synthetic", workdir)
  if workdir is None:
    raise UserError(f"data.{which}_path is empty and there is no workdir to find the synthesized set in.")
  return pathlib.Path(workdir) / "synthetic"


def load_arrays(config, which: str, keys: tuple[str, ...] = conditioning.DIT_KEYS,
                workdir: pathlib.Path | None = None) -> dict[str, np.ndarray]:
  """The arrays `keys` ({"x", "y"}; a PixArt teacher's {"x", "caption", "mask"}) for stage `which` ("distill" or
  "finetune") from config.data: "demo" (the embedded digits), "latents" (a shard folder of graft_jax.data.latents)
  or "npz" (one file with arrays x and y). data.<which>_rows > 0 keeps only the first rows (the paper's PixArt
  stage 1 uses 8k of its 12k synthetic pairs)."""
  arrays = _load_arrays(config, which, keys, workdir)
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise UserError(f"{data_path(config, which, workdir)} holds no {' or '.join(missing)}: a PixArt teacher needs "
                    f"a set with caption embeddings (the synthesize stage or `python -m graft_jax.data.cli "
                    f"synthesize-pixart`).")
  rows = int(config.data.get(f"{which}_rows", 0) or 0)
  return {k: arrays[k][:rows] if rows > 0 else arrays[k] for k in keys}


def _load_arrays(config, which: str, keys: tuple[str, ...], workdir) -> dict[str, np.ndarray]:
  source = config.data.source
  if source == "demo":
    from graft_jax.data.demo import load_demo
    x, y = load_demo("train", size=config.data.resolution)
    return {"x": x, "y": y}
  if source not in ("latents", "npz"):
    raise UserError(f"data.source must be 'demo', 'latents' or 'npz', got {source!r}.")
  path = data_path(config, which, workdir)
  if not path.exists():
    make = "synthesize-pixart" if "caption" in keys else "encode"
    raise UserError(f"{path} does not exist; make it with `python -m graft_jax.data.cli {make} ...`."
                    if source == "latents" else
                    f"{path} does not exist; it should hold arrays x (N, H, W, C) latents and y (N,) labels.")
  if source == "latents":
    from graft_jax.data.latents import DataError, load_latents
    try:
      return load_latents(path, resolution=config.data.get("resolution"))
    except DataError as e:
      raise UserError(str(e)) from None
  with np.load(path) as f:
    return {"x": f["x"].astype(np.float32), "y": f["y"].astype(np.int32)}


def plan(config, teacher_config):
  try:
    return graft.parse_plan(config.graft, teacher_config)
  except graft.PlanError as e:
    raise UserError(str(e)) from None


def stage_distill(config, workdir: pathlib.Path) -> dict:
  teacher, teacher_params = load_teacher(config)
  edits = plan(config, teacher.config)
  student, student_params = graft.graft(teacher.config, teacher_params, edits, jax.random.key(config.seed))
  arrays = load_arrays(config, "distill", conditioning.batch_keys(teacher), workdir)
  held = config.data.heldout
  if held >= len(arrays["x"]):
    raise UserError(f"data.heldout ({held}) leaves no training data out of {len(arrays['x'])} samples.")
  train = host_iterator({k: v[held:] for k, v in arrays.items()}, config.distill.batch_size, config.seed)
  heldout = [{k: v[i:i + config.distill.batch_size] for k, v in arrays.items()}
             for i in range(0, held - config.distill.batch_size + 1, config.distill.batch_size)]
  c = distill.resolve_schedule(config.distill, train.batches_per_epoch)
  scions, errors = distill.run_distill(c, teacher, teacher_params, student, student_params, graft.sites(edits),
                                       train, heldout, workdir / "distill")
  if hosts.is_writer():
    distill.save_scions(workdir / "stage1", scions, {"heldout_relative_error": errors, "steps": c.steps})
  return {"heldout_relative_error": errors, "steps": c.steps}


def student_from_stage1(config, workdir: pathlib.Path, teacher, teacher_params):
  """The grafted student: scions from stage 1 when it ran here, otherwise the plan's own init."""
  edits = plan(config, teacher.config)
  if (workdir / "stage1").exists():
    edits = tuple(graft.Edit(e.site, e.layers, e.op, str(workdir / "stage1")) for e in edits)
  return graft.graft(teacher.config, teacher_params, edits, jax.random.key(config.seed))


def stage_finetune(config, workdir: pathlib.Path) -> dict:
  teacher, teacher_params = load_teacher(config)
  student, params = student_from_stage1(config, workdir, teacher, teacher_params)
  arrays = load_arrays(config, "finetune", conditioning.batch_keys(teacher), workdir)
  data = host_iterator(arrays, config.finetune.batch_size, config.seed + 1)
  out = finetune.run_finetune(config.finetune, build_model(student), params, data, workdir,
                              teacher=(teacher, teacher_params) if "teacher" in config.finetune.loss else None)
  ema = hosts.fetch(out["ema"])  # a collective: every process takes part, one writes
  if hosts.is_writer():
    shutil.rmtree(workdir / "student", ignore_errors=True)  # a run stopped after the export but before its marker
    checkpoints.save(workdir / "student", student, ema)
  return {"steps": out["step"], "student": "student"}


def sample_images(model, params, s, progress_name: str = "sample"):
  """(uint8 images, labels): `s.per_class` samples of every class with the sampler settings in `s`."""
  labels = sample_labels(model.config.num_classes, s.per_class)
  mesh = partition.make_mesh({"data": -1}, jax.local_devices())
  batch_size = -(-s.batch_size // mesh.size) * mesh.size  # a whole number of rows per device; padding is dropped
  sampler = make_sampler(model, s.sampler, s.steps, s.cfg_scale, s.guided_channels,
                         compute_dtype=s.get("compute_dtype", "float32"))
  run, params = shard_over(sampler, params, mesh)
  start = time.time()

  def progress(done, total):
    rate = done / (time.time() - start)
    print(f"{progress_name}: {done}/{total} images, {rate:.1f} img/s, ETA {(total - done) / rate:.0f} s", flush=True)

  return to_uint8(generate(run, params, labels, jax.random.key(s.seed), batch_size, progress)), labels


def stage_sample(config, workdir: pathlib.Path) -> dict:
  model, params = checkpoints.load(workdir / "student") if (workdir / "student").exists() else load_teacher(config)
  if isinstance(model, PixArt):  # captions, not classes: prompts in, PNGs out
    from graft_jax import pixart_stages
    return pixart_stages.sample(config, workdir, model, params)
  images, labels = sample_images(model, params, config.sample)
  per_row = config.sample.per_class
  if hosts.is_writer():
    save_grid(images, workdir / "samples.png", nrow=per_row if 1 < per_row <= 16 else 10)
    save_npz(images, labels, workdir / "samples.npz")
  return {"images": int(len(images)), "grid": "samples.png", "npz": "samples.npz"}


STAGES = {"distill": stage_distill, "finetune": stage_finetune, "sample": stage_sample}


def stage_registry() -> dict:
  """Every stage by name: the grafting stages here, the demo's own (teacher, compare, report) and the evaluation
  jobs (evaluate, benchmark, analyze)."""
  from graft_jax import demo, pixart_stages  # these build on this module
  from graft_jax.evaluation import analysis, benchmark, job  # so do these
  return {**STAGES, **demo.STAGES, **benchmark.STAGES, **analysis.STAGES, **job.STAGES, **pixart_stages.STAGES}


def check_sections(config) -> None:
  """The settings of every listed stage that trains or samples, before the first stage runs: a typo in the last
  stage's section fails at once, not after hours of the stages before it. One sentence naming the section."""
  trainers = {"distill": distill.check_config, "finetune": finetune.check_config,
              "teacher": finetune.check_config}  # the demo's teacher trains as a fine-tuning run does
  for name in config.stages:
    section = config.get(name)
    if section is None:
      continue
    try:
      if name in trainers:
        trainers[name](section)
        partition.check_batch(partition.make_mesh(section.mesh), section.batch_size)
      elif name == "sample" and not is_pixart(config):
        check_sample(section)
      elif name in ("sample", "synthesize"):  # PixArt's: prompts in, images out; pixart_stages checks its files
        check_compute_dtype(section.get("compute_dtype", "float32"))
    except ValueError as e:
      raise UserError(f"{name}: {e}") from None


def run(config, workdir) -> None:
  workdir = pathlib.Path(workdir)
  stages = stage_registry()
  unknown = [s for s in config.stages if s not in stages]
  if unknown:
    raise UserError(f"unknown stage(s) {unknown}; known stages are {sorted(stages)}.")
  check_sections(config)
  # With several processes only process 0 writes files (see graft_jax.hosts); all of them run every stage.
  writer = hosts.is_writer()
  if config.graft:  # a bad plan or a missing teacher fails here, before any weight is loaded or step taken
    teacher = teacher_config(config)
    summary = graft.summary(teacher, graft.student_config(teacher, plan(config, teacher)))
    if writer:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "graft_summary.json").write_text(json.dumps(summary, indent=1))
      (workdir / "graft_summary.md").write_text(graft.format_summary(summary) + "\n")
      print(graft.format_summary(summary).splitlines()[-1], flush=True)
  if is_pixart(config):
    from graft_jax import pixart_stages
    pixart_stages.check_inputs(config, workdir)  # a missing T5, VAE or prompt file fails before any stage runs
  if writer:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  for name in config.stages:
    marker = workdir / "stages" / f"{name}.json"
    # Every process must reach the same decision, so the marker is read only after process 0 could have written it.
    hosts.barrier(f"before {workdir}/{name}")
    if marker.exists():
      print(f"{name}: already done ({marker})")
      continue
    print(f"{name}: starting", flush=True)
    result = stages[name](config, workdir)
    if writer:
      marker.parent.mkdir(exist_ok=True)
      marker.write_text(json.dumps(result, indent=1, default=lambda o: np.asarray(o).tolist()))
    print(f"{name}: done -> {marker}", flush=True)
  hosts.barrier(f"after {workdir}")
