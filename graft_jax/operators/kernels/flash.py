"""Softmax attention's forward as a Pallas (Triton) flash-attention kernel whose head dim need not be a power of two.

cuDNN runs DiT's and PixArt's heads of 72 on tiles of 128 (on an H200 head dim 72 costs what 128 does), so 44% of
its tensor-core work is padding. Triton's blocks are powers of two as well, but a head of 72 splits into pieces
that are: columns [0, 64) and [56, 72), the second's first 8 columns (already in the first piece) zeroed in q, so
q k^T is the sum of the pieces' products and each piece of p v is a slice of the output. The work is that of a head
of 80 (64 + 16) instead of 128.

One program takes a block of queries of one (batch entry, head) and walks the keys in blocks with the online softmax
(running max and sum in float32, exp2 with log2(e) folded into the logit scale); p is rounded to the values' dtype for
its matmul, as flash attention does.

Forward only (`kernels.forward_only`): `flash_attention` takes cuDNN's (or XLA's) attention as its forward rule, so a
differentiated call (a train step, under any remat policy) saves and recomputes what that path would; undifferentiated
calls (sampling, the teacher's forward in stage 1, inference) run the kernel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from graft_jax.operators.kernels import batch_partitioned, forward_only, sixteen_bit

_F32 = jnp.float32
BLOCK_Q = 128
BLOCK_K = 64
WARPS = 8
STAGES = 2


def pieces(head_dim: int) -> tuple[tuple[int, int, int], ...] | None:
  """(start, width, overlap) column pieces of a head, each width a power of two of at least 16 (Triton's smallest
  matmul side), the overlap being the leading columns a piece shares with the one before; None if there are none."""
  lo = 1 << (head_dim.bit_length() - 1)
  if lo < 16:
    return None
  if lo == head_dim:
    return ((0, lo, 0),)
  hi = max(16, 1 << (head_dim - lo - 1).bit_length())
  if hi > lo:
    return None
  return ((0, lo, 0), (head_dim - hi, hi, lo - (head_dim - hi)))


def supported(q: jax.Array, k: jax.Array) -> bool:
  """16-bit (B, N, H, d) q and k of one length in whole blocks, with a head that splits into pieces, on a GPU."""
  n, d = q.shape[1], q.shape[3]
  return (jax.default_backend() == "gpu" and sixteen_bit(q.dtype) and k.shape[1] == n
          and n % BLOCK_Q == 0 and n % BLOCK_K == 0 and pieces(d) is not None)


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *, parts, block_k: int, scale: float):
  block_q, length = q_ref.shape[0], k_ref.shape[0]
  qs = []
  for start, width, overlap in parts:
    q = q_ref[:, pl.ds(start, width)].astype(_F32) * (scale * math.log2(math.e))
    if overlap:
      q = jnp.where(lax.broadcasted_iota(jnp.int32, q.shape, 1) >= overlap, q, 0.0)
    qs.append(q.astype(q_ref.dtype))

  def step(j, carry):
    top, total, accs = carry
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    s = sum(plgpu.dot(q, k_ref[keys, pl.ds(start, width)], trans_b=True) for q, (start, width, _) in zip(qs, parts))
    new_top = jnp.maximum(top, jnp.max(s, axis=1))
    p = jnp.exp2(s - new_top[:, None])
    decay = jnp.exp2(top - new_top)
    total = total * decay + jnp.sum(p, axis=1)
    p = p.astype(v_ref.dtype)
    accs = tuple(acc * decay[:, None] + plgpu.dot(p, v_ref[keys, pl.ds(start, width)])
                 for acc, (start, width, _) in zip(accs, parts))
    return new_top, total, accs

  init = (jnp.full((block_q,), -jnp.inf, _F32), jnp.zeros((block_q,), _F32),
          tuple(jnp.zeros((block_q, width), _F32) for _, width, _ in parts))
  _, total, accs = lax.fori_loop(0, length // block_k, step, init)
  for acc, (start, width, overlap) in zip(accs, parts):
    out = (acc / total[:, None]).astype(o_ref.dtype)
    # A piece leaves its overlap to the piece before: two stores to one address from different threads have no order.
    keep = lax.broadcasted_iota(jnp.int32, out.shape, 1) >= overlap if overlap else None
    plgpu.store(o_ref.at[:, pl.ds(start, width)], out, mask=keep)


def _forward(q, k, v, interpret: bool):
  def call(q, k, v):  # sized by its operands: under a sharded jit, one device's batch shard
    b, n, h, d = q.shape
    queries = pl.BlockSpec((None, BLOCK_Q, None, d), lambda i, j, t: (i, t, j, 0))
    sequence = pl.BlockSpec((None, n, None, d), lambda i, j, t: (i, 0, j, 0))
    return pl.pallas_call(
        functools.partial(_flash_kernel, parts=pieces(d), block_k=BLOCK_K, scale=1 / math.sqrt(d)),
        grid=(b, h, n // BLOCK_Q),
        in_specs=[queries, sequence, sequence],
        out_specs=queries,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=STAGES),
        interpret=interpret,
    )(q, k, v)
  return batch_partitioned(call)(q, k, v)


def flash_attention(q, k, v, differentiated: str = "xla", *, interpret: bool | None = None):
  """softmax(q k^T / sqrt(d)) v for (B, N, H, d) q, k, v through the kernel (shapes as `supported` says); a
  differentiated call runs jax.nn.dot_product_attention with implementation `differentiated` ("cudnn" or "xla")
  instead. Off GPU (interpret None means "not on a GPU") the kernel runs in Pallas interpret mode, for the tests."""
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  reference = functools.partial(jax.nn.dot_product_attention, implementation=differentiated)
  return forward_only(functools.partial(_forward, interpret=interpret), reference)(q, k, v)
