"""Class-conditional DDPM or DDIM sampling with CFG from a DiT, batched, to an ADM-style .npz."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.diffusion import cfg_model_fn, make_diffusion
from graft_jax.files import write_atomic
from graft_jax.models.config import check_compute_dtype
from graft_jax.train import partition
from graft_jax.train.state import cast_floating, require


def sample_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def at_compute_dtype(apply_fn, params, dtype):
  """apply_fn(params, x, *rest) as fn(x, *rest) with the weights and x in `dtype` (floating leaves of the rest too),
  returning float32 for the sampler's own arithmetic, which stays float32."""
  dtype = jnp.dtype(dtype)
  params = cast_floating(params, dtype)
  return lambda x, *rest: apply_fn(params, x.astype(dtype), *cast_floating(rest, dtype)).astype(jnp.float32)


SAMPLERS = ("ddpm", "ddim")


def respaced(sampler: str, steps: int, learn_sigma: bool = True):
  """The diffusion `sampler` walks: `steps` of DiT's 1000, respaced as ADM does for "ddpm" or by a stride for
  "ddim"; a ValueError of one sentence for another sampler or a count the 1000 steps cannot be respaced to."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  return make_diffusion(1000, f"ddim{steps}" if sampler == "ddim" else steps,
                        "learned_range" if learn_sigma else "fixed_small")


def check_config(s) -> None:
  """A class-conditional sample section's settings (sampler, steps, per_class, batch_size, compute_dtype): a
  ValueError of one sentence for the first out of range, which the pipeline raises before any stage runs."""
  for name in ("steps", "per_class", "batch_size"):
    require(s, name, lambda v: v >= 1, "a positive integer")
  respaced(s.sampler, s.steps)
  check_compute_dtype(s.get("compute_dtype", "float32"))


def make_sampler(model, sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 1.5,
                 guided_channels: int | None = 3, eta: float = 0.0, compute_dtype: str = "float32"):
  """A jitted fn(params, labels, key) -> samples (NHWC), sampling `steps` respaced steps ("ddpm") or DDIM steps;
  the model runs in `compute_dtype` (float32 by default, what DiT's FID numbers were sampled with)."""
  cfg = model.config
  diffusion = respaced(sampler, steps, cfg.learn_sigma)
  shape_hw = (cfg.input_size, cfg.input_size, cfg.in_channels)

  @jax.jit
  def run(params, labels, key):
    apply_fn = at_compute_dtype(lambda p, x, t, y: model.apply({"params": p}, x, t, y), params, compute_dtype)
    model_fn = cfg_model_fn(apply_fn, labels, cfg_scale, cfg.num_classes, guided_channels)
    shape = (labels.shape[0], *shape_hw)
    if sampler == "ddim":
      x = diffusion.ddim_sample_loop(model_fn, shape, key, eta)
    else:
      x = diffusion.p_sample_loop(model_fn, shape, key)
    return x[..., :cfg.in_channels]
  return run


def shard_over(run, params, mesh):
  """(run, params) for sampling on `mesh`: every batch of labels split over its devices, params replicated."""
  data = partition.batch_sharding(mesh)
  return (lambda p, y, key: run(p, jax.device_put(y, data), key)), jax.device_put(params, partition.replicated(mesh))


def generate(run, params, rows, key, batch_size: int, progress=None) -> np.ndarray:
  """Samples for `rows` (labels, or any pytree of arrays with one row per sample, e.g. captions and masks) in
  batches; batch k's noise is fold_in(key, k * batch_size), and the last batch is padded with zero rows so that
  one program serves every batch."""
  total = len(jax.tree.leaves(rows)[0])
  out = []
  for start in range(0, total, batch_size):
    chunk = jax.tree.map(lambda a: a[start:start + batch_size], rows)
    count = len(jax.tree.leaves(chunk)[0])
    padded = jax.tree.map(lambda a: np.pad(a, [(0, batch_size - count)] + [(0, 0)] * (a.ndim - 1)), chunk)
    out.append(np.asarray(run(params, padded, jax.random.fold_in(key, start)))[:count])
    if progress:
      progress(start + count, total)
  return np.concatenate(out)


def save_npz(images_uint8: np.ndarray, labels: np.ndarray, path) -> pathlib.Path:
  """ADM evaluator format: arr_0 = uint8 images NHWC, arr_1 = labels; written atomically."""
  return write_atomic(path, lambda f: np.savez(f, arr_0=images_uint8, arr_1=labels))
