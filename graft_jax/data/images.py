"""Image utilities shared by the demo and the reports: [-1, 1] floats -> uint8, PNG grids written atomically."""
from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

from graft_jax.files import write_atomic


def to_uint8(images) -> np.ndarray:
  """(N, H, W, C) floats in [-1, 1] -> (N, H, W, 3) uint8; one channel is repeated so grids are plain RGB."""
  x = np.asarray(images, dtype=np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"to_uint8 expects (N, H, W, 1 or 3) images in [-1, 1]; got shape {x.shape}.")
  x = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def make_grid(images_uint8, nrow: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) image, `nrow` images per row."""
  x = np.asarray(images_uint8)
  if x.ndim != 4 or x.dtype != np.uint8:
    raise ValueError(f"make_grid expects (N, H, W, C) uint8 images; got shape {x.shape} dtype {x.dtype}.")
  if nrow < 1:
    raise ValueError(f"nrow must be at least 1; got {nrow}.")
  n, h, w, c = x.shape
  rows = -(-n // nrow)
  grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def save_grid(images_uint8, path: str | os.PathLike, nrow: int, pad: int = 2) -> pathlib.Path:
  """Writes a PNG grid of `images_uint8`; a failed write leaves no partial file at `path`."""
  grid = make_grid(images_uint8, nrow, pad)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  return write_atomic(path, lambda f: image.save(f, format="PNG"))
