"""FID, sFID, Inception Score, precision and recall, defined as ADM's evaluator (guided-diffusion/evaluations) does.

  FID        Frechet distance of Gaussians fitted to pool3 features (frechet.py; unbiased covariance).
  sFID       the same on the spatial features (mixed_6/conv, 7 channels, 17 x 17, flattened).
  IS         softmax(pool3 @ W) WITHOUT the classifier bias (ADM reads the MatMul's weight input); the samples are
             cut in consecutive splits of `split_size` = 5000 (10 splits for 50k; a shorter last split if N is not a
             multiple), each scores exp(mean_i KL(p_i || mean p)), and the result is the mean over splits.
  precision  share of samples inside the reference manifold; recall: share of reference images inside the samples'
             manifold. A set's manifold is the union of balls around its points whose squared radius is the squared
             distance to the point's k-th nearest neighbour (k = 3, the point itself not counted); "inside" is <=.
             ADM computes the squared distances in float16 and falls back to float32 when any is not finite; that is
             the default here ("float16"), "float32" skips the half-precision pass.

Reference batches are ADM's .npz files: `arr_0` uint8 (N, H, W, 3) images, optionally with precomputed `mu`,
`sigma`, `mu_s`, `sigma_s`; as in ADM, stored statistics are used when present and the images still give the
reference features for precision and recall. A statistics-only file (e.g. frechet.save_statistics's mu/sigma)
gives FID, and sFID only with mu_s/sigma_s; precision and recall need images.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.evaluation import frechet

SPLIT_SIZE = 5000
NHOOD = 3
ROW_BATCH = 1024


class EvaluationError(ValueError):
  """Input the metrics cannot use (a malformed file, too few samples); the message is one sentence for the user."""


# ---------------------------------------------------------------------------------------------------- Inception Score

def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits_unbiased, split_size: int = SPLIT_SIZE) -> float:
  """ADM's Inception Score of (N, classes) logits (pool3 @ W, no bias); computed in float64."""
  logits = np.asarray(logits_unbiased, np.float64)
  if logits.ndim != 2 or len(logits) == 0:
    raise EvaluationError(f"the Inception Score needs (N >= 1, classes) logits; got shape {logits.shape}.")
  log_p = _log_softmax(logits)
  scores = []
  for start in range(0, len(log_p), split_size):
    part = log_p[start:start + split_size]
    p = np.exp(part)
    marginal = p.mean(axis=0)
    # p log(p / marginal) with 0 log 0 = 0: a probability that underflows to 0 contributes nothing, and a class no
    # sample gives any probability has marginal 0 (its log is never used). ADM's float32 formula would give NaN.
    log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))
    kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------- precision / recall

def _squared_distances(u, v):
  norm_u = jnp.sum(u * u, axis=1)[:, None]
  norm_v = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(norm_u - 2 * jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST) + norm_v, 0)


