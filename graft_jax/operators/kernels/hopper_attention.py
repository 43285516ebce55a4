"""Self-attention forward for heads of up to 80 channels (DiT's and PixArt's 72) as one Mosaic GPU kernel for Hopper.

cuDNN runs a head of 72 on tiles of 128 channels: on an H200 it takes 6.6-6.8 ms at PixArt's 2048 px (B=2,
N=16,384, 16 heads), against 4.71 ms for a head of 64. Here a head costs what one of 80 does (the next multiple of
16, wgmma's k step). At 2 x 16,384 tokens it takes 5.34 ms against cuDNN's 6.77 (benchmarks/hopper_attention.py,
hopper_attention.json).

Operands: q, k and v as the projections write them, heads of 72 back to back. Mosaic's TMA cuts boxes whose minor
side starts on a multiple of the 16-channel tile (8-row tiles of 32-byte swizzled rows, which wgmma reads), and
72 h is one only for even h. So head h is read as the 80-channel `Windows` box starting at the multiple of 16 at or
below 72 h: its own channels sit at offset 0 (even h) or 8 (odd h), the other 8 belong to a neighbour. Zeroing
those in q (once per program) leaves q k^T exact; p v then carries the neighbour's 8 values, which are zeroed too,
and the output is written as `width`-channel slots, each head at its offset (`to_slots`): MHA's output projection
takes slots through rows of zeros, which costs 11% more FLOPs on that one matmul. Padding q, k and v in their
weights instead made all four projections 11% wider and q's bias a pass of its own; against that (one H200 call)
the whole MHA forward is as fast at 2 x 16,384 tokens (5.88 against 5.87 ms, though the kernel alone reads its
windows 4% slower: 5.38 against 5.18) and faster at 2 x 4,096 (0.556 against 0.591).

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
_GRAIN = 16  # TMA boxes start on, and wgmma's k steps through, multiples of this many channels
# The widest window: at 256 keys x 2 stages, k and v take 160 KB of shared memory at 80 channels (a Hopper SM has
# 227 KB), and a compute warpgroup's registers hold the (64, 256) logits, their bf16 copy and the (64, 80) output;
# wider ones would need other tiles, which nothing here has measured.
_WIDEST = 80


@dataclasses.dataclass(frozen=True)
class Windows:
  """Where the kernel reads each of `num_heads` heads of `head_dim` channels, laid back to back: head h is the
  `width`-channel box starting at `starts[h]`, the multiple of _GRAIN at or below h * head_dim, with its own
  channels at `offsets[h]` in it; the output holds each head in a slot of `width` channels at the same offset.
  Every `group` heads span a whole number of _GRAIN channels, so the kernel sees the channels as groups and cuts
  each head's box at one of `group` static places in its group (Mosaic checks a box's alignment statically)."""
  num_heads: int
  head_dim: int

  @property
  def group(self) -> int:
    return _GRAIN // math.gcd(self.head_dim, _GRAIN)

  @property
  def offsets(self) -> tuple[int, ...]:
    return tuple(h * self.head_dim % _GRAIN for h in range(self.num_heads))

  @property
  def starts(self) -> tuple[int, ...]:
    return tuple(h * self.head_dim - off for h, off in enumerate(self.offsets))

  @property
  def width(self) -> int:
    return -(-(self.head_dim + max(self.offsets)) // _GRAIN) * _GRAIN

  @property
  def exact(self) -> bool:
    """Whether every window is its head alone (head_dim a multiple of _GRAIN): nothing to zero."""
    return self.width == self.head_dim

  def fit(self) -> bool:
    """Whole groups, no box reaching past its group, none wider than _WIDEST."""
    span = self.group * self.head_dim
    return (self.num_heads % self.group == 0 and self.width <= _WIDEST
            and all(start + self.width <= span for start in self.starts[:self.group]))


def to_slots(a: jax.Array, num_heads: int, axis: int = -1) -> jax.Array:
  """a with the num_heads heads along `axis` (num_heads x head_dim channels, back to back) moved into the kernel's
  output slots (num_heads x `Windows.width`, each head at its offset, zeros around it): what the kernel writes, for
  a reference output, and the layout of the output projection's rows."""
  axis = axis % a.ndim
  windows = Windows(num_heads, a.shape[axis] // num_heads)
  d, width = windows.head_dim, windows.width
  a = jnp.moveaxis(a, axis, -1)
  heads = a.reshape(*a.shape[:-1], num_heads, d)
  slots = jnp.stack([jnp.pad(heads[..., h, :], [(0, 0)] * (a.ndim - 1) + [(off, width - off - d)])
                     for h, off in enumerate(windows.offsets)], axis=-2)
  return jnp.moveaxis(slots.reshape(*a.shape[:-1], num_heads * width), -1, axis)


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
  """16-bit (B, N, H, d) self-attention operands whose heads the `Windows` can read, on whole tiles: the kernel has
  no edge masks."""
  b, n, h, d = q_shape
  tiles = tiles or Tiles.for_tokens(n)
  return (sixteen_bit(dtype) and tuple(k_shape) == tuple(q_shape) and Windows(h, d).fit()
          and n % (2 * tiles.block_q) == 0 and n % tiles.block_kv == 0 and n // tiles.block_kv >= tiles.stages)


def supported(q_shape, k_shape, dtype, tiles: Tiles | None = None) -> bool:
  """`fits`, on Hopper GPUs (`kernels.on_hopper`)."""
  return on_hopper() and fits(q_shape, k_shape, dtype, tiles)


def pays_off(q_shape) -> bool:
  """Where `auto` takes the kernel over cuDNN, from benchmarks/hopper_attention.py on an H200 (16 heads of 72, bf16;
  the whole MHA forward): 2 x 16,384 tokens 5.87 against 7.34 ms, 2 x 4,096 0.557 against 0.600, but 64 x 1,024
  2.03 against 1.98 and 256 x 256 1.50 against 1.33. So: sequences of 4,096 tokens and more, and heads cuDNN rounds
  up (not a multiple of 64)."""
  return q_shape[1] >= 4096 and q_shape[-1] % 64 != 0


def _kernel_call(q, k, v, tiles: Tiles):
  """The kernel on (B, N, H, d) operands whose `Windows` fit; the output in slots, (B, N, H, width)."""
  b, n, h, d = q.shape
  windows = Windows(h, d)
  p, g = windows.width, windows.group
  bq, bkv, stages = tiles.block_q, tiles.block_kv, tiles.stages
  steps = n // bkv
  # Logits in base 2: exp(s / sqrt(d)) = exp2(s * c).
  c = math.log2(math.e) / math.sqrt(d)
  # wgmma reads shared memory as 8-row tiles of swizzled rows; rows of 16 channels (32 bytes) tile any window.
  transforms = (plgpu.TilingTransform((8, _GRAIN)), plgpu.SwizzleTransform(_GRAIN * jnp.dtype(q.dtype).itemsize))

  def body(q_ref, k_ref, v_ref, o_ref, smem, loaded, freed, turn):
    q_smem, k_smem, v_smem = smem
    q_loaded, k_loaded, v_loaded = loaded
    k_freed, v_freed = freed
    wg = lax.axis_index("wg")
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    offset = lax.rem(head * d, _GRAIN)

    def copy_window(ref, rows, dst, barrier):
      """TMA of this head's window of `rows` of a (B, N, groups, group * d) operand into dst."""
      for j, start in enumerate(windows.starts[:g]):  # the first group's starts: every group's, within it
        @pl.when(lax.rem(head, g) == j)
        def _():
          plgpu.copy_gmem_to_smem(ref.at[batch, rows, lax.div(head, g), pl.ds(start, p)], dst, barrier)

    def own_channels(rows):
      """Where a (rows, p) tile holds this head's channels, not a neighbour's."""
      channel = plgpu.broadcasted_iota(jnp.int32, (rows, p), 1, layout=plgpu.Layout.WGMMA)
      return (channel >= offset) & (channel < offset + d)

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      rows = pl.ds(lax.axis_index("q_tiles") * 2 * bq + wg * bq, bq)
      q_tile = q_smem.at[wg]
      copy_window(q_ref, rows, q_tile, q_loaded.at[wg])
      plgpu.barrier_wait(q_loaded.at[wg])
      if not windows.exact:  # the neighbour's channels out of q, so they add nothing to the logits
        q_tile[...] = jnp.where(own_channels(bq), q_tile[...], 0)
        plgpu.commit_smem()

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

      o = o * lax.broadcast_in_dim(1.0 / l, o.shape, (0,))
      if not windows.exact:  # p v's channels from the neighbour's values
        o = jnp.where(own_channels(bq), o, 0.0)
      # q's tile is free once the loop ends: the output is staged there for its TMA store.
      q_tile[...] = o.astype(q.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(i, slot):
        keys = pl.ds(i * bkv, bkv)
        copy_window(k_ref, keys, k_smem.at[slot], k_loaded.at[slot])
        copy_window(v_ref, keys, v_smem.at[slot], v_loaded.at[slot])

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

  grouped = lambda a: a.reshape(b, n, h // g, g * d)
  return plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, h, p), q.dtype), grid=(h, n // (2 * bq), b),
      grid_names=("heads", "q_tiles", "batch"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))(grouped(q), grouped(k), grouped(v))


def attention(q, k, v, reference, *, tiles: Tiles | None = None):
  """softmax(q k^T / sqrt(d)) v for (B, N, H, d) 16-bit q, k, v, through the kernel, in its output slots
  (B, N, H, `Windows.width`; `to_slots`); it compiles only for a Hopper GPU (`supported`). `reference(q, k, v)`
  computes the same, unslotted: differentiated calls run it, as do batch shards whose shapes do not `fit` (under a
  sharded jit `supported` saw only the global shape). The attention module passes it in: it cannot be imported from
  here without a cycle."""
  def slotted_reference(q, k, v):
    b, n, h, d = q.shape
    return to_slots(reference(q, k, v).reshape(b, n, h * d), h).reshape(b, n, h, -1)

  def call(q, k, v):  # sized by its operands: under a sharded jit, one device's batch shard
    shard_tiles = tiles or Tiles.for_tokens(q.shape[1])
    if fits(q.shape, k.shape, q.dtype, shard_tiles):
      return _kernel_call(q, k, v, shard_tiles)
    return slotted_reference(q, k, v)
  return forward_only(batch_partitioned(call), slotted_reference)(q, k, v)
