"""Frechet distance between Gaussians fitted to features, and the (mu, sigma) statistics files it compares.

The matrix square root is avoided: with R = sqrt(S1) (from a symmetric eigendecomposition), S1 S2 is similar to
R S2 R, which is symmetric positive semi-definite, so tr sqrt(S1 S2) = sum sqrt(eigvalsh(R S2 R)). Symmetric
solvers stay accurate for the rank-deficient covariances of few samples in many dimensions, where `sqrtm` of the
non-symmetric S1 S2 returns complex noise. Everything runs in float64: float32 leaves a self-distance near -0.01
at d = 2048.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from graft_jax.files import write_atomic


def _symmetric_sqrt(s: np.ndarray) -> np.ndarray:
  w, u = np.linalg.eigh(s)
  return (u * np.sqrt(np.maximum(w, 0.0))) @ u.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr sqrt(sigma1 sigma2) for symmetric positive semi-definite sigma1, sigma2."""
  r = _symmetric_sqrt(np.asarray(sigma1, np.float64))
  m = r @ np.asarray(sigma2, np.float64) @ r
  # Symmetrise: rounding makes r S2 r asymmetric by ~1e-16, and eigvalsh reads only one triangle.
  ev = np.linalg.eigvalsh((m + m.T) / 2)
  # Eigenvalues under the numerical-rank tolerance (numpy's matrix_rank rule) are rounding noise of size
  # ~eps * max(ev); left in, their square roots (~1e-7 each) add up to ~1e-4 over the null space of
  # covariances from fewer samples than dimensions.
  tol = max(ev.max(), 0.0) * ev.size * np.finfo(np.float64).eps
  ev = np.where(ev > tol, ev, 0.0)
  return float(np.sum(np.sqrt(ev)))


def _check_statistics(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise ValueError(f"{which}: expected mu (d,) and sigma (d, d); got {mu.shape} and {sigma.shape}.")
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2): FID when the statistics are Inception pool features."""
  mu1, sigma1 = _check_statistics(mu1, sigma1, "first statistics")
  mu2, sigma2 = _check_statistics(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ValueError(f"the statistics have different feature sizes: {mu1.size} and {mu2.size}.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu (d,), sigma (d, d)) in float64 of (N, d) features; sigma is the unbiased covariance, as in ADM."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature_statistics expects (N >= 2, d) features; got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def save_statistics(path: str | os.PathLike, mu, sigma) -> pathlib.Path:
  """Writes an .npz with keys mu and sigma (the ADM reference-batch layout); nothing partial on failure."""
  mu, sigma = _check_statistics(mu, sigma, "save_statistics")
  return write_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 from an .npz written by `save_statistics` or an ADM reference batch."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; compute reference statistics first.")
  with np.load(path) as data:
    if "mu" not in data or "sigma" not in data:
      raise KeyError(f"{path} holds {sorted(data.files)} but no mu/sigma statistics; an ADM batch with only "
                     f"arr_0 images needs its features computed first.")
    return _check_statistics(data["mu"], data["sigma"], str(path))
