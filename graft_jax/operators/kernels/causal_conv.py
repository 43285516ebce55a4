"""The Hyena causal depthwise convolution along tokens as a Pallas kernel, with a custom VJP.

y_t = sum_j w_j x_{t-K+1+j} + b for x (B, N, C), w (K, C), b (C,): the map of `hyena.causal_depthwise_conv`
(axis=1). Each program reads one tile of tokens and channels of the left-padded input plus a small halo (the first
K-1 rows of the next tile, as a second block of the same array), and writes its output tile once: the K shifted
products stay in registers instead of K passes over HBM.

Backward: the input gradient is the same causal conv run over the reversed sequence (dx = rev(conv(rev(dy), w))),
so it reuses the kernel; the filter and bias gradients are reductions over batch and tokens, left to XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from graft_jax.operators.kernels import batch_partitioned

LANES = 128  # a channel tile is 128 wide (TPU lanes) when the channels divide into them, else all channels
TOKEN_TILE = 512


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _conv_tile(x_ref, halo_ref, w_ref, b_ref, o_ref):
  taps, rows = w_ref.shape[0], o_ref.shape[0]
  window = x_ref[...].astype(jnp.float32)
  if taps > 1:
    window = jnp.concatenate([window, halo_ref[:taps - 1].astype(jnp.float32)], axis=0)
  w = w_ref[...].astype(jnp.float32)
  acc = jnp.broadcast_to(b_ref[...].astype(jnp.float32), o_ref.shape)
  for j in range(taps):
    acc = acc + window[j:j + rows] * w[j:j + 1]
  o_ref[...] = acc.astype(o_ref.dtype)


def _forward(x, w, b, interpret: bool, token_tile: int):
  length, channels = x.shape[1:]
  taps = w.shape[0]
  halo = _round_up(max(taps - 1, 1), 8)  # sublane-aligned halo block
  tile = _round_up(min(token_tile, length), halo)
  tiles = -(-length // tile)
  # Left padding makes the conv causal; the right padding gives the last tile its halo block.
  xp = jnp.pad(x, ((0, 0), (taps - 1, tiles * tile + halo - length - taps + 1), (0, 0)))
  cb = LANES if channels % LANES == 0 else channels

  def call(xp, halo_source, w, b):  # sized by its operands: under a sharded jit, one device's batch shard
    return pl.pallas_call(
        _conv_tile,
        grid=(xp.shape[0], tiles, channels // cb),
        in_specs=[
            pl.BlockSpec((None, tile, cb), lambda i, t, c: (i, t, c)),
            # Block indices count in units of the block: tile t + 1 starts at block (t + 1) * tile / halo.
            pl.BlockSpec((None, halo, cb), lambda i, t, c: (i, (t + 1) * (tile // halo), c)),
            pl.BlockSpec((taps, cb), lambda i, t, c: (0, c)),
            pl.BlockSpec((1, cb), lambda i, t, c: (0, c)),
        ],
        out_specs=pl.BlockSpec((None, tile, cb), lambda i, t, c: (i, t, c)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], tiles * tile, channels), x.dtype),
        interpret=interpret,
    )(xp, halo_source, w, b)
  out = batch_partitioned(call, replicated=(2, 3))(xp, xp, w, b.reshape(1, channels))
  return out[:, :length]


def causal_conv_pallas(x, w, b, *, interpret: bool | None = None, token_tile: int = TOKEN_TILE):
  """Causal depthwise conv of x (B, N, C) along tokens with w (K, C), b (C,), as a Pallas kernel.

  The tiling is laid out for TPU; elsewhere (interpret None means "not on TPU") it runs in Pallas interpret mode,
  correct but slow: how the tests check it.
  """
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  return _causal_conv(x, w, b, interpret, token_tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _causal_conv(x, w, b, interpret: bool, token_tile: int):
  return _forward(x, w, b, interpret, token_tile)


def _fwd(x, w, b, interpret, token_tile):
  return _forward(x, w, b, interpret, token_tile), (x, w, b)


def _bwd(interpret, token_tile, residuals, dy):
  x, w, b = residuals
  taps, length = w.shape[0], x.shape[1]
  zero_bias = jnp.zeros(b.shape, b.dtype)
  dx = jnp.flip(_forward(jnp.flip(dy, 1), w, zero_bias, interpret, token_tile), 1)
  # dw_j = sum over batch and tokens of dy_t * x_{t-K+1+j}: K reductions of elementwise products, fused by XLA.
  xp = jnp.pad(x, ((0, 0), (taps - 1, 0), (0, 0))).astype(jnp.float32)
  dyf = dy.astype(jnp.float32)
  dw = jnp.stack([jnp.sum(dyf * xp[:, j:j + length], axis=(0, 1)) for j in range(taps)])
  db = jnp.sum(dyf, axis=(0, 1))
  return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype)


_causal_conv.defvjp(_fwd, _bwd)
