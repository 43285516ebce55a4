"""Hyena-family operators: gated products of projections mixed by short causal depthwise convolutions.

All follow the grafting paper's definitions (causal conv: y_t = sum_j w_j x_{t-K+1+j} + b, zero padding on the left):
- Hyena-X: in_proj D -> 3D, "short_filter" conv over all 3D channels, split q, k, v, y = q * (k * v), out_proj.
- Hyena-Y: no short filter; u = k * v goes through the "inner_filter" conv (identity init), y = q * u.
- Hyena-SE: both filters.
- MLP Hyena-X (channel mixer): the Hyena-X recipe with ratio r, its conv running along the feature axis with one
  filter per token.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.operators import flops, init
from graft_jax.operators.kernels import hyena_gate
from graft_jax.operators.kernels.causal_conv import causal_conv_pallas
from graft_jax.operators.registry import register

CONV_BACKENDS = ("auto", "xla", "pallas", "triton")


def causal_depthwise_conv(x: jax.Array, w: jax.Array, b: jax.Array, axis: int = 1) -> jax.Array:
  """Causal depthwise convolution of x (B, N, C) along `axis`: y_t = sum_j w_j x_{t-K+1+j} + b, zeros before t=0.

  axis=1 runs along tokens with one filter per channel (w (K, C), b (C,)); axis=2 runs along the features with one
  filter per token (w (K, N), b (N,)). Shift-and-add over static slices of the left-padded input: grouped
  `conv_general_dilated` is slow on GPU, above all its backward. Products accumulate in float32 inside the fusion.
  """
  if axis not in (1, 2):
    raise ValueError(f"the convolution runs along axis 1 (tokens) or 2 (features), not {axis}")
  taps, length = w.shape[0], x.shape[axis]
  pad = [(0, 0)] * 3
  pad[axis] = (taps - 1, 0)
  xp = jnp.pad(x, pad)
  # A filter's values index the axis the convolution does not run along.
  per_filter = (lambda a: a) if axis == 1 else (lambda a: a[:, None])
  w, y = w.astype(jnp.float32), per_filter(b.astype(jnp.float32))
  for j in range(taps):
    y = y + jax.lax.slice_in_dim(xp, j, j + length, axis=axis).astype(jnp.float32) * per_filter(w[j])
  return y.astype(x.dtype)


def _gate(y: jax.Array) -> jax.Array:
  """Hyena-X's gate: y (B, N, 3D) split into q, k, v, returned as q * (k * v)."""
  q, k, v = jnp.split(y, 3, axis=-1)
  return q * (k * v)


