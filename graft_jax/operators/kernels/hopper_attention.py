"""Self-attention forward for heads of up to 80 channels (DiT's and PixArt's 72) as one Mosaic GPU kernel for Hopper.

cuDNN runs a head of 72 on tiles of 128 channels: on an H200 it takes 6.9 ms at PixArt's 2048 px (B=2, N=16,384,
16 heads), against 4.71 ms for a head of 64. Here a head costs what one of 80 does (the next multiple of 16, wgmma's
k step): 5.12 ms there, and 0.29 against cuDNN's 0.34 ms at DiT-XL/2's 256 x 256 tokens (benchmarks/
hopper_attention.py, hopper_attention.json).

Operands and output as the projections write and read them: q, k and v side by side in one (B, N, 3, H, d) array,
the output of one fused projection matmul (0.67 ms against 0.71 for three at DiT-XL/2's 65,536 tokens on an H200),
and the output (B, N, H, d); heads of 72 back to back. The projection leaves q's bias to the kernel, which adds it
to each query tile it loads: XLA puts a bias into cuBLAS's epilogue only as a whole parameter and adds a
concatenated one in a pass of its own (0.94 ms). That rounds q twice (the matmul's bf16 output, then the sum) where
the unfused projection rounds once.

Mosaic's TMA cuts boxes whose minor side starts on a multiple of the 16-channel tile (8-row tiles of 32-byte
swizzled rows, which wgmma reads), and 72 h is one only for even h. So head h is read as the 80-channel `Windows`
box starting at the multiple of 16 at or below 72 h: its own channels sit at offset 0 (even h) or 8 (odd h), the
other 8 belong to a neighbour. Zeroing those in q leaves q k^T exact; p v then carries the neighbour's 8 values in
those columns, which the epilogue drops: it slices the head's own 72 columns out of the registers (wgmma's register
tiles are 8 columns wide) and stores them from plain, unswizzled rows, which TMA may write 144 bytes wide at 72 h.

Structure (FlashAttention-3's, persistent): one program per SM walks work items of 2 x block_q queries of one
(batch, head), query tiles varying fastest so that programs running side by side share a head's keys in L2. Two
compute warpgroups take block_q rows each and keep an online softmax in float32 registers; they load the next
item's queries while they work on this one's, and store each output with TMA without waiting for it. The third
warpgroup streams k and v through one ring of shared-memory stages that runs on across items, so the next item's
keys load while this one finishes. A barrier between the compute warpgroups makes them take turns on the tensor
cores, so one's exponentials run while the other's matmuls do. exp2 is the hardware approximation. Against a
program per item (the previous version), persistence took DiT's 256-token attention from 0.44 to 0.31 ms: an item
there is two steps of 128 keys, too short to hide its own loads and stores.

Forward only (`kernels.forward_only`): a differentiated call runs the caller's reference (cuDNN or XLA).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from graft_jax.operators.kernels import batch_partitioned, forward_only, on_hopper, sixteen_bit, sm_count

_F32 = jnp.float32
_GRAIN = 16  # TMA boxes start on, and wgmma's k steps through, multiples of this many channels
# The widest window: at 256 keys x 2 stages, k and v take 160 KB of shared memory at 80 channels and q's two buffers
# and the output's staging 58 KB more (a Hopper SM has 227 KB), and a compute warpgroup's registers hold the
# (64, 256) logits, their bf16 copy and the (64, 80) output; wider ones would need other tiles, which nothing here
# has measured.
_WIDEST = 80


@dataclasses.dataclass(frozen=True)
class Windows:
  """Where the kernel reads each of `num_heads` heads of `head_dim` channels, laid back to back: head h is the
  `width`-channel box starting at `starts[h]`, the multiple of _GRAIN at or below h * head_dim, with its own
  channels at `offsets[h]` in it. Every `group` heads span a whole number of _GRAIN channels, so the kernel sees
  the channels as groups and cuts each head's box (and stores its output) at one of `group` static places in its
  group (Mosaic checks a box's alignment statically)."""
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

  def bias_rows(self, q_bias, dtype) -> jax.Array:
    """(num_heads rounded up to 4, width): row h is q's (num_heads, head_dim) bias laid where head h's own channels
    sit in its window, zeros on the neighbour's, so a kernel adds it to a window whatever the head's place: the
    backward kernels need the bias as a value outside the places' branches. (The forward keeps one row per group,
    read in each place's branch: the layout it was timed with.)"""
    d, p = self.head_dim, self.width
    rows = [jnp.pad(q_bias[h], (off, p - d - off)) for h, off in enumerate(self.offsets)]
    # Whole 128-byte lines (4 rows of a multiple of 32 bytes): a warpgroup's copy of them moves a multiple of 128.
    rows += [jnp.zeros(p, q_bias.dtype)] * (-len(rows) % 4)
    return jnp.stack(rows).astype(dtype)

  def fit(self) -> bool:
    """Whole groups, no box reaching past its group, none wider than _WIDEST, and heads of a multiple of 8 channels
    (the output is sliced out of 8-column register tiles and stored in rows of a multiple of 16 bytes)."""
    span = self.group * self.head_dim
    return (self.num_heads % self.group == 0 and self.width <= _WIDEST and self.head_dim % 8 == 0
            and all(start + self.width <= span for start in self.starts[:self.group]))


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Queries a compute warpgroup takes (wgmma's M is 64), keys a step, k/v stages in flight. Chosen on an H200,
  heads of 72 (ms): at PixArt's 2 x 16,384 tokens 256 keys x 2 stages 5.09, 128 x 3 5.49, 128 x 4 5.50, 64 x 6
  6.52 (256 x 3 does not fit in shared memory); at DiT's 256 x 256 tokens, persistent, 128 x 3 0.292, 128 x 4
  0.299, 256 x 2 0.311, 128 x 2 0.349. Sequences of fewer than two steps of 256 take 128 keys x 3."""
  block_q: int = 64
  block_kv: int = 256
  stages: int = 2

  @classmethod
  def for_tokens(cls, n: int, with_lse: bool = False) -> Tiles:
    """The fastest measured tiles for n tokens; with the log-sum-exp written, never 256 keys x 2 stages: its 512
    bytes of staging do not fit beside them (232,568 bytes of shared memory against Hopper's 232,448)."""
    return cls() if n % 256 == 0 and n >= 512 and not with_lse else cls(block_kv=128, stages=3)


def fits(heads_shape, dtype, tiles: Tiles | None = None) -> bool:
  """16-bit self-attention over (B, N, H, d) heads that the `Windows` can read, on whole tiles: the kernel has no
  edge masks."""
  b, n, h, d = heads_shape
  tiles = tiles or Tiles.for_tokens(n)
  return sixteen_bit(dtype) and Windows(h, d).fit() and n % (2 * tiles.block_q) == 0 and n % tiles.block_kv == 0


def supported(heads_shape, dtype, tiles: Tiles | None = None) -> bool:
  """`fits`, on Hopper GPUs (`kernels.on_hopper`)."""
  return on_hopper() and fits(heads_shape, dtype, tiles)


def pays_off(heads_shape) -> bool:
  """Where `auto` takes the kernel over cuDNN, from benchmarks/hopper_attention.py on an H200 (16 heads of 72, bf16;
  the whole MHA forward, before the packed projection): 2 x 16,384 tokens 5.72 against 7.34 ms, 2 x 4,096 0.537
  against 0.602, 64 x 1,024 1.84 against 1.97, 256 x 256 1.318 against 1.321. With the projection packed into one
  matmul the kernel takes DiT-XL/2's whole batch-256 forward (256 tokens) from 112.8-113.9 to 110.0-110.9 ms
  (with the clustered fc1 + GELU kernel; ad-hoc script, 2026-11-29). So: sequences of 256 tokens and more, and heads
  cuDNN rounds up (not a multiple of 64)."""
  return heads_shape[1] >= 256 and heads_shape[-1] % 64 != 0


def items_of(program, programs: int, items: int):
  """How many of `items` work items program `program` of `programs` takes: items program, program + programs, ..."""
  return lax.div(items, programs) + (program < items % programs).astype(jnp.int32)


def work_item(program, programs: int, j, heads: int, q_tiles: int):
  """(batch, head, query tile) of program `program`'s j-th work item. Query tiles vary fastest, so the programs
  running side by side share a head's keys and values in L2."""
  index = j * programs + program
  return lax.div(index, q_tiles * heads), lax.rem(lax.div(index, q_tiles), heads), lax.rem(index, q_tiles)


def first_rows(j, heads: int, tiles_per_head: int, rows: int):
  """(batch, head, first row) of this program's j-th work item of 2 x `rows` rows (a compute warpgroup's each), in
  `work_item`'s order; the forward's and the backward kernels' programs walk their items with it."""
  batch, head, tile = work_item(lax.axis_index("sm"), lax.axis_size("sm"), j, heads, tiles_per_head)
  return batch, head, tile * 2 * rows


def ring_rows(item, ring, steps: int, block: int):
  """(batch, head, rows) of a program's ring step `ring`: its work item's (batch, head), item(ring // steps), and
  the step's `block` rows of the other side (keys, or queries in the dk/dv kernel)."""
  batch, head, _ = item(lax.div(ring, steps))
  return batch, head, pl.ds(lax.rem(ring, steps) * block, block)


COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True)  # exp2 as the hardware approximation


def program_grid(count: int) -> dict:
  """`count` persistent programs (one an SM, at most one an item), three warpgroups: two compute, one memory."""
  return dict(grid=(count,), grid_names=("sm",), num_threads=3, thread_name="wg")


def launch(entry, out_type, count: int):
  """entry(*input refs, *output refs) on `program_grid(count)`: the forward's and the backward kernels' launch."""
  return plgpu.kernel(entry, out_type=out_type, compiler_params=COMPILER_PARAMS, **program_grid(count))


@dataclasses.dataclass(frozen=True)
class HeadIO:
  """How the kernels (this forward, `hopper_attention_grad`'s backward) move heads between memory and registers:
  operands are (B, N, parts * h // g, g * d) views of (B, N, parts, H, d) arrays (q, k and v packed: 3 parts; o
  and its gradient: 1), read by `Windows`."""
  windows: Windows
  dtype: Any

  @property
  def transforms(self):
    """wgmma reads shared memory as 8-row tiles of swizzled rows; rows of 16 channels (32 bytes) tile any window."""
    itemsize = jnp.dtype(self.dtype).itemsize
    return plgpu.TilingTransform((8, _GRAIN)), plgpu.SwizzleTransform(_GRAIN * itemsize)

  def view(self, a, parts: int):
    """A (B, N, parts, H, d) or (B, N, H, d) array as the kernels' (B, N, parts * h // g, g * d) operand."""
    w = self.windows
    return a.reshape(a.shape[0], a.shape[1], parts * w.num_heads // w.group, w.group * w.head_dim)

  def at_place(self, head, fn):
    """fn(place) for `head`'s place in its group, as a static int: Mosaic checks box alignment statically, so each
    of the group's places gets its own branch (the first group's starts and offsets serve every group)."""
    for place in range(self.windows.group):
      pl.when(lax.rem(head, self.windows.group) == place)(functools.partial(fn, place))

  def copy_window(self, ref, part: int, parts: int, batch, head, rows, dst, barrier):
    """TMA of `head`'s window of `rows` of part `part` of a `view` with `parts` parts into dst."""
    w = self.windows
    self.at_place(head, lambda place: plgpu.copy_gmem_to_smem(
        ref.at[batch, rows, part * (w.num_heads // w.group) + lax.div(head, w.group), pl.ds(w.starts[place], w.width)],
        dst, barrier))

  def own_channels(self, head, rows: int):
    """Where a (rows, width) tile in registers holds `head`'s channels, not a neighbour's."""
    offset = lax.rem(head * self.windows.head_dim, _GRAIN)
    channel = plgpu.broadcasted_iota(jnp.int32, (rows, self.windows.width), 1, layout=plgpu.Layout.WGMMA)
    return (channel >= offset) & (channel < offset + self.windows.head_dim)

  def bias_row(self, bias_smem, head):
    """Row `head` of `Windows.bias_rows` in shared memory, as a row vector to broadcast over a tile's rows."""
    return plgpu.load(bias_smem.at[head], (), layout=plgpu.Layout.WGMMA.reduce(0))

  def store_own(self, tile, staging, out_ref, batch, rows, head, part: int = 0, parts: int = 1):
    """The head's own channels of a (rows, width) float32 tile, cast, through `staging` (rows, head_dim; plain rows,
    which TMA may write 144 bytes wide at 72 h) into part `part` of a `view`, without waiting for the store (the
    other channels of a window are the neighbour's: zero, or carrying the neighbour's values)."""
    w = self.windows

    def store(place):
      offset = w.offsets[place]
      staging[...] = tile[:, offset:offset + w.head_dim].astype(self.dtype)
      plgpu.commit_smem()
      group = part * (w.num_heads // w.group) + lax.div(head, w.group)
      plgpu.copy_smem_to_gmem(staging, out_ref.at[batch, rows, group, pl.ds(place * w.head_dim, w.head_dim)])
    self.at_place(head, store)


def _kernel_call(qkv, q_bias, tiles: Tiles, num_sms: int, with_lse: bool = False):
  """The kernel on a (B, N, 3, H, d) operand whose `Windows` fit and q's (H, d) bias, on `num_sms` persistent
  programs: o (B, N, H, d), and `with_lse` each row's log-sum-exp (B, H, N) float32, in base 2 of the logits times
  log2(e) / sqrt(d) (what the backward kernels exponentiate)."""
  b, n, _, h, d = qkv.shape
  dtype = qkv.dtype
  io = HeadIO(Windows(h, d), dtype)
  p, g = io.windows.width, io.windows.group
  bq, bkv, stages = tiles.block_q, tiles.block_kv, tiles.stages
  # q's bias a group a row, padded to whole 128-byte lines: a warpgroup's copy moves a multiple of 128 bytes.
  line = 128 // jnp.dtype(dtype).itemsize
  bias_row = -(-g * d // line) * line
  steps, q_tiles = n // bkv, n // (2 * bq)
  items = b * h * q_tiles
  # Logits in base 2: exp(s / sqrt(d)) = exp2(s * c).
  c = math.log2(math.e) / math.sqrt(d)

  item = functools.partial(first_rows, heads=h, tiles_per_head=q_tiles, rows=bq)  # (batch, head, first query)

  def body(qkv_ref, bias_ref, o_ref, lse_ref, smem, loaded, freed, turn):
    q_smem, o_smem, lse_smem, k_smem, v_smem, bias_smem = smem
    q_loaded, k_loaded, v_loaded, bias_loaded = loaded
    k_freed, v_freed = freed
    wg = lax.axis_index("wg")
    count = items_of(lax.axis_index("sm"), lax.axis_size("sm"), items)
    total = count * steps  # this program's key steps, which go through one ring of stages across items

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when((wg < 2) & (count > 0))
    def _compute():
      plgpu.set_max_registers(232, action="increase")

      def load_q(j):
        """This warpgroup's queries of item j, into buffer j % 2 (the next item's load overlaps this one)."""
        batch, head, first = item(j)
        buf = lax.rem(j, 2)
        io.copy_window(qkv_ref, 0, 3, batch, head, pl.ds(first + wg * bq, bq), q_smem.at[buf, wg],
                       q_loaded.at[buf, wg])

      row_stat = lambda value: plgpu.layout_cast(jnp.full((bq,), value, _F32), plgpu.Layout.WGMMA.reduce(1))
      plgpu.copy_gmem_to_smem(bias_ref, bias_smem.at[wg], bias_loaded.at[wg])
      load_q(0)
      plgpu.barrier_wait(bias_loaded.at[wg])
      plgpu.barrier_wait(k_loaded.at[0])
      pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first

      @pl.loop(0, count)
      def _(j):
        batch, head, first = item(j)
        buf = lax.rem(j, 2)
        pl.when(j + 1 < count)(lambda: load_q(j + 1))
        q_tile = q_smem.at[buf, wg]
        plgpu.barrier_wait(q_loaded.at[buf, wg])

        def finish_q(place):
          """q's bias added and, where the window is wider than the head, the neighbour's channels zeroed."""
          bias = plgpu.load(bias_smem.at[wg, lax.div(head, g), pl.ds(io.windows.starts[place], p)], (),
                            layout=plgpu.Layout.WGMMA.reduce(0))
          q = q_tile[...] + lax.broadcast_in_dim(bias, (bq, p), (1,))
          # The neighbour's channels out of q, so they add nothing to the logits.
          q_tile[...] = q if io.windows.exact else jnp.where(io.own_channels(head, bq), q, 0)
        io.at_place(head, finish_q)
        plgpu.commit_smem()

        def step(i, carry):
          o, m, l = carry
          ring = j * steps + i  # this program's key step
          slot = lax.rem(ring, stages)

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
          e = e.astype(dtype)
          # Keeps the rescale and the cast from sinking past the hand-over: this warpgroup's exponentials finish
          # before the other one's matmuls start.
          o, l, m_new, e = lax.optimization_barrier((o, l, m_new, e))
          plgpu.barrier_arrive(turn)  # done with the exponentials: the other warpgroup's matmuls may go
          plgpu.barrier_wait(v_loaded.at[slot])
          plgpu.barrier_wait(turn)

          def values(acc):
            plgpu.wgmma(acc, e, v_smem.at[slot])

            @pl.when(ring + 1 < total)
            def _():
              plgpu.barrier_wait(k_loaded.at[lax.rem(ring + 1, stages)])
          o = pl.run_state(values)(plgpu.ACC.init(o))
          plgpu.barrier_arrive(v_freed.at[slot])
          return o, m_new, l

        o = plgpu.layout_cast(jnp.zeros((bq, p), _F32), plgpu.Layout.WGMMA)
        o, m, l = lax.fori_loop(0, steps, step, (o, row_stat(-jnp.inf), row_stat(0.0)))
        o = o * lax.broadcast_in_dim(1.0 / l, o.shape, (0,))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read the staging
        rows = pl.ds(first + wg * bq, bq)
        io.store_own(o, o_smem.at[wg], o_ref, batch, rows, head)
        if with_lse:
          lse_smem.at[wg][...] = m + jnp.log2(l)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])

      pl.when(wg == 0)(take_turn)  # the turn warpgroup 1 took before its loop
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(ring):
        batch, head, keys = ring_rows(item, ring, steps, bkv)
        slot = lax.rem(ring, stages)
        io.copy_window(qkv_ref, 1, 3, batch, head, keys, k_smem.at[slot], k_loaded.at[slot])
        io.copy_window(qkv_ref, 2, 3, batch, head, keys, v_smem.at[slot], v_loaded.at[slot])

      for ring in range(stages):
        pl.when(ring < total)(functools.partial(fetch, ring))

      @pl.loop(stages, total)
      def _(ring):
        slot = lax.rem(ring, stages)
        plgpu.barrier_wait(k_freed.at[slot])
        plgpu.barrier_wait(v_freed.at[slot])
        fetch(ring)

  def entry(qkv_ref, bias_ref, o_ref, lse_ref=None):
    smem = [plgpu.SMEM((2, 2, bq, p), dtype, transforms=io.transforms),  # queries: (buffer, warpgroup)
            plgpu.SMEM((2, bq, d), dtype)]  # output staging, a tile a warpgroup
    smem += [plgpu.SMEM((2, bq), _F32) if with_lse else None]  # log-sum-exp staging, only where it is written
    smem += [plgpu.SMEM((stages, bkv, p), dtype, transforms=io.transforms)] * 2
    smem += [plgpu.SMEM((2, h // g, bias_row), dtype)]  # q's whole bias, a copy a warpgroup
    pl.run_scoped(
        functools.partial(body, qkv_ref, bias_ref, o_ref, lse_ref), smem,
        (plgpu.Barrier(num_barriers=(2, 2)), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,  # both compute warpgroups are done with a slot
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg")

  o_type = jax.ShapeDtypeStruct((b, n, h // g, g * d), dtype)
  out_type = (o_type, jax.ShapeDtypeStruct((b, h, n), _F32)) if with_lse else o_type
  call = launch(entry, out_type, min(num_sms, items))
  bias = jnp.pad(q_bias.astype(dtype).reshape(h // g, g * d), ((0, 0), (0, bias_row - g * d)))
  out = call(io.view(qkv, 3), bias)
  if with_lse:
    return out[0].reshape(b, n, h, d), out[1]
  return out.reshape(b, n, h, d)


def unpacked(qkv, q_bias, attend):
  """attend(q, k, v) on the packed (B, N, 3, H, d) operand with q's (H, d) bias added: what the kernels compute."""
  return attend(qkv[:, :, 0] + q_bias.astype(qkv.dtype), qkv[:, :, 1], qkv[:, :, 2])


def attention(qkv, q_bias, reference, *, tiles: Tiles | None = None, num_sms: int | None = None):
  """softmax(q k^T / sqrt(d)) v with q = qkv[:, :, 0] + q_bias, k, v = qkv[:, :, 1], qkv[:, :, 2], for a 16-bit
  (B, N, 3, H, d) qkv and q's (H, d) bias, through the kernel; it compiles only for a Hopper GPU (`supported`).
  `reference(q, k, v)` computes the same: differentiated calls run it, as do batch shards whose shapes do not `fit`
  (under a sharded jit `supported` saw only the global shape). `num_sms` (persistent programs) defaults to the
  device's SM count. The attention module passes `reference` in: it cannot be imported from here without a cycle."""
  unfused = functools.partial(unpacked, attend=reference)

  def call(qkv, q_bias):  # sized by its operands: under a sharded jit, one device's batch shard
    heads_shape = qkv.shape[:2] + qkv.shape[3:]
    shard_tiles = tiles or Tiles.for_tokens(qkv.shape[1])
    if fits(heads_shape, qkv.dtype, shard_tiles):
      return _kernel_call(qkv, q_bias, shard_tiles, num_sms or sm_count())
    return unfused(qkv, q_bias)
  return forward_only(batch_partitioned(call, replicated=(1,)), unfused)(qkv, q_bias)
