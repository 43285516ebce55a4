"""The main job: the stages a config lists, in order, each recorded as done in the workdir so a rerun resumes."""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from graft_jax import checkpoints
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.sample import generate, make_sampler, sample_labels, save_grid, save_npz, to_uint8


class UserError(Exception):
  """A problem the user can fix (missing file, bad config); main prints it as one sentence."""


def load_model(config):
  """(model, params): a converted checkpoint when `model.checkpoint` is set, else a fresh model of `model.preset`."""
  if config.model.checkpoint:
    try:
      return checkpoints.load(config.model.checkpoint)
    except FileNotFoundError as e:
      raise UserError(str(e)) from None
  cfg = dit_config(config.model.preset, **config.model.overrides)
  return DiT(cfg), init_params(cfg, jax.random.key(config.seed))


def stage_sample(config, workdir: pathlib.Path, state: dict) -> dict:
  model, params = state.get("model") or load_model(config)
  s = config.sample
  labels = sample_labels(model.config.num_classes, s.per_class)
  run = make_sampler(model, s.sampler, s.steps, s.cfg_scale, s.guided_channels)
  start = time.time()

  def progress(done, total):
    rate = done / (time.time() - start)
    print(f"sample: {done}/{total} images, {rate:.1f} img/s, ETA {(total - done) / rate:.0f} s", flush=True)

  images = to_uint8(generate(run, params, labels, jax.random.key(s.seed), s.batch_size, progress))
  save_grid(images, workdir / "samples.png", nrow=s.per_class if s.per_class > 1 else 10)
  save_npz(images, labels, workdir / "samples.npz")
  return {"images": int(len(images)), "grid": "samples.png", "npz": "samples.npz"}


STAGES = {"sample": stage_sample}


def run(config, workdir) -> None:
  workdir = pathlib.Path(workdir)
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise UserError(f"unknown stage(s) {unknown}; known stages are {sorted(STAGES)}.")
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  state: dict = {}
  for name in config.stages:
    marker = workdir / "stages" / f"{name}.json"
    if marker.exists():
      print(f"{name}: already done ({marker})")
      continue
    print(f"{name}: starting", flush=True)
    result = STAGES[name](config, workdir, state)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps(result, indent=1, default=lambda o: np.asarray(o).tolist()))
    print(f"{name}: done -> {marker}", flush=True)
