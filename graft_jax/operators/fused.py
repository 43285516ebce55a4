"""Elementwise layers with hand-written backward passes: LayerNorm followed by adaLN modulation, and tanh-GELU.

Autodiff of the plain formulas keeps intermediates of the forward pass alive for the backward one (the float32
centred input and its normalised copy, the tanh and the cube of GELU's argument), each as large as the activation
or, in float32, twice as large. These keep only what their backward needs, the input and per-token statistics, and
recompute the rest inside the backward pass's fusions. Both compute in float32 and round once at the end.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def _normalise(xf, eps):
  mean = xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
  return (xf - mean) * rstd, mean, rstd


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def norm_modulate(x, shift, scale, eps: float = 1e-6):
  """LN(x) * (1 + scale) + shift for x (B, N, D) and per-sample shift, scale (B, D): LayerNorm without affine
  (statistics in float32: bf16 statistics drift over 28 layers), then DiT's adaLN modulation. Output in x's dtype."""
  return _norm_modulate_fwd(x, shift, scale, eps)[0]


def _norm_modulate_fwd(x, shift, scale, eps):
  xhat, mean, rstd = _normalise(x.astype(jnp.float32), eps)
  gain, bias = (1 + scale.astype(jnp.float32))[:, None], shift.astype(jnp.float32)[:, None]
  return (xhat * gain + bias).astype(x.dtype), (x, mean, rstd, scale, shift)  # shift: (B, D), kept for its dtype


def _norm_modulate_bwd(eps, residuals, g):
  x, mean, rstd, scale, shift = residuals
  gf = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dxhat = gf * (1 + scale.astype(jnp.float32))[:, None]
  dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), gf.sum(1).astype(shift.dtype), (gf * xhat).sum(1).astype(scale.dtype)


norm_modulate.defvjp(_norm_modulate_fwd, _norm_modulate_bwd)

_GELU_C = float(np.sqrt(2 / np.pi))
_GELU_A = 0.044715


@jax.custom_vjp
def gelu_tanh(x):
  """GELU with the tanh approximation (DiT's and PixArt's MLP), 0.5 x (1 + tanh(c (x + a x^3))), in float32."""
  xf = x.astype(jnp.float32)
  return (0.5 * xf * (1 + jnp.tanh(_GELU_C * (xf + _GELU_A * xf ** 3)))).astype(x.dtype)


def _gelu_tanh_fwd(x):
  return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
  xf = x.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (xf + _GELU_A * xf ** 3))
  slope = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * xf * xf)
  return ((g.astype(jnp.float32) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)
