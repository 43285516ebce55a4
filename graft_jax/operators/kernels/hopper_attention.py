"""Self-attention forward for heads of up to 80 channels (DiT's and PixArt's 72) as one Mosaic GPU kernel for Hopper.

cuDNN runs a head of 72 on tiles of 128 channels: on an H200 it takes 6.6-6.8 ms at PixArt's 2048 px (B=2,
N=16,384, 16 heads), against 4.71 ms for a head of 64. Here heads come zero-padded to the next multiple of 16 (80),
wgmma's k step (MHA pads its projections' weights, so no pass over the activations does it), and sit in shared
memory as 8-row tiles of 32-byte swizzled rows, which Mosaic's TMA can cut from a (B, N, H, 80) array (a 128-byte
swizzle needs the head to be a multiple of 64): q k^T and p v cost what a head of 80 does. At 2 x 16,384 tokens it
takes 5.20 ms against cuDNN's 6.83 (benchmarks/hopper_attention.py, hopper_attention.json).

Structure (FlashAttention-3's): a program takes 2 x block_q queries of one (batch, head); two compute warpgroups take
block_q rows each and keep an online softmax in float32 registers; the third warpgroup streams k and v through a
ring of shared-memory stages with TMA. A barrier between the two compute warpgroups makes them take turns on the
tensor cores, so one's exponentials run while the other's matmuls do. exp2 is the hardware approximation.

Forward only (`kernels.forward_only`): a differentiated call runs the caller's reference (cuDNN or XLA).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from graft_jax.operators.kernels import batch_partitioned, forward_only, on_hopper, sixteen_bit

_F32 = jnp.float32
_GRAIN = 16  # heads are padded to a multiple of this many channels (wgmma's k step)
# The widest padded head: at 256 keys x 2 stages, k and v take 160 KB of shared memory at 80 channels (a Hopper SM
# has 227 KB), and a compute warpgroup's registers hold the (64, 256) logits, their bf16 copy and the (64, 80)
# output; wider heads would need other tiles, which nothing here has measured.
_WIDEST = 80


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Queries a compute warpgroup takes (wgmma's M is 64), keys a step, k/v stages in flight. Chosen on an H200 at
  PixArt's 2 x 16,384 tokens, heads of 72 (ms): 256 keys x 2 stages 5.09, 128 x 3 5.49, 128 x 4 5.50, 64 x 6 6.52;
  256 x 3 does not fit in shared memory. Sequences of fewer than two steps of 256 take 128 keys a step."""
  block_q: int = 64
  block_kv: int = 256
  stages: int = 2

  @classmethod
  def for_tokens(cls, n: int) -> Tiles:
    return cls() if n % 256 == 0 and n >= 512 else cls(block_kv=128)


