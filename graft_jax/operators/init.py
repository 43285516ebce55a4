"""Layers built with DiT's initialisation, and the PyTorch -> Flax weight layout for them."""
from __future__ import annotations

from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np


def dense(features: int, name: str, use_bias: bool = True, kernel_init=nn.initializers.xavier_uniform()) -> nn.Dense:
  """DiT initialises every Linear xavier-uniform with zero bias."""
  return nn.Dense(features, use_bias=use_bias, name=name, kernel_init=kernel_init, bias_init=nn.initializers.zeros)


def fused_part_init(parts: int):
  """PyTorch's xavier-uniform of a fused (D, parts * D) Linear, for one (D, D) part stored on its own: the bound
  sqrt(6 / (D + parts * D)) is variance scaling 2 / (1 + parts) over the part's fan_avg D."""
  return nn.initializers.variance_scaling(2 / (1 + parts), "fan_avg", "uniform")


def cuts(widths) -> list[slice]:
  """The consecutive slices of an axis stored as parts of these widths, in order."""
  ends = np.cumsum(widths)
  return [slice(int(end) - width, int(end)) for width, end in zip(widths, ends)]


def dense_params(module: nn.Module, x: jax.Array, features: int, use_bias: bool = True,
                 kernel_init=nn.initializers.xavier_uniform()):
  """x, kernel and bias (None without one) of a Linear declared inside `module` (nn.Dense's parameter names, DiT's
  initialisation), promoted to one dtype as nn.Dense does: for modules that apply a Dense's weights their own way."""
  kernel = module.param("kernel", kernel_init, (x.shape[-1], features))
  bias = module.param("bias", nn.initializers.zeros, (features,)) if use_bias else None
  return nn.dtypes.promote_dtype(x, kernel, bias)


class FusedDense(nn.Module):
  """Linears of `widths` outputs each, stored as PyTorch fuses them (one Dense: kernel (D, sum(widths)), bias
  (sum(widths),) unless `use_bias` is False, initialised as one xavier-uniform matrix) but applied as one matmul per
  part on slices of the weights. Each output is then its own contiguous array rather than a copy sliced out of the
  fused result, and the backward pass does not concatenate their gradients (1.1 ms of Mamba-2's 14.6 ms at batch
  256 x 256 tokens on an H200). A sliced bias is not taken into cuBLAS's epilogue, though, so a biased part costs
  one more pass over its output: hot biased projections are stored as separate Linears instead (attention's q, k
  and v)."""
  widths: tuple[int, ...]
  use_bias: bool = True

  @nn.compact
  def __call__(self, x) -> list[jax.Array]:
    x, kernel, bias = dense_params(self, x, sum(self.widths), self.use_bias)
    return [x @ kernel[:, cut] + bias[cut] if self.use_bias else x @ kernel[:, cut] for cut in cuts(self.widths)]


class LinearWeights(nn.Module):
  """A Linear's (kernel, bias) (nn.Dense's parameter names; DiT's initialisation unless `kernel_init`), unapplied,
  for a caller that applies several Linears its own way (attention folds the values' bias into the output
  projection's); `in_features` is the input's width."""
  features: int
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param("kernel", self.kernel_init, (in_features, self.features)),
            self.param("bias", nn.initializers.zeros, (self.features,)))


def dense_from_torch(tensors: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """A torch Linear (out, in) weight -> Flax Dense kernel (in, out); bias copied when present.

  `name` is the Linear's key prefix in `tensors` ("" when the tensors are already relative to it)."""
  prefix = f"{name}." if name else ""
  params = {"kernel": np.asarray(tensors[f"{prefix}weight"]).T}
  if f"{prefix}bias" in tensors:
    params["bias"] = np.asarray(tensors[f"{prefix}bias"])
  return params
