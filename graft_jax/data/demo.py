"""The demo data set: scikit-learn's 8x8 handwritten digits, shipped inside the package (no download).

1797 grey images of 10 classes with values 0..16. They are upsampled bilinearly (half-pixel centres, edges
clamped: what `jax.image.resize(..., "linear")` and PIL do when enlarging) because nearest-neighbour copies give
blocky 2x2 cells whose hard edges a pixel-space diffusion model would spend its capacity on, while bilinear gives
smooth strokes. Pixels are scaled to [-1, 1] (background -1). The train / test split is stratified and fixed:
10% of each class, drawn with a fixed seed, is held out.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_VALUE = 16.0
TEST_FRACTION = 0.1
SPLIT_SEED = 0
SPLITS = ("train", "test")


@functools.cache
def _raw() -> tuple[np.ndarray, np.ndarray]:
  # Imported lazily so that importing graft_jax.data does not pull in scikit-learn.
  from sklearn.datasets import load_digits
  digits = load_digits()
  return digits.images.astype(np.float32), digits.target.astype(np.int32)


@functools.cache
def split_indices() -> dict[str, np.ndarray]:
  """Sorted indices into the 1797 digits for each split; the same on every machine and numpy version."""
  _, labels = _raw()
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    test.append(rng.permutation(members)[:int(np.ceil(TEST_FRACTION * len(members)))])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {"train": train, "test": test}


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of bilinear enlargement with half-pixel centres and clamped edges."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float64)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def load_demo(split: str = "train", size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, size, size, 1) float32 in [-1, 1], labels (N,) int32) of one split."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
  if size < NATIVE_SIZE:
    raise ValueError(f"size must be at least the digits' native {NATIVE_SIZE} pixels; got {size}.")
  images, labels = _raw()
  idx = split_indices()[split]
  m = bilinear_matrix(NATIVE_SIZE, size)
  # Separable resize: rows then columns, in float64 so the result does not depend on summation order.
  up = np.einsum("ij,njk,lk->nil", m, images[idx].astype(np.float64), m)
  x = up / (MAX_VALUE / 2) - 1.0
  return x[..., None].astype(np.float32), labels[idx].copy()
