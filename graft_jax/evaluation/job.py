"""The `evaluate` stage: FID, sFID, IS, precision and recall of a samples .npz against an ADM reference batch.

  python -m graft_jax.main --config=configs/evaluate.py --workdir=runs/x \
      --config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz --config.evaluate.inception=checkpoints/inception

Reads config.evaluate (see `default_config`), writes workdir/metrics.json. Every input is checked before the network
runs; a problem ends as a pipeline.UserError (one sentence, exit status 2) and writes no metrics.
"""
from __future__ import annotations

import json
import pathlib
import time

import ml_collections

from graft_jax import checkpoints, hosts
from graft_jax.evaluation import inception, metrics
from graft_jax.files import write_atomic
from graft_jax.pipeline import UserError

CONVERT_HINT = ("convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
                "`python tools/convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth {path}`")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      samples="",                           # .npz with arr_0 uint8 (N, H, W, 3); empty: WORKDIR/samples.npz
      reference="",                         # ADM reference batch .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)
      inception="checkpoints/inception",    # the converted FID Inception folder
      resize="tf1",                         # "tf1": ADM / TF graph (published numbers); "torch": pytorch-fid
      batch_size=100,
      split_size=metrics.SPLIT_SIZE,        # Inception Score split length (ADM: 5000, 10 splits of 50k)
      distance_dtype="float16",             # precision/recall distances; ADM: float16, float32 if not finite
  ))


def _load_inception(path: pathlib.Path):
  if not (path / "config.json").is_file():
    raise UserError(f"the Inception folder {path} does not exist or is incomplete; {CONVERT_HINT.format(path=path)}.")
  try:
    config = checkpoints.load_config(path)
  except (ValueError, KeyError) as e:
    raise UserError(f"{path} is not a converted FID Inception ({e}); {CONVERT_HINT.format(path=path)}.") from None
  if not isinstance(config, inception.InceptionConfig):
    raise UserError(f"{path} holds a {type(config).__name__} model, not the FID Inception; "
                    f"{CONVERT_HINT.format(path=path)}.")
  return checkpoints.load(path)


def _progress(name: str):
  """A progress callback for inception.features that prints about every 5000 images and at the end."""
  start, last = time.time(), [0]

  def report(done, total):
    if done == total or done - last[0] >= 5000:
      last[0] = done
      print(f"evaluate: {name} {done}/{total} images, {done / (time.time() - start):.1f} img/s", flush=True)
  return report


def stage_evaluate(config, workdir: pathlib.Path) -> dict:
  c = config.evaluate
  workdir = pathlib.Path(workdir)
  if c.resize not in inception.RESIZE_MODES:
    raise UserError(f"evaluate.resize must be one of {inception.RESIZE_MODES}; got {c.resize!r}.")
  if c.distance_dtype not in ("float16", "float32"):
    raise UserError(f"evaluate.distance_dtype must be 'float16' (ADM) or 'float32'; got {c.distance_dtype!r}.")
  if c.batch_size < 1 or c.split_size < 1:
    raise UserError(f"evaluate.batch_size and evaluate.split_size must be positive; got {c.batch_size} and "
                    f"{c.split_size}.")
  if not c.reference:
    raise UserError("evaluate.reference is empty; pass an ADM reference batch, e.g. "
                    "--config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz.")
  samples_path = pathlib.Path(c.samples) if c.samples else workdir / "samples.npz"
  inception_path = pathlib.Path(c.inception)
  try:
    samples = metrics.read_npz(samples_path, "samples")
    if "arr_0" not in samples:
      raise metrics.EvaluationError(f"the samples file {samples_path} holds statistics but no arr_0 images; the "
                                    f"Inception Score and precision/recall need the images.")
    reference = metrics.read_npz(c.reference, "reference")
  except metrics.EvaluationError as e:
    raise UserError(str(e)) from None
  model, params = _load_inception(inception_path)

  def feats(images, name):
    return inception.features(model, params, images, c.resize, c.batch_size, _progress(name))

  try:
    sample_feats = feats(samples["arr_0"], "samples")
    ref_feats = feats(reference["arr_0"], "reference") if "arr_0" in reference else None
    result = metrics.compute_metrics(sample_feats, metrics.reference_from_arrays(reference, ref_feats, c.reference),
                                     c.split_size, c.distance_dtype)
  except metrics.EvaluationError as e:
    raise UserError(str(e)) from None
  result.update(samples=str(samples_path), reference=str(c.reference), inception=str(inception_path),
                resize=c.resize)
  if hosts.is_writer():  # with several processes each evaluates the same files; process 0 writes
    write_atomic(workdir / "metrics.json", lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
  print("evaluate: " + ", ".join(f"{k} {result[k]:.4f}" for k in ("fid", "sfid", "inception_score", "precision",
                                                                     "recall") if result[k] is not None), flush=True)
  return result


STAGES = {"evaluate": stage_evaluate}
