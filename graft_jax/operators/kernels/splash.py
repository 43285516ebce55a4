"""Softmax attention through TPU splash attention, for MHA (a FullMask) and SWA (a LocalMask, with which the kernel
skips every key block outside the band, so the work is O(N * (block + 2w)) like the tiled XLA path). Either way it
keeps the flash-attention memory profile: no (N, N) logits in HBM, which for MHA at PixArt's 2048 px (B=2, 16 heads
of 16,384 tokens) would be 34 GB in float32.

Splash attention works on whole blocks of 128 (TPU lanes): a sequence whose length is not a multiple of the block is
padded at the end, and the padding is put into a segment of its own so that no real query sees a padded key.

Under a sharded jit the kernel runs on each device's batch shard (`batch_partitioned`). A partitioned op has no
derivative rule and splash keeps its VJP inside the kernel object, so the forward and the backward are two
partitioned ops: the backward recomputes the forward (with its softmax statistics) on its shard and pulls the
cotangent back through splash's own VJP. That costs one more forward per backward pass: for a band O(N * w), like
the backward itself; for all keys two more of the backward's matmuls (it runs five).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from graft_jax.operators.kernels import batch_partitioned

BLOCK = 128  # the kernel's block sizes must be multiples of the 128 TPU lanes


@functools.lru_cache(maxsize=32)
def _kernel(length: int, heads: int, window: int | None, block: int, interpret: bool):
  """The kernel for one (padded) length, all keys (window None) or a band; cached because building the
  block-sparsity tables is numpy work per call.

  Built under compile-time evaluation: the first call usually comes inside a trace, and tables made there would be
  that trace's tracers, leaked into every later trace that hits the cache."""
  shape = (length, length)
  one = splash.FullMask(shape) if window is None else splash.LocalMask(shape, (window, window), offset=0)
  mask = splash.MultiHeadMask([one] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


class _Spec(NamedTuple):
  """What the kernel is built for, besides the shapes (hashable: a custom_vjp's static argument)."""
  window: int | None  # None: every key
  block: int
  interpret: bool
  padded: bool  # whether the sequence was padded to whole blocks (its padding a segment of its own)


def _partitioned(fn, spec: _Spec, q):
  """fn(q, k, v, ids, *operands, kernel=..., padded=...) as a batch-partitioned op of (q, k, v, ids, *operands).

  The kernel object is a pytree whose leaves are its block-sparsity tables; a partitioned op may not close over
  arrays, so they travel as replicated operands (with the segment ids) and the kernel is rebuilt inside."""
  tables, tree = jax.tree.flatten(_kernel(q.shape[2], q.shape[1], spec.window, spec.block, spec.interpret))

  def call(q, k, v, ids, *rest):
    kernel = jax.tree.unflatten(tree, rest[:len(tables)])
    return fn(q, k, v, ids, *rest[len(tables):], kernel=kernel, padded=spec.padded)
  return lambda q, k, v, ids, *more: batch_partitioned(call, replicated=tuple(range(3, 4 + len(tables))))(
      q, k, v, ids, *tables, *more)


def _attend(q, k, v, ids, *, kernel, padded: bool):
  """The kernel over a batch of (B, heads, tokens, head dim) q, k, v; `ids` the (tokens,) segment ids. Sized by its
  operands: under a sharded jit, one device's batch shard."""
  segments = splash.SegmentIds(q=ids, kv=ids) if padded else None
  return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sharded_attend(q, k, v, ids, spec: _Spec):
  return _partitioned(_attend, spec, q)(q, k, v, ids)


def _sharded_attend_fwd(q, k, v, ids, spec):
  return _sharded_attend(q, k, v, ids, spec), (q, k, v, ids)


def _sharded_attend_bwd(spec, residuals, dout):
  def pull(q, k, v, ids, dout, *, kernel, padded):
    return jax.vjp(lambda q, k, v: _attend(q, k, v, ids, kernel=kernel, padded=padded), q, k, v)[1](dout)
  q, k, v, ids = residuals
  dq, dk, dv = _partitioned(pull, spec, q)(q, k, v, ids, dout)
  return dq, dk, dv, None


_sharded_attend.defvjp(_sharded_attend_fwd, _sharded_attend_bwd)


def splash_attention(q, k, v, window: int | None = None, *, interpret: bool | None = None, block: int = BLOCK):
  """softmax(q k^T / sqrt(d)) v for (B, N, H, d) q, k, v over every key (window None: MHA's map) or over the keys j
  with |i - j| <= window for query i (`tiled_band_attention`'s map).

  The kernel compiles for TPU only; elsewhere (interpret None means "not on TPU") it runs in Pallas interpret mode,
  correct but slow: how the tests check it.
  """
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  b, n, h, d = q.shape
  padded = -(-n // block) * block
  # The kernel takes one example as (heads, tokens, head dim) and does not scale the logits itself.
  heads_first = lambda t: jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, 0), (0, padded - n), (0, 0)))
  qh = heads_first((q.astype(jnp.float32) / np.sqrt(d)).astype(q.dtype))
  ids = (jnp.arange(padded) >= n).astype(jnp.int32)
  out = _sharded_attend(qh, heads_first(k), heads_first(v), ids, _Spec(window, block, interpret, padded != n))
  return jnp.swapaxes(out[:, :, :n], 1, 2).astype(q.dtype)
