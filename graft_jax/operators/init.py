"""Layers built with DiT's initialisation, and the PyTorch -> Flax weight layout for them."""
from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import numpy as np


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  """DiT initialises every Linear xavier-uniform with zero bias."""
  return nn.Dense(features, use_bias=use_bias, name=name, kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros)


def cuts(widths) -> list[slice]:
  """The consecutive slices of an axis stored as parts of these widths, in order."""
  ends = np.cumsum(widths)
  return [slice(int(end) - width, int(end)) for width, end in zip(widths, ends)]


def dense_params(module: nn.Module, x: jax.Array, features: int, use_bias: bool = True):
  """x, kernel and bias (None without one) of a Linear declared inside `module` (nn.Dense's parameter names, DiT's
  initialisation), promoted to one dtype as nn.Dense does: for modules that apply a Dense's weights their own way."""
  kernel = module.param("kernel", nn.initializers.xavier_uniform(), (x.shape[-1], features))
  bias = module.param("bias", nn.initializers.zeros, (features,)) if use_bias else None
  return nn.dtypes.promote_dtype(x, kernel, bias)


class FusedDense(nn.Module):
  """Linears of `widths` outputs each, stored as PyTorch fuses them (one Dense: kernel (D, sum(widths)), bias
  (sum(widths),) unless `use_bias` is False, initialised as one xavier-uniform matrix) but applied as one matmul per
  part on slices of the weights. Each output is then its own contiguous array: a consumer such as cuDNN attention
  would otherwise get a copy of each part sliced out of the fused result (3 x 2.6 ms of DiT-XL/2's 124 ms forward
  at batch 256 on an H200), and the backward pass a concatenation of their gradients (1.1 ms of Mamba-2's 14.6 ms
  at batch 256 x 256 tokens).

  `biased` says which parts get their bias added (default all); a caller that leaves one out accounts for it
  itself (`part_bias`), as softmax attention does for its keys and values."""
  widths: tuple[int, ...]
  biased: tuple[bool, ...] | None = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x) -> list[jax.Array]:
    x, kernel, bias = dense_params(self, x, sum(self.widths), self.use_bias)
    biased = self.biased or (self.use_bias,) * len(self.widths)
    slices = cuts(self.widths)
    return [x @ kernel[:, cut] + bias[cut] if add else x @ kernel[:, cut] for cut, add in zip(slices, biased)]

  def part_bias(self, part: int) -> jax.Array:
    """The stored bias of output `part` (after the module has been called)."""
    return self.variables["params"]["bias"][cuts(self.widths)[part]]


def dense_from_torch(tensors: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """A torch Linear (out, in) weight -> Flax Dense kernel (in, out); bias copied when present.

  `name` is the Linear's key prefix in `tensors` ("" when the tensors are already relative to it)."""
  prefix = f"{name}." if name else ""
  params = {"kernel": np.asarray(tensors[f"{prefix}weight"]).T}
  if f"{prefix}bias" in tensors:
    params["bias"] = np.asarray(tensors[f"{prefix}bias"])
  return params