def squared_distances(u, v, dtype: str = "float16"):
  """(len(u), len(v)) float32 squared distances, ADM style: in `dtype`, float32 again if any is inf or NaN."""
  u32, v32 = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  if dtype == "float32":
    return _squared_distances(u32, v32)
  if dtype != "float16":
    raise ValueError(f"distance dtype must be 'float16' or 'float32'; got {dtype!r}.")
  half = _squared_distances(u32.astype(jnp.float16), v32.astype(jnp.float16))
  return jax.lax.cond(jnp.all(jnp.isfinite(half)), lambda: half.astype(jnp.float32),
                      lambda: _squared_distances(u32, v32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _radii_block(rows, points, k, dtype):
  d = squared_distances(rows, points, dtype)
  # The (k+1)-th smallest distance in the row: the smallest is the point to itself.
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _inside_block(ref_rows, ref_radii, samples, sample_radii, dtype):
  d = squared_distances(ref_rows, samples, dtype)
  ref_inside = jnp.any(d <= sample_radii[None, :], axis=1)   # reference point in some sample ball: recall
  sample_inside = jnp.any(d <= ref_radii[:, None], axis=0)   # sample in some reference ball: precision
  return ref_inside, sample_inside


def _row_blocks(x: np.ndarray, row_batch: int):
  """(start, block) over rows, the last block zero-padded so every block has one shape (one compilation)."""
  rb = min(row_batch, len(x))
  for start in range(0, len(x), rb):
    block = x[start:start + rb]
    yield start, np.concatenate([block, np.zeros((rb - len(block),) + block.shape[1:], block.dtype)])


def manifold_radii(features, k: int = NHOOD, row_batch: int = ROW_BATCH, dtype: str = "float16") -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
  f = np.asarray(features, np.float32)
  if f.ndim != 2 or len(f) <= k:
    raise EvaluationError(f"k-NN manifolds with k = {k} need more than {k} points; got shape {f.shape}.")
  points = jnp.asarray(f)
  radii = [np.asarray(_radii_block(block, points, k, dtype)) for _, block in _row_blocks(f, row_batch)]
  return np.concatenate(radii)[:len(f)]


def precision_recall(reference, samples, k: int = NHOOD, row_batch: int = ROW_BATCH,
                     dtype: str = "float16") -> tuple[float, float]:
  """(precision, recall) of sample features against reference features (ADM's improved precision/recall)."""
  ref, smp = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
    raise EvaluationError(f"precision/recall need two (N, d) feature sets of one width; got {ref.shape} and "
                          f"{smp.shape}.")
  ref_radii = manifold_radii(ref, k, row_batch, dtype)
  sample_radii = jnp.asarray(manifold_radii(smp, k, row_batch, dtype))
  padded_radii = np.concatenate([ref_radii, np.full(row_batch, -np.inf, np.float32)])  # padding rows cover nothing
  samples_dev = jnp.asarray(smp)
  ref_inside = np.zeros(len(ref), bool)
  sample_inside = np.zeros(len(smp), bool)
  for start, block in _row_blocks(ref, row_batch):
    r_in, s_in = _inside_block(block, padded_radii[start:start + len(block)], samples_dev, sample_radii, dtype)
    ref_inside[start:start + len(block)] = np.asarray(r_in)[:len(ref) - start]
    sample_inside |= np.asarray(s_in)
  return float(sample_inside.mean()), float(ref_inside.mean())


# ---------------------------------------------------------------------------------------------- reference batches

@dataclasses.dataclass
class Reference:
  """What a reference .npz provides: statistics for FID / sFID (None when absent) and pool3 features for
  precision/recall (None for a statistics-only file)."""
  fid_stats: tuple[np.ndarray, np.ndarray]
  sfid_stats: tuple[np.ndarray, np.ndarray] | None
  pool3: np.ndarray | None
  num_images: int | None


def check_image_array(images, what: str) -> None:
  """EvaluationError unless `images` is (N, H, W, 3) uint8, the ADM batch format."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise EvaluationError(f"{what} must be uint8 RGB images of shape (N, H, W, 3); got shape {shape}.")
  if images.dtype != np.uint8:
    raise EvaluationError(f"{what} must be uint8 RGB images (N, H, W, 3); got dtype {images.dtype}.")
  if len(images) < 2:
    raise EvaluationError(f"{what} holds {len(images)} image(s); a covariance needs at least 2.")


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz (images checked, nothing computed), or EvaluationError saying what is wrong."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise EvaluationError(f"the {what} file {path} does not exist.")
  try:
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  except Exception as e:  # numpy raises several types for a file that is not an npz
    raise EvaluationError(f"the {what} file {path} could not be read as an .npz ({type(e).__name__}).") from None
  if "arr_0" in arrays:
    check_image_array(arrays["arr_0"], f"{path} arr_0")
  elif not {"mu", "sigma"} <= set(arrays):
    raise EvaluationError(f"the {what} file {path} holds {sorted(arrays)}: neither arr_0 images nor mu/sigma "
                          f"statistics.")
  return arrays


def _stats(arrays, mu_key: str, sigma_key: str, path):
  mu, sigma = np.asarray(arrays[mu_key], np.float64), np.asarray(arrays.get(sigma_key), np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise EvaluationError(f"{path}: {mu_key} must be (d,) and {sigma_key} (d, d); got {mu.shape} and {sigma.shape}.")
  return mu, sigma


def reference_from_arrays(arrays: dict, feats: dict | None, path="reference") -> Reference:
  """Reference from `read_npz`'s arrays and, when it holds images, their Inception `features`."""
  fid = _stats(arrays, "mu", "sigma", path) if "mu" in arrays else frechet.feature_statistics(feats["pool3"])
  if "mu_s" in arrays:
    sfid = _stats(arrays, "mu_s", "sigma_s", path)
  else:
    sfid = frechet.feature_statistics(feats["spatial"]) if feats is not None else None
  return Reference(fid, sfid, None if feats is None else feats["pool3"],
                   None if feats is None else len(feats["pool3"]))


def compute_metrics(sample_feats: dict, reference: Reference, split_size: int = SPLIT_SIZE,
                    distance_dtype: str = "float16") -> dict:
  """{"fid", "sfid", "inception_score", "precision", "recall"} (None where the reference lacks what it needs)."""
  n = len(sample_feats["pool3"])
  if n < 2:
    raise EvaluationError(f"{n} sample(s) cannot give a covariance; FID needs at least 2.")
  try:
    fid = frechet.frechet_distance(*frechet.feature_statistics(sample_feats["pool3"]), *reference.fid_stats)
    sfid = None
    if reference.sfid_stats is not None:
      sfid = frechet.frechet_distance(*frechet.feature_statistics(sample_feats["spatial"]), *reference.sfid_stats)
  except ValueError as e:  # reference statistics of another width than the features (not Inception ones)
    raise EvaluationError(f"the reference statistics do not fit the Inception features: {e}") from None
  precision = recall = None
  if reference.pool3 is not None and n > NHOOD and len(reference.pool3) > NHOOD:
    precision, recall = precision_recall(reference.pool3, sample_feats["pool3"], dtype=distance_dtype)
  return {"fid": fid, "sfid": sfid, "inception_score": inception_score(sample_feats["logits_unbiased"], split_size),
          "precision": precision, "recall": recall, "num_samples": n, "num_reference": reference.num_images}
