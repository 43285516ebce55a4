"""ADM's metrics: Inception Score in closed form, precision/recall against brute force, reference files, and the
evaluate stage through the real command line (a random-weight Inception; nothing is downloaded)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flax import traverse_util

from cli import ROOT, load_config, run_main
from graft_jax import checkpoints
from graft_jax.evaluation import inception, metrics


# ---------------------------------------------------------------------------------------------------- Inception Score

def test_inception_score_closed_forms():
  assert abs(metrics.inception_score(np.zeros((30, 1008))) - 1.0) < 1e-12  # uniform: every p equals the marginal
  # Confident and spread evenly over 8 classes: KL(p || marginal) = log 8 for every sample.
  confident = 1e4 * np.eye(1008)[np.arange(40) % 8]
  assert abs(metrics.inception_score(confident) - 8.0) < 1e-9
  # Two classes, half the samples p = (a, 1 - a), half mirrored: the marginal is uniform.
  a = 0.8
  logits = np.log([[a, 1 - a], [1 - a, a]] * 10)
  expected = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
  assert abs(metrics.inception_score(logits) - expected) < 1e-12
  # A constant shift of the logits (the classifier bias ADM leaves out would be one per class, this is per sample)
  # changes nothing.
  assert abs(metrics.inception_score(logits + 3.0) - expected) < 1e-12


def test_inception_score_splits_are_consecutive_blocks():
  # One class in the first half, another in the second: each split of 10 is a single class (score 1), the
  # whole set has two (score 2). ADM splits in order, without shuffling.
  logits = 1e4 * np.eye(4)[[0] * 10 + [1] * 10]
  assert abs(metrics.inception_score(logits, split_size=10) - 1.0) < 1e-12
  assert abs(metrics.inception_score(logits, split_size=5000) - 2.0) < 1e-9


# ------------------------------------------------------------------------------------------------- precision / recall

def brute_force_pr(ref, smp, k=3):
  """precision, recall and both radii from full float64 distance matrices."""
  def sq(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
  r_ref, r_smp = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(smp, smp), 1)[:, k]
  d = sq(ref, smp)
  precision = np.mean((d <= r_ref[:, None]).any(0))
  recall = np.mean((d <= r_smp[None, :]).any(1))
  return precision, recall, r_ref, r_smp


@pytest.fixture(scope="module")
def point_sets():
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((150, 8)).astype(np.float32)
  # Shifted and narrower: some samples fall outside the reference manifold and vice versa.
  smp = (0.9 * rng.standard_normal((130, 8)) + 0.6).astype(np.float32)
  return ref, smp


def test_precision_recall_match_brute_force(point_sets):
  ref, smp = point_sets
  precision, recall, r_ref, r_smp = brute_force_pr(ref, smp)
  assert 0.5 < precision < 0.9 and 0.5 < recall < 0.9  # a case where both matter
  # row_batch 64 splits both sets into blocks with a padded last one.
  np.testing.assert_allclose(metrics.manifold_radii(ref, row_batch=64, dtype="float32"), r_ref, rtol=1e-5)
  np.testing.assert_allclose(metrics.manifold_radii(smp, row_batch=64, dtype="float32"), r_smp, rtol=1e-5)
  assert metrics.precision_recall(ref, smp, row_batch=64, dtype="float32") == (precision, recall)
  # ADM's float16 distances shift a few points across ball boundaries, no more.
  half = metrics.precision_recall(ref, smp, row_batch=64)
  assert abs(half[0] - precision) < 0.03 and abs(half[1] - recall) < 0.03


def test_float16_falls_back_to_float32_on_overflow(point_sets):
  ref, smp = point_sets
  big_ref, big_smp = 300 * ref, 300 * smp  # squared distances ~1e6 overflow float16 (max 65504)
  expected = metrics.precision_recall(big_ref, big_smp, dtype="float32")
  assert metrics.precision_recall(big_ref, big_smp) == expected
  assert expected == brute_force_pr(big_ref, big_smp)[:2]


def test_identical_sets_give_zero_distance_and_full_coverage(point_sets):
  ref, _ = point_sets
  rng = np.random.default_rng(1)
  feats = {"pool3": ref, "spatial": rng.standard_normal((150, 20)), "logits_unbiased": rng.standard_normal((150, 9))}
  reference = metrics.reference_from_arrays({}, feats)
  result = metrics.compute_metrics(feats, reference)
  assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
  assert result["precision"] == result["recall"] == 1.0  # every point lies in its own ball
  assert result["num_samples"] == result["num_reference"] == 150


def test_reference_files(tmp_path):
  rng = np.random.default_rng(2)
  feats = {"pool3": rng.standard_normal((10, 6)), "spatial": rng.standard_normal((10, 4)),
           "logits_unbiased": rng.standard_normal((10, 5))}
  mu, sigma = np.ones(6), 2 * np.eye(6)
  # ADM batch with images and stored statistics: the stored ones are used, sFID's come from the features.
  ref = metrics.reference_from_arrays({"arr_0": None, "mu": mu, "sigma": sigma}, feats)
  np.testing.assert_array_equal(ref.fid_stats[1], sigma)
  np.testing.assert_allclose(ref.sfid_stats[1], np.cov(feats["spatial"], rowvar=False))
  # Statistics only: FID, no sFID (no mu_s), no precision/recall (no images).
  path = tmp_path / "stats.npz"
  np.savez(path, mu=mu, sigma=sigma)
  ref = metrics.reference_from_arrays(metrics.read_npz(path, "reference"), None)
  result = metrics.compute_metrics(feats, ref)
  assert result["fid"] > 0 and result["sfid"] is None and result["precision"] is None
  np.savez(path, mu=np.ones(5), sigma=np.eye(5))
  with pytest.raises(metrics.EvaluationError, match="do not fit the Inception features"):
    metrics.compute_metrics(feats, metrics.reference_from_arrays(metrics.read_npz(path, "reference"), None))


# ----------------------------------------------------------------------------------------------- the evaluate stage

def random_inception(folder):
  """A converted-looking Inception folder with random weights that keep activations alive (no torch needed)."""
  rng = np.random.default_rng(0)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(inception.param_shapes()).items():
    if path[-1] == "kernel":
      flat[path] = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    else:
      flat[path] = np.full(leaf.shape, 1.0 if path[-1] in ("scale", "var") else 0.0, np.float32)
  checkpoints.save(folder, inception.InceptionConfig(source="random"), traverse_util.unflatten_dict(flat))


def evaluate_args(workdir, **flags):
  return ["--config=configs/evaluate.py", f"--workdir={workdir}",
          *[f"--config.evaluate.{k}={v}" for k, v in flags.items()]]


def test_config_file():
  c = load_config("evaluate")
  assert c.stages == ("evaluate",) and c.evaluate.resize == "tf1" and c.evaluate.samples == ""


def test_evaluate_stage_end_to_end(tmp_path):
  images = np.random.default_rng(3).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
  np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=np.arange(6))  # the sample stage's layout
  np.savez(tmp_path / "ref.npz", arr_0=images)
  random_inception(tmp_path / "inception")
  run = run_main(*evaluate_args(tmp_path, reference=tmp_path / "ref.npz", inception=tmp_path / "inception",
                                batch_size=6), cwd=ROOT)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads((tmp_path / "metrics.json").read_text())
  # The samples are their own reference: distances vanish and each set covers the other.
  assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
  assert result["precision"] == result["recall"] == 1.0
  assert result["inception_score"] >= 1.0 and result["num_samples"] == 6 and result["resize"] == "tf1"
  assert (tmp_path / "stages" / "evaluate.json").exists()


BAD_INPUTS = {
    "float images": (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "must be uint8 RGB images"),
    "grey images": (dict(arr_0=np.zeros((4, 8, 8, 1), np.uint8)), r"shape \(N, H, W, 3\); got shape \(4, 8, 8, 1\)"),
    "one image": (dict(arr_0=np.zeros((1, 8, 8, 3), np.uint8)), "a covariance needs at least 2"),
    "no images": (dict(x=np.zeros(3)), "neither arr_0 images nor mu/sigma statistics"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_samples_exit_2_and_write_no_metrics(tmp_path, case):
  arrays, message = BAD_INPUTS[case]
  np.savez(tmp_path / "bad.npz", **arrays)
  np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  run = run_main(*evaluate_args(tmp_path / "run", samples=tmp_path / "bad.npz", reference=tmp_path / "ref.npz"),
                 cwd=ROOT)
  assert run.returncode == 2, run.stderr[-2000:]
  assert re.search(message, run.stderr), run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "stages").exists()


def test_bad_reference_and_missing_inception(tmp_path):
  np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  np.savez(tmp_path / "ref.npz", mu=np.zeros(3))  # statistics without sigma
  run = run_main(*evaluate_args(tmp_path, reference=tmp_path / "ref.npz", inception=tmp_path / "none"), cwd=ROOT)
  assert run.returncode == 2 and "neither arr_0 images nor mu/sigma" in run.stderr, run.stderr[-2000:]
  np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  run = run_main(*evaluate_args(tmp_path, reference=tmp_path / "ref.npz", inception=tmp_path / "none"), cwd=ROOT)
  assert run.returncode == 2, run.stderr[-2000:]
  assert "tools/convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth" in run.stderr
  assert "Traceback" not in run.stderr and not (tmp_path / "metrics.json").exists()