def gated_conv_xla(u: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Hyena-X's featurizer and gate in XLA: the gate of the causal conv of u (B, N, 3D) along tokens."""
  return _gate(causal_depthwise_conv(u, w, b))


def conv_backend(requested: str, axis: int, gated: bool = False) -> str:
  """What "auto" means for the causal conv: the Pallas kernel on TPU along tokens; on GPU, for Hyena-X's conv and
  gate (`gated`), the fused Triton kernel; the XLA shift-and-add elsewhere (on GPU a plain conv is already one
  fusion) and along features (the kernels tile tokens only)."""
  if requested not in CONV_BACKENDS:
    raise ValueError(f"causal conv backend must be one of {CONV_BACKENDS}, got {requested!r}")
  if requested == "pallas" and axis != 1:
    raise ValueError("the Pallas causal conv runs along tokens (axis 1) only; use 'xla' for the feature axis")
  if requested == "triton" and not gated:
    raise ValueError("the Triton kernel fuses Hyena-X's conv and gate; this conv has no gate (use 'xla' or 'pallas')")
  if requested != "auto":
    return requested
  if jax.default_backend() == "tpu" and axis == 1:
    return "pallas"
  return "triton" if gated and jax.default_backend() == "gpu" else "xla"


def _symmetric_uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _identity_taps(key, shape, dtype=jnp.float32):
  """Only the last tap (the current token's) is 1."""
  return jnp.zeros(shape, dtype).at[-1].set(1)


class CausalConv(nn.Module):
  """Learned causal depthwise conv: `kernel` (K, C) and `bias` (C,), C the size of the axis not convolved.

  Default init is PyTorch's Conv1d default, as the official scions get. `identity_init` starts it as
  the identity (only the current-token tap is 1, bias 0), as the paper does for the Hyena-Y / SE inner filters.
  `backend` ("auto", "xla", "pallas"): see `conv_backend`; off TPU "pallas" runs in interpret mode (slow).
  """
  kernel_size: int
  axis: int = 1
  identity_init: bool = False
  backend: str = "auto"

  def filters(self, channels: int):
    """The (K, channels) kernel and (channels,) bias parameters; called from a compact method."""
    if self.identity_init:
      kernel_init, bias_init = _identity_taps, nn.initializers.zeros
    else:
      # PyTorch's Conv1d default for a depthwise filter: fan-in K for both kernel and bias.
      kernel_init = bias_init = _symmetric_uniform(1.0 / np.sqrt(self.kernel_size))
    return self.param("kernel", kernel_init, (self.kernel_size, channels)), self.param("bias", bias_init, (channels,))

  @nn.compact
  def __call__(self, x, *more):
    """The conv of x; with `more` arrays, x and they are one input split along C (in order), convolved part by part
    and returned as a tuple, so the caller's split of the input has no concatenated gradient to build."""
    parts = (x, *more)
    widths = [part.shape[3 - self.axis] for part in parts]
    kernel, bias = self.filters(sum(widths))
    pallas = conv_backend(self.backend, self.axis) == "pallas"
    outs = []
    for part, cut in zip(parts, init.cuts(widths)):
      w, b = kernel[:, cut], bias[cut]
      outs.append(causal_conv_pallas(part, w, b) if pallas else causal_depthwise_conv(part, w, b, self.axis))
    return outs[0] if not more else tuple(outs)


class GatedCausalConv(CausalConv):
  """Hyena-X's featurizer and gate: the conv of u (B, N, 3D) along tokens split into q, k, v, returned as
  q * (k * v). Both run as one Pallas kernel (`kernels/hyena_gate.py`, forward only) where its tiles fit: with
  backend "triton" anywhere (interpret mode off GPU), with "auto" on GPUs. Otherwise the conv as `conv_backend`
  says (XLA, or the Pallas conv on TPU), then the gate."""

  @nn.compact
  def __call__(self, u):
    kernel, bias = self.filters(u.shape[-1])
    backend = conv_backend(self.backend, 1, gated=True)  # "auto" is "triton" on GPUs only
    if backend == "triton" and hyena_gate.fits(u.shape[1], u.shape[2], self.kernel_size):
      return hyena_gate.gated_conv(u, kernel, bias, gated_conv_xla)
    if backend == "pallas":
      return _gate(causal_conv_pallas(u, kernel, bias))
    return gated_conv_xla(u, kernel, bias)


def _conv_from_torch(t, name):
  """A torch depthwise Conv1d weight (C, 1, K) -> kernel (K, C): tap k stays tap k (torch convs do not flip)."""
  return {"kernel": np.asarray(t[f"{name}.weight"])[:, 0, :].T, "bias": np.asarray(t[f"{name}.bias"])}


def _filters_from_torch(t, names):
  """Converted filters and their shared kernel size."""
  filters = {name: _conv_from_torch(t, name) for name in names}
  sizes = {f["kernel"].shape[0] for f in filters.values()}
  if len(sizes) != 1:
    raise ValueError(f"filters {sorted(names)} have different widths {sorted(sizes)}; one kernel_size is supported")
  return sizes.pop(), filters


def _hyena_importer(filters):
  def from_torch(t, dim, num_heads):
    kernel_size, params = _filters_from_torch(t, filters)
    params.update({name: init.dense_from_torch(t, name) for name in ("in_proj", "out_proj")})
    return {"kernel_size": kernel_size}, params
  return from_torch


class _Hyena(nn.Module):
  """in_proj D -> 3D, optional short filter over all 3D channels, split q, k, v, u = k * v, optional inner filter
  on u, y = q * u, out_proj D -> D. `backend` picks the conv implementation (see `conv_backend`)."""
  dim: int
  kernel_size: int = 4
  backend: str = "auto"
  has_short_filter: ClassVar[bool] = False
  has_inner_filter: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x):
    u = init.dense(3 * self.dim, "in_proj")(x)
    if self.has_short_filter and not self.has_inner_filter:  # Hyena-X: conv and gate in one (a kernel on GPU)
      return init.dense(self.dim, "out_proj")(GatedCausalConv(self.kernel_size, backend=self.backend,
                                                              name="short_filter")(u))
    if self.has_short_filter:
      u = CausalConv(self.kernel_size, backend=self.backend, name="short_filter")(u)
    q, k, v = jnp.split(u, 3, axis=-1)
    u = k * v
    if self.has_inner_filter:
      u = CausalConv(self.kernel_size, identity_init=True, backend=self.backend, name="inner_filter")(u)
    return init.dense(self.dim, "out_proj")(q * u)


