"""Matmuls with 16-bit operands and float32 accumulation, in the backward pass as well as the forward.

`jnp.einsum(..., preferred_element_type=float32)` accumulates in float32, but its autodiff feeds the float32 output
cotangent into the backward matmuls, which then run in float32: about half the tensor-core rate on a GPU, for the
larger share of the work. Here the cotangent is rounded to the operands' dtype first, as mixed-precision kernels
(mamba_ssm's, flash attention's) do. Float32 operands are unaffected.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(spec, a, b) accumulated and returned in float32; a and b share a dtype."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
  return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, g):
  a, b = residuals
  _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
  return vjp(g.astype(a.dtype))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)
