"""Sliding-window attention through TPU splash attention: a LocalMask lets the kernel skip every key block outside the
band, so the work is O(N * (block + 2w)) like the tiled XLA path, with the flash-attention memory profile.

Splash attention works on whole blocks of 128 (TPU lanes): a sequence whose length is not a multiple of the block is
padded at the end, and the padding is put into a segment of its own so that no real query sees a padded key.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

BLOCK = 128  # the kernel's block sizes must be multiples of the 128 TPU lanes


@functools.lru_cache(maxsize=32)
def _kernel(length: int, heads: int, window: int, block: int, interpret: bool):
  """The kernel for one (padded) length; cached because building the block-sparsity tables is numpy work per call."""
  mask = splash.MultiHeadMask([splash.LocalMask((length, length), (window, window), offset=0)] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_band_attention(q, k, v, window: int, *, interpret: bool | None = None, block: int = BLOCK):
  """Query i attends to keys j with |i - j| <= window, for (B, N, H, d) q, k, v; the map of `tiled_band_attention`.

  The kernel compiles for TPU only; elsewhere (interpret None means "not on TPU") it runs in Pallas interpret mode,
  correct but slow: how the tests check it.
  """
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  b, n, h, d = q.shape
  padded = -(-n // block) * block
  kernel = _kernel(padded, h, window, block, interpret)
  # The kernel takes one example as (heads, tokens, head dim) and does not scale the logits itself.
  heads_first = lambda t: jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, 0), (0, padded - n), (0, 0)))
  qh = heads_first((q.astype(jnp.float32) / np.sqrt(d)).astype(q.dtype))
  segments = None
  if padded != n:
    ids = (jnp.arange(padded) >= n).astype(jnp.int32)
    segments = splash.SegmentIds(q=ids, kv=ids)
  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(qh, heads_first(k), heads_first(v), segments)
  return jnp.swapaxes(out[:, :, :n], 1, 2).astype(q.dtype)
