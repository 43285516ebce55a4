"""pytorch-fid's / torch-fidelity's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> Flax params.

Both packages ship the TF graph's weights under torchvision's Inception3 names: `<module>.conv.weight` (O, I, kh, kw),
`<module>.bn.{weight, bias, running_mean, running_var}` (and `num_batches_tracked` when saved from a live model),
`fc.weight` (1008, 2048), `fc.bias`. The Flax model uses the same module names, so the walk below is driven by the
Flax parameter tree itself: every Flax leaf names exactly one PyTorch key, and every PyTorch key must be used.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from flax import traverse_util

from graft_jax.convert.state_dict import ConversionError, KeyPool
from graft_jax.evaluation.inception import InceptionConfig, param_shapes

# Flax leaf name -> PyTorch parameter name within the same module.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# A key only this network has: how the command line tells an Inception file from a DiT checkpoint.
MARKER_KEY = "Mixed_7c.branch3x3dbl_3b.conv.weight"


def is_inception(tensors: Mapping[str, np.ndarray]) -> bool:
  return MARKER_KEY in tensors


def _torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """The PyTorch tensor in Flax layout: conv (O, I, kh, kw) -> (kh, kw, I, O), linear (O, I) -> (I, O)."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def inception_from_torch(tensors: Mapping[str, np.ndarray], source: str | os.PathLike = ""):
  """(InceptionConfig, params) from the FID Inception state dict; ConversionError names the first problem."""
  if not is_inception(tensors):
    raise ConversionError(f"this is not an FID Inception state dict (no {MARKER_KEY}); expected "
                          f"pt_inception-2015-12-05-6726825d.pth from pytorch-fid or torch-fidelity.")
  config = InceptionConfig(source=os.path.basename(str(source)))
  pool = KeyPool(tensors)
  flat = {}
  for path, expected in traverse_util.flatten_dict(param_shapes(config)).items():
    *module, leaf = path
    key = ".".join(module) + "." + _LEAF[leaf]
    value = _torch_layout(leaf, np.asarray(pool.take(key)))
    if value.shape != expected.shape:
      raise ConversionError(f"{key} has shape {tuple(pool.take(key).shape)}, which does not fit the FID Inception "
                            f"(expected {expected.shape} in Flax layout); is this the 2015-12-05 FID weight file?")
    flat[path] = value.astype(np.float32)
    # A state dict saved from a live torch model carries a batch counter per norm; it does not affect inference.
    counter = ".".join(module) + ".num_batches_tracked"
    if module[-1] == "bn" and counter in pool:
      pool.take(counter)
  pool.finish()
  return config, traverse_util.unflatten_dict(flat)