def fits(q_shape, k_shape, dtype, tiles: Tiles | None = None) -> bool:
  """16-bit (B, N, H, d) self-attention operands with heads of at most _WIDEST channels, on whole tiles: the kernel
  has no edge masks."""
  b, n, h, d = q_shape
  tiles = tiles or Tiles.for_tokens(n)
  return (sixteen_bit(dtype) and tuple(k_shape) == tuple(q_shape) and d <= _WIDEST
          and n % (2 * tiles.block_q) == 0 and n % tiles.block_kv == 0 and n // tiles.block_kv >= tiles.stages)


def supported(q_shape, k_shape, dtype, tiles: Tiles | None = None) -> bool:
  """`fits`, on Hopper GPUs (`kernels.on_hopper`)."""
  return on_hopper() and fits(q_shape, k_shape, dtype, tiles)


def pays_off(q_shape) -> bool:
  """Where `auto` takes the kernel over cuDNN, from benchmarks/hopper_attention.py on an H200 (16 heads of 72, bf16;
  the whole MHA forward, the kernel's with its padded projections): 2 x 16,384 tokens 5.95 against 7.35 ms, 2 x
  4,096 0.560 against 0.607, but 64 x 1,024 2.14 against 1.88 and 256 x 256 1.59 against 1.31. So: sequences of
  4,096 tokens and more, and heads cuDNN rounds up (not a multiple of 64)."""
  return q_shape[1] >= 4096 and q_shape[-1] % 64 != 0


def _kernel_call(q, k, v, tiles: Tiles, head_dim: int):
  """The kernel on (B, N, H, p) operands whose heads are zero-padded from head_dim to p (a multiple of 16)."""
  b, n, h, p = q.shape
  bq, bkv, stages = tiles.block_q, tiles.block_kv, tiles.stages
  steps = n // bkv
  # Logits in base 2: exp(s / sqrt(d)) = exp2(s * c).
  c = math.log2(math.e) / math.sqrt(head_dim)
  # wgmma reads shared memory as 8-row tiles of swizzled rows; rows of 16 channels (32 bytes) tile any padded head.
  transforms = (plgpu.TilingTransform((8, _GRAIN)), plgpu.SwizzleTransform(_GRAIN * jnp.dtype(q.dtype).itemsize))

  def body(q_ref, k_ref, v_ref, o_ref, smem, loaded, freed, turn):
    q_smem, k_smem, v_smem = smem
    q_loaded, k_loaded, v_loaded = loaded
    k_freed, v_freed = freed
    wg = lax.axis_index("wg")
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      rows = pl.ds(lax.axis_index("q_tiles") * 2 * bq + wg * bq, bq)
      q_tile = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_tile, q_loaded.at[wg])
      plgpu.barrier_wait(q_loaded.at[wg])

      row_stat = lambda value: plgpu.layout_cast(jnp.full((bq,), value, _F32), plgpu.Layout.WGMMA.reduce(1))
      plgpu.barrier_wait(k_loaded.at[0])
      pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first

      def step(i, carry):
        o, m, l = carry
        slot = lax.rem(i, stages)

        def logits(acc):
          plgpu.wgmma(acc, q_tile, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          take_turn()
          return acc[...]
        s = pl.run_scoped(logits, plgpu.ACC((bq, bkv), _F32))
        plgpu.barrier_arrive(k_freed.at[slot])

        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        e = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, (0,)))
        l = l * alpha + e.sum(axis=1)
        o = o * lax.broadcast_in_dim(alpha, o.shape, (0,))
        e = e.astype(q.dtype)
        # Keeps the rescale and the cast from sinking past the hand-over: this warpgroup's exponentials finish
        # before the other one's matmuls start.
        o, l, m_new, e = lax.optimization_barrier((o, l, m_new, e))
        plgpu.barrier_arrive(turn)  # done with the exponentials: the other warpgroup's matmuls may go
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_wait(turn)

        def values(acc):
          plgpu.wgmma(acc, e, v_smem.at[slot])

          @pl.when(i + 1 < steps)
          def _():
            plgpu.barrier_wait(k_loaded.at[lax.rem(i + 1, stages)])
        o = pl.run_state(values)(plgpu.ACC.init(o))
        plgpu.barrier_arrive(v_freed.at[slot])
        return o, m_new, l

      o = plgpu.layout_cast(jnp.zeros((bq, p), _F32), plgpu.Layout.WGMMA)
      o, _, l = lax.fori_loop(0, steps, step, (o, row_stat(-jnp.inf), row_stat(0.0)))
      pl.when(wg == 0)(take_turn)  # the turn warpgroup 1 took before its loop

      # q's tile is free once the loop ends: the output is staged there for its TMA store.
      q_tile[...] = (o * lax.broadcast_in_dim(1.0 / l, o.shape, (0,))).astype(q.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(i, slot):
        keys = pl.ds(i * bkv, bkv)
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, head], k_smem.at[slot], k_loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, head], v_smem.at[slot], v_loaded.at[slot])

      for i in range(stages):
        fetch(i, i)

      @pl.loop(stages, steps)
      def _(i):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(k_freed.at[slot])
        plgpu.barrier_wait(v_freed.at[slot])
        fetch(i, slot)

  def entry(q_ref, k_ref, v_ref, o_ref):
    smem = [plgpu.SMEM((2, bq, p), q.dtype, transforms=transforms)]
    smem += [plgpu.SMEM((stages, bkv, p), q.dtype, transforms=transforms)] * 2
    pl.run_scoped(
        functools.partial(body, q_ref, k_ref, v_ref, o_ref), smem,
        (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,  # both compute warpgroups are done with a slot
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(h, n // (2 * bq), b),
      grid_names=("heads", "q_tiles", "batch"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))(q, k, v)


def padded_width(head_dim: int) -> int:
  """The kernel's head width for heads of head_dim channels: the next multiple of _GRAIN."""
  return -(-head_dim // _GRAIN) * _GRAIN


def attention(q, k, v, head_dim: int, reference, *, tiles: Tiles | None = None):
  """softmax(q k^T / sqrt(head_dim)) v for (B, N, H, p) 16-bit q, k, v whose heads are zero-padded from head_dim to
  p = padded_width(head_dim) channels (zero channels add nothing to the logits and come out zero), through the
  kernel; it compiles only for a Hopper GPU (`supported`). `reference(q, k, v)` computes the same on the padded
  operands: differentiated calls run it, as do batch shards whose shapes do not `fit` (under a sharded jit
  `supported` saw only the global shape). The attention module passes it in: it cannot be imported from here
  without a cycle."""
  if q.shape[-1] != padded_width(head_dim):
    raise ValueError(f"heads of {head_dim} take {padded_width(head_dim)} channels here, got {q.shape[-1]}")

  def call(q, k, v):  # sized by its operands: under a sharded jit, one device's batch shard
    shard_tiles = tiles or Tiles.for_tokens(q.shape[1])
    if fits(q.shape, k.shape, q.dtype, shard_tiles):
      return _kernel_call(q, k, v, shard_tiles, head_dim)
    return reference(q, k, v)
  return forward_only(batch_partitioned(call), reference)(q, k, v)
