"""The sample stage: class-conditional DDPM or DDIM sampling with CFG from a DiT, to a PNG grid and an ADM-style .npz."""
from __future__ import annotations

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from graft_jax.diffusion import cfg_model_fn, make_diffusion


def sample_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def make_sampler(model, sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 1.5,
                 guided_channels: int | None = 3, eta: float = 0.0):
  """A jitted fn(params, labels, key) -> samples (NHWC), sampling `steps` respaced steps ("ddpm") or DDIM steps."""
  cfg = model.config
  diffusion = make_diffusion(1000, f"ddim{steps}" if sampler == "ddim" else steps,
                             "learned_range" if cfg.learn_sigma else "fixed_small")
  shape_hw = (cfg.input_size, cfg.input_size, cfg.in_channels)

  @jax.jit
  def run(params, labels, key):
    apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
    model_fn = cfg_model_fn(apply_fn, labels, cfg_scale, cfg.num_classes, guided_channels) if cfg_scale != 1.0 \
        else (lambda x, t: apply_fn(x, t, labels))
    shape = (labels.shape[0], *shape_hw)
    if sampler == "ddim":
      x = diffusion.ddim_sample_loop(model_fn, shape, key, eta)
    else:
      x = diffusion.p_sample_loop(model_fn, shape, key)
    return x[..., :cfg.in_channels]
  return run


def generate(run, params, labels: np.ndarray, key, batch_size: int, progress=None) -> np.ndarray:
  """Samples for `labels` in batches (the last batch padded to full size so one program serves every batch)."""
  out = []
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    padded = np.pad(chunk, (0, batch_size - len(chunk)))
    out.append(np.asarray(run(params, jnp.asarray(padded), jax.random.fold_in(key, start)))[: len(chunk)])
    if progress:
      progress(start + len(chunk), len(labels))
  return np.concatenate(out)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] NHWC -> uint8 NHWC with 3 channels (grey images repeated), as the ADM evaluator expects."""
  x = np.clip(np.rint((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _atomic(path: pathlib.Path, write) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
  with open(fd, "wb") as f:
    write(f)
  pathlib.Path(tmp).rename(path)
  return path


def save_grid(images_uint8: np.ndarray, path, nrow: int, pad: int = 2) -> pathlib.Path:
  n, h, w, c = images_uint8.shape
  rows = -(-n // nrow)
  grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images_uint8):
    r, col = divmod(i, nrow)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
  scale = max(1, 256 // max(h, w))  # small images are enlarged so the grid is readable
  image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  return _atomic(pathlib.Path(path), lambda f: image.save(f, format="PNG"))


def save_npz(images_uint8: np.ndarray, labels: np.ndarray, path) -> pathlib.Path:
  """ADM evaluator format: arr_0 = uint8 images NHWC; arr_1 = labels."""
  return _atomic(pathlib.Path(path), lambda f: np.savez(f, arr_0=images_uint8, arr_1=labels))
