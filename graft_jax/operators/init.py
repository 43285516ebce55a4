"""Layers built with DiT's initialisation, and the PyTorch -> Flax weight layout for them."""
from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import numpy as np


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  """DiT initialises every Linear xavier-uniform with zero bias."""
  return nn.Dense(features, use_bias=use_bias, name=name, kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros)


def dense_from_torch(tensors: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """A torch Linear (out, in) weight -> Flax Dense kernel (in, out); bias copied when present.

  `name` is the Linear's key prefix in `tensors` ("" when the tensors are already relative to it)."""
  prefix = f"{name}." if name else ""
  params = {"kernel": np.asarray(tensors[f"{prefix}weight"]).T}
  if f"{prefix}bias" in tensors:
    params["bias"] = np.asarray(tensors[f"{prefix}bias"])
  return params
