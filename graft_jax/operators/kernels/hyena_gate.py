"""Hyena-X's featurizer and gate, y = q * (k * v) with q, k, v the three parts of the causal depthwise conv of u
(B, N, 3D), as one Pallas (Triton) kernel for GPUs.

XLA already runs this as one fusion, but at PixArt-Sigma's 2048 px (two images of 16,384 tokens, 3 x 1152
channels) it took 225 us a layer on an H200, moving its 302 MB at 1.35 TB/s where a copy runs at 3.1 TB/s. Here a
program takes a tile of tokens and channels, loads each part's K shifted windows straight from u (the windows
overlap, so all but the first come from cache) and writes the tile of y once.

Every tap of the kernel's tiles lies inside the sequence: the first tile of tokens, whose taps reach before the
sequence start, is the XLA composition on those rows alone (the conv is causal, so they need nothing later),
written over the kernel's output. So the kernel needs no masks, and Pallas interpret mode (the tests) reads
nothing out of bounds.

Forward only (`kernels.forward_only`): a differentiated call runs the XLA composition. The kernel rounds once, where
the composition rounds each conv output and each product.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from graft_jax.operators.kernels import batch_partitioned, forward_only

_F32 = jnp.float32
BLOCK_T = 32  # tokens a program
BLOCK_C = 128  # channels of each part a program
WARPS = 8


def fits(length: int, channels: int, taps: int) -> bool:
  """Whole tiles of tokens and channels (`channels` = 3D), more than one tile of tokens, taps within one tile."""
  width = channels // 3
  return (channels % 3 == 0 and width % BLOCK_C == 0 and length % BLOCK_T == 0 and length > BLOCK_T
          and taps - 1 <= BLOCK_T)


def supported(length: int, channels: int, taps: int) -> bool:
  """`fits`, on a GPU."""
  return jax.default_backend() == "gpu" and fits(length, channels, taps)


def _gate_tile(u_ref, w_ref, b_ref, o_ref):
  block_t, block_c = o_ref.shape
  taps, width = w_ref.shape[0], u_ref.shape[1] // 3
  first = (pl.program_id(1) + 1) * block_t  # the grid starts at the second tile of tokens
  channel = pl.program_id(2) * block_c
  parts = []
  for part in range(3):
    cols = pl.ds(part * width + channel, block_c)
    acc = jnp.broadcast_to(b_ref[0, cols].astype(_F32)[None, :], (block_t, block_c))
    for j in range(taps):
      window = u_ref[pl.ds(first - (taps - 1) + j, block_t), cols].astype(_F32)
      acc = acc + window * w_ref[j, cols].astype(_F32)[None, :]
    parts.append(acc)
  q, k, v = parts
  o_ref[...] = (q * (k * v)).astype(o_ref.dtype)


def _forward(u, w, b, reference, interpret: bool):
  def call(u, w, b):  # sized by its operands: under a sharded jit, one device's batch shard
    batch, length, channels = u.shape
    width = channels // 3
    return pl.pallas_call(
        _gate_tile,
        grid=(batch, length // BLOCK_T - 1, width // BLOCK_C),
        in_specs=[pl.BlockSpec((None, length, channels), lambda i, t, c: (i, 0, 0)),
                  pl.BlockSpec(w.shape, lambda i, t, c: (0, 0)),
                  pl.BlockSpec(b.shape, lambda i, t, c: (0, 0))],
        out_specs=pl.BlockSpec((None, BLOCK_T, BLOCK_C), lambda i, t, c: (i, t + 1, c)),
        out_shape=jax.ShapeDtypeStruct((batch, length, width), u.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
    )(u, w, b)
  y = batch_partitioned(call, replicated=(1, 2))(u, w, b.reshape(1, -1))
  head = reference(u[:, :BLOCK_T], w, b)  # the first tile's taps reach before the sequence start
  return lax.dynamic_update_slice(y, head.astype(y.dtype), (0, 0, 0))


def gated_conv(u, w, b, reference, *, interpret: bool | None = None):
  """q * (k * v) for the conv of u (B, N, 3D) with w (K, 3D), b (3D,) (shapes as `fits` says), through the kernel;
  `reference` is the XLA composition, which a differentiated call runs instead and which computes the first tile.
  Off GPU (interpret None means "not on a GPU") the kernel runs in Pallas interpret mode, for the tests."""
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  return forward_only(functools.partial(_forward, reference=reference, interpret=interpret), reference)(u, w, b)
