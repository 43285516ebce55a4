"""Teacher-generated training sets: class-conditional latents sampled from a DiT with CFG, as a latent cache.

The grafting paper distils stage 1 of its text-to-image experiments on samples of the teacher; this makes such a set
for the class-conditional DiT, in the same shard format as encoded ImageNet (graft_jax.data.latents), so every
reader and loader takes either. The metadata records the generator: model config and identity, sampler, steps, CFG.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax

from graft_jax.data.latents import DataError, ShardWriter, reuse_cache, tree_digest
from graft_jax.models.vae import SD_SCALING_FACTOR
from graft_jax.sample import SAMPLERS, generate, make_sampler, sample_labels, shard_over
from graft_jax.train import partition

# DiT's latents come from the SD VAE, whose encoder downsamples by 8.
VAE_DOWNSAMPLING = 8


@dataclasses.dataclass(frozen=True)
class SynthesisSettings:
  per_class: int
  sampler: str = "ddim"
  steps: int = 50
  cfg_scale: float = 4.0
  eta: float = 0.0  # DDIM only
  guided_channels: int | None = 3  # DiT's official CFG guides the first 3 latent channels; None guides all
  seed: int = 0
  batch_size: int = 64
  shard_size: int = 4096
  scale: float = SD_SCALING_FACTOR  # the teacher's latent scaling, recorded so the latents can be decoded
  vae: str | None = None  # identity of the teacher's VAE, when known (None: the teacher's own latent space)
  compute_dtype: str = "float32"  # the teacher's; the sampler's own arithmetic is float32 either way


def synthesize(model, params: Any, out: str | os.PathLike, settings: SynthesisSettings,
               teacher_source: str | None = None, mesh=None) -> pathlib.Path:
  """Samples `per_class` latents of every class from the DiT (model, params) into the cache `out`.

  Labels run 0, 0, ..., 1, 1, ...; shard i holds labels [i * shard_size, (i + 1) * shard_size) sampled with
  fold_in(key(seed), i), so an interrupted run continues at its first missing shard and gives the same set. The
  batch is split over `mesh` (default: every local device).
  """
  if settings.sampler not in SAMPLERS:
    raise DataError(f"sampler must be one of {SAMPLERS}, got {settings.sampler!r}.")
  if settings.per_class < 1 or settings.steps < 1:
    raise DataError(f"per_class ({settings.per_class}) and steps ({settings.steps}) must be at least 1.")
  mesh = sampling_mesh(mesh, settings.batch_size)
  labels = sample_labels(model.config.num_classes, settings.per_class)
  meta = _metadata(model.config, params, settings, teacher_source)
  if reuse_cache(out, {k: meta[k] for k in ("generator", "per_class", "scale", "vae")}):
    return pathlib.Path(out).absolute()
  writer = ShardWriter(out, meta)
  run = make_sampler(model, settings.sampler, settings.steps, settings.cfg_scale, settings.guided_channels,
                     settings.eta, settings.compute_dtype)
  sharded_run, params = shard_over(run, params, mesh)
  key = jax.random.key(settings.seed)
  return writer.fill(meta, labels, settings.shard_size,
                     lambda index, y: generate(sharded_run, params, y, jax.random.fold_in(key, index),
                                               settings.batch_size),
                     lambda start, y: [f"{settings.seed}-{start + i}" for i in range(len(y))])


def sampling_mesh(mesh, batch_size: int):
  """`mesh` (default: every local device), once the batch is known to split over it; a DataError if not."""
  mesh = mesh or partition.make_mesh({"data": -1}, jax.local_devices())
  try:
    partition.check_batch(mesh, batch_size)
  except ValueError as e:
    raise DataError(str(e)) from None
  return mesh


def _metadata(config, params: Any, settings: SynthesisSettings, teacher_source: str | None) -> dict[str, Any]:
  generator = {"model": config.to_json(), "teacher": tree_digest(config.to_json(), params),
               **{k: v for k, v in dataclasses.asdict(settings).items() if k not in ("per_class", "vae", "scale")}}
  return {"kind": "synthetic", "resolution": config.input_size * VAE_DOWNSAMPLING, "num_classes": config.num_classes,
          "latent_shape": [config.input_size, config.input_size, config.in_channels], "scale": settings.scale,
          "vae": {"id": settings.vae} if settings.vae else None, "source": teacher_source,
          "per_class": settings.per_class, "seed": settings.seed, "generator": generator}


def synthesize_from_checkpoint(teacher_dir: str | os.PathLike, out: str | os.PathLike,
                               settings: SynthesisSettings) -> pathlib.Path:
  """`synthesize` with the teacher a converted checkpoint folder (graft_jax.checkpoints)."""
  from graft_jax import checkpoints  # imported here: orbax takes seconds to import, synthesize itself needs none
  try:
    model, params = checkpoints.load(teacher_dir)
  except FileNotFoundError as e:
    raise DataError(str(e)) from None
  return synthesize(model, params, out, settings, str(pathlib.Path(teacher_dir).absolute()))