@register("hyena_x", "attn", defaults={"kernel_size": 4, "backend": "auto"}, flops=flops.hyena(short=True, inner=False),
          torch_modules=("in_proj", "short_filter", "out_proj"),
          from_torch=_hyena_importer(("short_filter",)))
class HyenaX(_Hyena):
  """Hyena-X: featurizer conv only."""
  has_short_filter = True


@register("hyena_y", "attn", defaults={"kernel_size": 4, "backend": "auto"}, flops=flops.hyena(short=False, inner=True),
          torch_modules=("in_proj", "inner_filter", "out_proj"),
          from_torch=_hyena_importer(("inner_filter",)))
class HyenaY(_Hyena):
  """Hyena-Y: inner conv on k * v only."""
  has_inner_filter = True


@register("hyena_se", "attn", defaults={"kernel_size": 4, "backend": "auto"}, flops=flops.hyena(short=True, inner=True),
          torch_modules=("in_proj", "short_filter", "inner_filter", "out_proj"),
          from_torch=_hyena_importer(("short_filter", "inner_filter")))
class HyenaSE(_Hyena):
  """Hyena-SE: featurizer conv and inner conv."""
  has_short_filter = True
  has_inner_filter = True


def _mlp_hyena_x_from_torch(t, dim, num_heads):
  config, params = _hyena_importer(("short_filter",))(t, dim, num_heads)
  ratio = t["in_proj.weight"].shape[0] / (3 * dim)
  return {**config, "ratio": int(ratio) if ratio.is_integer() else ratio}, params


@register("mlp_hyena_x", "mlp", defaults={"ratio": 2, "kernel_size": 4}, flops=flops.mlp_hyena_x,
          torch_modules=("in_proj", "short_filter", "out_proj"), from_torch=_mlp_hyena_x_from_torch)
class MLPHyenaX(nn.Module):
  """Channel-mixing Hyena-X: in_proj D -> 3rD, causal conv along the features with one filter per token (its
  parameters are sized by the sequence length seen at init), split q, k, v, y = q * (k * v), out_proj rD -> D.

  As in the official module, the conv runs over the whole 3rD feature axis before the split, so the first K-1
  features of k and v also see the last features of the chunk before them.
  """
  dim: int
  ratio: float = 2
  kernel_size: int = 4

  @nn.compact
  def __call__(self, x):
    hidden = int(round(self.dim * self.ratio))
    u = CausalConv(self.kernel_size, axis=2, name="short_filter")(init.dense(3 * hidden, "in_proj")(x))
    q, k, v = jnp.split(u, 3, axis=-1)
    return init.dense(self.dim, "out_proj")(q * (k * v))
