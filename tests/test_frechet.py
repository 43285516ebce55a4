"""Frechet distance against independent formulas (scipy sqrtm, nuclear norm, closed forms) and the statistics files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg

from graft_jax.evaluation import frechet


def correlated_features(rng, n, d):
  """Two (n, d) feature sets that share structure, so tr sqrt(S1 S2) is far from zero."""
  f1 = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, d)
  f2 = 0.4 * f1 + rng.standard_normal((n, d)) * 1.1 + 0.05
  return f1, f2


def sqrtm_distance(mu1, s1, mu2, s2):
  """The textbook formula (pytorch-fid / ADM): a general matrix square root of S1 S2, imaginary part dropped."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def nuclear_distance(f1, f2):
  """Exact for covariances of data: with S = Xc^T Xc / (n - 1), tr sqrt(S1 S2) is the nuclear norm of
  Xc1 Xc2^T / (n - 1), an n x n SVD that never forms the d x d covariances."""
  n = len(f1)
  x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
  trace_sqrt = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / (n - 1)
  mu = np.sum((f1.mean(0) - f2.mean(0)) ** 2)
  return float(mu + (np.sum(x1 ** 2) + np.sum(x2 ** 2)) / (n - 1) - 2 * trace_sqrt)


def test_matches_sqrtm_full_rank_d64():
  rng = np.random.default_rng(0)
  f1, f2 = correlated_features(rng, 1000, 64)
  s1, s2 = frechet.feature_statistics(f1), frechet.feature_statistics(f2)
  fd = frechet.frechet_distance(*s1, *s2)
  ref = sqrtm_distance(*s1, *s2)
  assert fd > 1.0
  assert abs(fd - ref) < 1e-9 * ref
  assert abs(fd - nuclear_distance(f1, f2)) < 1e-9 * ref


def test_matches_sqrtm_rank_deficient_d256():
  rng = np.random.default_rng(1)
  f1, f2 = correlated_features(rng, 100, 256)  # covariances of rank 99 in 256 dimensions
  s1, s2 = frechet.feature_statistics(f1), frechet.feature_statistics(f2)
  fd = frechet.frechet_distance(*s1, *s2)
  # sqrtm of a singular non-symmetric product is only good to ~1e-7 relative; the nuclear norm is exact.
  assert abs(fd - sqrtm_distance(*s1, *s2)) < 1e-6 * fd
  assert abs(fd - nuclear_distance(f1, f2)) < 1e-11 * fd


def test_rank_deficient_d2048_and_self_distance():
  # scipy's sqrtm at d = 2048 takes minutes on two cores; the nuclear-norm formula is exact and independent.
  rng = np.random.default_rng(2)
  f1, f2 = correlated_features(rng, 400, 2048)
  s1, s2 = frechet.feature_statistics(f1), frechet.feature_statistics(f2)
  fd = frechet.frechet_distance(*s1, *s2)
  assert abs(fd - nuclear_distance(f1, f2)) < 1e-11 * fd
  # Without discarding the null-space rounding noise this is about -4e-4.
  assert abs(frechet.frechet_distance(*s1, *s1)) < 1e-6


def test_diagonal_closed_form():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
  a, b = rng.uniform(0.01, 4.0, 64), rng.uniform(0.01, 4.0, 64)
  # Rotating both covariances by one orthogonal matrix leaves the distance unchanged.
  q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  fd = frechet.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert abs(fd - expected) < 1e-10 * expected


def test_symmetric_and_non_negative():
  rng = np.random.default_rng(4)
  for n, d in [(500, 64), (50, 128)]:
    f1, f2 = correlated_features(rng, n, d)
    s1, s2 = frechet.feature_statistics(f1), frechet.feature_statistics(f2)
    forward, backward = frechet.frechet_distance(*s1, *s2), frechet.frechet_distance(*s2, *s1)
    assert abs(forward - backward) < 1e-10 * forward
    # Nearly identical sets: the distance is tiny but must not go below zero.
    near = frechet.feature_statistics(f1 + 1e-4 * rng.standard_normal(f1.shape))
    assert 0.0 <= frechet.frechet_distance(*s1, *near) < 1e-5


def test_feature_statistics_is_float64_unbiased_covariance():
  rng = np.random.default_rng(5)
  f = rng.standard_normal((300, 16)).astype(np.float32)
  mu, sigma = frechet.feature_statistics(f)
  assert mu.dtype == sigma.dtype == np.float64
  x = f.astype(np.float64) - f.astype(np.float64).mean(0)
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=0, atol=1e-15)
  np.testing.assert_allclose(sigma, x.T @ x / 299, rtol=1e-12, atol=1e-15)


def test_statistics_round_trip_and_adm_layout(tmp_path):
  rng = np.random.default_rng(6)
  mu, sigma = frechet.feature_statistics(rng.standard_normal((50, 8)))
  path = tmp_path / "ref_stats"  # no .npz suffix: the file must still land exactly here
  frechet.save_statistics(path, mu, sigma)
  assert os.listdir(tmp_path) == ["ref_stats"]
  loaded = frechet.load_statistics(path)
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)

  adm = tmp_path / "VIRTUAL_ref.npz"
  np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma, mu_s=mu)
  adm_mu, adm_sigma = frechet.load_statistics(adm)
  assert adm_mu.dtype == np.float64
  np.testing.assert_array_equal(adm_sigma, sigma)


def test_errors_are_clear(tmp_path):
  images_only = tmp_path / "images.npz"
  np.savez(images_only, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(KeyError, match="no mu/sigma"):
    frechet.load_statistics(images_only)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    frechet.load_statistics(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="different feature sizes"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="expected mu"):
    frechet.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.feature_statistics(np.zeros((1, 5)))
