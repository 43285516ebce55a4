"""The backward of `hopper_attention`'s self-attention as two Mosaic GPU kernels for Hopper, on its head windows.

cuDNN's backward runs a head of 72 on tiles of 128 channels, after a pass of its own for dO . O and before one that
converts dq from float32: at DiT-XL/2's batch-256 step on an H200 the three take about 1.35 ms a layer. Here heads
cost what ones of 80 do (`Windows`), FlashAttention-2's way round atomics: one kernel per block of queries writes
dq, one per block of keys writes dk and dv, each recomputing the probabilities from q, k and the forward's
log-sum-exp. The dq kernel also computes each query's delta = dO . O, which the dk/dv kernel reads.

q arrives without its bias (the forward adds it as it loads q). The dq kernel adds it to its query tiles as the
forward does; the dk/dv kernel streams q as stored, so it adds k_j . b to key j's logits and b sum_i dS_ij to its dk
(dk_j = sum_i dS_ij (q_i + b)). Windows carry the neighbour's 8 channels: zeroing them in q and dO (dq kernel) or in
k and v (dk/dv kernel) keeps every contraction over channels exact, and the outputs' neighbour columns, which then
hold the neighbour's values, are dropped as the forward drops them.

Structure: persistent programs, one an SM, as the forward's: a work item is 2 x 64 rows (queries for dq, keys for dk
and dv) of one (batch, head), a compute warpgroup 64 of them with float32 accumulators, and while it computes, its
next item's rows load into a second buffer. The third warpgroup streams the other side's tiles (k and v; or q, dO
and the per-query statistics) through a ring of shared-memory stages with TMA, running on from one item into the
next. At DiT-XL/2's batch-256 shape on an H200 the two kernels take 1.12 ms persistent against 1.27 with a program
an item (2026-11-30, the same call, equal gradients).
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

from graft_jax.operators.kernels import batch_partitioned, hopper_attention, sm_count
from graft_jax.operators.kernels.hopper_attention import (COMPILER_PARAMS, HeadIO, Windows, first_rows, items_of,
                                                           launch, program_grid, ring_rows)
from graft_jax.operators.remat import kept

_F32 = jnp.float32
_ROWS = 64  # rows (queries or keys) a compute warpgroup owns: wgmma's M


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Keys a dq step takes and its stages; queries a dk/dv step takes and its stages. Chosen on an H200 at DiT-XL/2's
  batch-256 shape (ms, each kernel alone, a program an item): dq 0.540 for 64 keys x 3 stages, 0.569-0.574 for
  128 x 2 or 3; dk/dv 0.661 for 128 queries x 2 stages, 0.677-0.708 for 64 x 2 or 3."""
  dq_block_kv: int = 64
  dq_stages: int = 3
  dkv_block_q: int = 128
  dkv_stages: int = 2


def fits(n: int, tiles: Tiles = Tiles()) -> bool:
  """Whole tiles on both sides (the heads' windows are `hopper_attention.fits`'s to check)."""
  return all(n % size == 0 for size in (2 * _ROWS, tiles.dq_block_kv, tiles.dkv_block_q))


def _launch_in_place(entry, count: int, *operands):
  """entry(*refs) on `hopper_attention.program_grid(count)`, on Refs to `operands`; returns the operands as the kernel
  left them, the ones it wrote in place (Pallas aliases a written Ref's buffer to the result; plgpu.kernel's own Ref
  operands do not lower in jax 0.10)."""
  mesh = plgpu.Mesh(**program_grid(count))
  return pl.run_state(lambda refs: pl.core_map(mesh, compiler_params=COMPILER_PARAMS)(lambda: entry(*refs)))(
      operands)


def _stream(total: int, stages: int, freed, fetch):
  """The memory warpgroup: fetch(ring, slot) of each of this program's `total` steps (its items' steps back to
  back) into slot ring % stages, once both compute warpgroups have arrived at every barrier of `freed` for that
  slot's previous step. The ring runs on across items, so the next item's first tiles load while this one ends."""
  plgpu.set_max_registers(40, action="decrease")

  @pl.loop(0, total)
  def _(ring):
    slot = lax.rem(ring, stages)

    @pl.when(ring >= stages)
    def _():
      for barrier in freed:
        plgpu.barrier_wait(barrier.at[slot])
    fetch(ring, slot)


def _geometry(qkv):
  """(HeadIO, c, scale) for a packed (B, N, 3, H, d) operand: exp2(s * c) = exp(s / sqrt(d)) for logits s, and
  scale = 1 / sqrt(d) takes the logits' gradient to q's and k's."""
  d = qkv.shape[-1]
  return HeadIO(Windows(qkv.shape[3], d), qkv.dtype), math.log2(math.e) / math.sqrt(d), 1 / math.sqrt(d)


def _row_tile(io: HeadIO, rows: int):
  """Shared memory for a compute warpgroup's own tile of `rows`, as wgmma reads it: (buffer, warpgroup, ...), the
  next item's tile loading into the other buffer while this item's is in use."""
  return plgpu.SMEM((2, 2, rows, io.windows.width), io.dtype, transforms=io.transforms)


def _walk(wg, count, size: int, item, load, mine, bias, work):
  """A compute warpgroup's loop over its program's `count` work items: q's bias (`bias`: its ref, this warpgroup's
  shared memory and barrier) copied once, item 0's own rows loading before the loop and item j + 1's while item j
  computes (load(buf, batch, head, rows) into buffer j % 2, arriving on the barriers `mine`), then
  work(j, buf, batch, head, rows) once item j's rows, this warpgroup's `size` of them, have landed."""
  def place(j):
    """(buffer, batch, head, this warpgroup's rows) of item j."""
    batch, head, first = item(j)
    return lax.rem(j, 2), batch, head, pl.ds(first + wg * size, size)

  bias_ref, bias_smem, bias_loaded = bias
  plgpu.copy_gmem_to_smem(bias_ref, bias_smem.at[wg], bias_loaded.at[wg])
  load(*place(0))
  plgpu.barrier_wait(bias_loaded.at[wg])

  @pl.loop(0, count)
  def _(j):
    buf, batch, head, rows = place(j)
    pl.when(j + 1 < count)(lambda: load(*place(j + 1)))
    for bar in mine:
      plgpu.barrier_wait(bar.at[buf, wg])
    work(j, buf, batch, head, rows)


def _dq_call(qkv, o, do, bias_rows, lse, tiles: Tiles, num_sms: int):
  """(dq in part 0 of a 3-part view, parts 1 and 2 left for the dk/dv kernel; delta (B, H, N) float32)."""
  b, n, _, h, d = qkv.shape
  io, c, scale = _geometry(qkv)
  p, bq, bkv, stages = io.windows.width, _ROWS, tiles.dq_block_kv, tiles.dq_stages
  steps, q_tiles = n // bkv, n // (2 * bq)
  items = b * h * q_tiles

  def body(qkv_ref, o_ref, do_ref, bias_ref, lse_ref, dq_ref, delta_ref, smem, mine, bias_loaded, k_loaded,
           v_loaded, k_freed, v_freed):
    q_smem, o_smem, do_smem, staging, lse_smem, delta_smem, k_smem, v_smem, bias_smem = smem
    wg = lax.axis_index("wg")
    count = items_of(lax.axis_index("sm"), lax.axis_size("sm"), items)
    total = count * steps  # this program's key steps, which go through one ring of stages across items
    item = functools.partial(first_rows, heads=h, tiles_per_head=q_tiles, rows=bq)

    @pl.when((wg < 2) & (count > 0))
    def _compute():
      plgpu.set_max_registers(232, action="increase")

      def load(buf, batch, head, rows):
        """This warpgroup's q, o, dO and log-sum-exp rows of an item, into buffer `buf`."""
        for ref, parts, dst, bar in ((qkv_ref, 3, q_smem, mine[0]), (o_ref, 1, o_smem, mine[1]),
                                     (do_ref, 1, do_smem, mine[2])):
          io.copy_window(ref, 0, parts, batch, head, rows, dst.at[buf, wg], bar.at[buf, wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[buf, wg], mine[3].at[buf, wg])

      @functools.partial(_walk, wg, count, bq, item, load, mine, (bias_ref, bias_smem, bias_loaded))
      def _(j, buf, batch, head, rows):
        q_tile, do_tile = q_smem.at[buf, wg], do_smem.at[buf, wg]
        q = q_tile[...] + lax.broadcast_in_dim(io.bias_row(bias_smem.at[wg], head), (bq, p), (1,))
        do = do_tile[...]
        if not io.windows.exact:  # the neighbour's channels out of q and dO: they would enter S and dP
          own = io.own_channels(head, bq)
          q, do = jnp.where(own, q, 0), jnp.where(own, do, 0)
          do_tile[...] = do
        q_tile[...] = q
        plgpu.commit_smem()
        delta = (o_smem.at[buf, wg][...].astype(_F32) * do.astype(_F32)).sum(axis=1)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read the staging
        delta_smem.at[wg][...] = delta
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(delta_smem.at[wg], delta_ref.at[batch, head, rows])
        lse = plgpu.load(lse_smem.at[buf, wg], (), layout=plgpu.Layout.WGMMA.reduce(1))

        def step(i, dq):
          slot = lax.rem(j * steps + i, stages)  # this program's (j * steps + i)-th key step
          plgpu.barrier_wait(k_loaded.at[slot])

          def logits(acc):
            plgpu.wgmma(acc, q_tile, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc[...]
          s = pl.run_scoped(logits, plgpu.ACC((bq, bkv), _F32))
          prob = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, (0,)))
          plgpu.barrier_wait(v_loaded.at[slot])

          def dprob(acc):
            plgpu.wgmma(acc, do_tile, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
            return acc[...]
          dp = pl.run_scoped(dprob, plgpu.ACC((bq, bkv), _F32))
          plgpu.barrier_arrive(v_freed.at[slot])
          ds = prob * (dp - lax.broadcast_in_dim(delta, dp.shape, (0,)))

          def grad(acc):
            plgpu.wgmma(acc, ds.astype(io.dtype), k_smem.at[slot])
          dq = pl.run_state(grad)(plgpu.ACC.init(dq))
          plgpu.barrier_arrive(k_freed.at[slot])
          return dq

        dq = lax.fori_loop(0, steps, step, plgpu.layout_cast(jnp.zeros((bq, p), _F32), plgpu.Layout.WGMMA))
        io.store_own(dq * scale, staging.at[wg], dq_ref, batch, rows, head, part=0, parts=3)

      plgpu.wait_smem_to_gmem(0)

    def fetch(ring, slot):
      batch, head, keys = ring_rows(item, ring, steps, bkv)
      io.copy_window(qkv_ref, 1, 3, batch, head, keys, k_smem.at[slot], k_loaded.at[slot])
      io.copy_window(qkv_ref, 2, 3, batch, head, keys, v_smem.at[slot], v_loaded.at[slot])
    pl.when(wg == 2)(lambda: _stream(total, stages, (k_freed, v_freed), fetch))

  def entry(qkv_ref, o_ref, do_ref, bias_ref, lse_ref, dq_ref, delta_ref):
    smem = [_row_tile(io, bq)] * 3  # q, o, dO
    smem += [plgpu.SMEM((2, bq, d), io.dtype), plgpu.SMEM((2, 2, bq), _F32)]  # dq staging; lse (buffer, warpgroup)
    smem += [plgpu.SMEM((2, bq), _F32)]  # delta staging
    smem += [plgpu.SMEM((stages, bkv, p), io.dtype, transforms=io.transforms)] * 2  # k, v
    smem += [plgpu.SMEM((2, *bias_rows.shape), io.dtype)]
    pl.run_scoped(
        functools.partial(body, qkv_ref, o_ref, do_ref, bias_ref, lse_ref, dq_ref, delta_ref), smem,
        tuple(plgpu.Barrier(num_barriers=(2, 2)) for _ in range(4)),  # q, o, dO, lse of a (buffer, warpgroup)
        plgpu.Barrier(num_barriers=2),  # a warpgroup's bias
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        collective_axes="wg")

  three_parts = jax.ShapeDtypeStruct(io.view(qkv, 3).shape, io.dtype)
  call = launch(entry, (three_parts, jax.ShapeDtypeStruct((b, h, n), _F32)), min(num_sms, items))
  return call(io.view(qkv, 3), io.view(o, 1), io.view(do, 1), bias_rows, lse)


def _dkv_call(qkv, do, bias_rows, lse, delta, dqkv, tiles: Tiles, num_sms: int):
  """dqkv, the 3-part view whose part 0 the dq kernel wrote, with dk and dv written into parts 1 and 2 in place."""
  b, n, _, h, d = qkv.shape
  io, c, scale = _geometry(qkv)
  p, bk, bq, stages = io.windows.width, _ROWS, tiles.dkv_block_q, tiles.dkv_stages
  steps, k_tiles = n // bq, n // (2 * bk)
  items = b * h * k_tiles

  def body(qkv_ref, do_ref, bias_ref, lse_ref, delta_ref, dkv_ref, smem, mine, bias_loaded, loaded, freed):
    k_smem, v_smem, staging, q_smem, do_smem, lse_smem, delta_smem, bias_smem = smem
    q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
    wg = lax.axis_index("wg")
    count = items_of(lax.axis_index("sm"), lax.axis_size("sm"), items)
    total = count * steps  # this program's query steps, one ring of stages across items
    item = functools.partial(first_rows, heads=h, tiles_per_head=k_tiles, rows=bk)

    @pl.when((wg < 2) & (count > 0))
    def _compute():
      plgpu.set_max_registers(232, action="increase")

      def load(buf, batch, head, rows):
        """This warpgroup's k and v rows of an item, into buffer `buf`."""
        io.copy_window(qkv_ref, 1, 3, batch, head, rows, k_smem.at[buf, wg], mine[0].at[buf, wg])
        io.copy_window(qkv_ref, 2, 3, batch, head, rows, v_smem.at[buf, wg], mine[1].at[buf, wg])

      @functools.partial(_walk, wg, count, bk, item, load, mine, (bias_ref, bias_smem, bias_loaded))
      def _(j, buf, batch, head, rows):
        k_tile, v_tile = k_smem.at[buf, wg], v_smem.at[buf, wg]
        k = k_tile[...]
        if not io.windows.exact:  # the neighbour's channels out of k and v: they would enter S^T and dP^T
          own = io.own_channels(head, bk)
          k = jnp.where(own, k, 0)
          k_tile[...] = k
          v_tile[...] = jnp.where(own, v_tile[...], 0)
        plgpu.commit_smem()
        bias = io.bias_row(bias_smem.at[wg], head).astype(_F32)
        kb = (k.astype(_F32) * lax.broadcast_in_dim(bias, (bk, p), (1,))).sum(axis=1)  # q's bias in key j's logits

        def step(i, carry):
          dk, dv, ds_sum = carry
          slot = lax.rem(j * steps + i, stages)
          plgpu.barrier_wait(q_loaded.at[slot])
          plgpu.barrier_wait(lse_loaded.at[slot])

          def logits(acc):
            plgpu.wgmma(acc, k_tile, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
            return acc[...]
          st = pl.run_scoped(logits, plgpu.ACC((bk, bq), _F32))
          lse = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
          pt = jnp.exp2((st + lax.broadcast_in_dim(kb, st.shape, (0,))) * c
                        - lax.broadcast_in_dim(lse, st.shape, (1,)))
          plgpu.barrier_wait(do_loaded.at[slot])

          def values(acc):
            plgpu.wgmma(acc, pt.astype(io.dtype), do_smem.at[slot])
          dv = pl.run_state(values)(plgpu.ACC.init(dv))

          def dprob(acc):
            plgpu.wgmma(acc, v_tile, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))
            return acc[...]
          dpt = pl.run_scoped(dprob, plgpu.ACC((bk, bq), _F32))
          plgpu.barrier_wait(delta_loaded.at[slot])
          delta = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
          dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, (1,)))
          ds_sum = ds_sum + dst.sum(axis=1)

          def keys(acc):
            plgpu.wgmma(acc, dst.astype(io.dtype), q_smem.at[slot])
          dk = pl.run_state(keys)(plgpu.ACC.init(dk))
          plgpu.barrier_arrive(freed.at[slot])
          return dk, dv, ds_sum

        zeros = plgpu.layout_cast(jnp.zeros((bk, p), _F32), plgpu.Layout.WGMMA)
        no_sum = plgpu.layout_cast(jnp.zeros((bk,), _F32), plgpu.Layout.WGMMA.reduce(1))
        dk, dv, ds_sum = lax.fori_loop(0, steps, step, (zeros, zeros, no_sum))
        dk = dk + lax.broadcast_in_dim(ds_sum, dk.shape, (0,)) * lax.broadcast_in_dim(bias, dk.shape, (1,))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read the staging
        io.store_own(dk * scale, staging.at[wg, 0], dkv_ref, batch, rows, head, part=1, parts=3)
        io.store_own(dv, staging.at[wg, 1], dkv_ref, batch, rows, head, part=2, parts=3)

      plgpu.wait_smem_to_gmem(0)

    def fetch(ring, slot):
      batch, head, queries = ring_rows(item, ring, steps, bq)
      io.copy_window(qkv_ref, 0, 3, batch, head, queries, q_smem.at[slot], q_loaded.at[slot])
      io.copy_window(do_ref, 0, 1, batch, head, queries, do_smem.at[slot], do_loaded.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, queries], lse_smem.at[slot], lse_loaded.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, queries], delta_smem.at[slot], delta_loaded.at[slot])
    pl.when(wg == 2)(lambda: _stream(total, stages, (freed,), fetch))

  def entry(qkv_ref, do_ref, bias_ref, lse_ref, delta_ref, dkv_ref):
    smem = [_row_tile(io, bk)] * 2  # k, v
    smem += [plgpu.SMEM((2, 2, bk, d), io.dtype)]  # dk and dv staging
    smem += [plgpu.SMEM((stages, bq, p), io.dtype, transforms=io.transforms)] * 2  # q, dO
    smem += [plgpu.SMEM((stages, bq), _F32)] * 2  # lse, delta
    smem += [plgpu.SMEM((2, *bias_rows.shape), io.dtype)]
    pl.run_scoped(
        functools.partial(body, qkv_ref, do_ref, bias_ref, lse_ref, delta_ref, dkv_ref), smem,
        tuple(plgpu.Barrier(num_barriers=(2, 2)) for _ in range(2)),  # k, v of a (buffer, warpgroup)
        plgpu.Barrier(num_barriers=2),  # a warpgroup's bias
        tuple(plgpu.Barrier(num_barriers=stages) for _ in range(4)),  # q, dO, lse, delta of a slot
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # both compute warpgroups are done with a slot
        collective_axes="wg")

  return _launch_in_place(entry, min(num_sms, items), io.view(qkv, 3), io.view(do, 1), bias_rows, lse, delta,
                          dqkv)[-1]


def backward(qkv, q_bias, o, lse, do, tiles: Tiles = Tiles(), num_sms: int | None = None):
  """Gradients of `hopper_attention`'s output o with respect to its packed (B, N, 3, H, d) operand and q's (H, d)
  bias, given o's cotangent do and the forward's log-sum-exp (B, H, N): (dqkv, each example's q-bias gradient
  (B, H, d) float32), for shapes `hopper_attention.fits` and `fits` take, on `num_sms` persistent programs (the
  device's SM count by default). The dq kernel writes part 0 of the packed gradient and the dk/dv kernel parts 1 and
  2 of the same buffer, in place (a Ref): XLA copying dq into the dk/dv kernel's output took 90 us a layer of
  DiT-XL/2's batch-256 step on an H200."""
  num_sms = num_sms or sm_count()
  b, n, _, h, d = qkv.shape
  bias_rows = Windows(h, d).bias_rows(q_bias, qkv.dtype)
  dq, delta = _dq_call(qkv, o, do, bias_rows, lse, tiles, num_sms)
  dqkv = _dkv_call(qkv, do, bias_rows, lse, delta, dq, tiles, num_sms).reshape(qkv.shape)
  return dqkv, dqkv[:, :, 0].astype(_F32).sum(axis=1)


def fits_train(heads_shape, dtype) -> bool:
  """Shapes the forward with its log-sum-exp and both backward kernels take (the batch does not matter, so a batch
  shard fits where the whole does)."""
  return hopper_attention.fits(heads_shape, dtype) and fits(heads_shape[1])


def attention(qkv, q_bias, *, num_sms: int | None = None):
  """`hopper_attention.attention` differentiable on the kernels, for shapes `fits_train` takes (the caller
  checks): undifferentiated, the forward kernel alone; differentiated, the forward also writes each row's
  log-sum-exp, which remat's elementwise policy keeps with the output (`kept`), and the backward runs `backward`.
  Under a sharded jit every kernel runs on each device's batch shard; q's bias gradient is summed over the batch
  outside them."""
  num_sms = num_sms or sm_count()
  tiles = hopper_attention.Tiles.for_tokens(qkv.shape[1], with_lse=True)
  forward = lambda lse: batch_partitioned(
      lambda qkv, q_bias: hopper_attention._kernel_call(qkv, q_bias, tiles, num_sms, with_lse=lse), replicated=(1,))

  @jax.custom_vjp
  def call(qkv, q_bias):
    return forward(False)(qkv, q_bias)

  def forward_rule(qkv, q_bias):
    o, lse = map(kept, forward(True)(qkv, q_bias))
    return o, (qkv, q_bias, o, lse)

  def backward_rule(residuals, do):
    qkv, q_bias, o, lse = residuals
    dqkv, bias_sums = batch_partitioned(
        lambda qkv, q_bias, o, lse, do: backward(qkv, q_bias, o, lse, do, num_sms=num_sms),
        replicated=(1,))(qkv, q_bias, o, lse, do)
    return dqkv, bias_sums.sum(axis=0).astype(q_bias.dtype)

  call.defvjp(forward_rule, backward_rule)
  return call(qkv, q_bias)


def pays_off(heads_shape) -> bool:
  """Where MHA's "auto" trains on these kernels rather than on cuDNN: where the forward kernel pays off, up to the
  4,096 tokens the backward was measured at. benchmarks/hopper_attention_grad.py on an H200 (16 heads of 72, bf16,
  2026-11-30; the whole MHA operator forward and backward, non-persistent backward kernels): 256 x 256 tokens 4.25
  against cuDNN's 4.56 ms, 64 x 1,024 6.45 against 6.86, 2 x 4,096 1.95 against 2.14. On the persistent kernels an
  8-layer DiT-XL/2 train step took 107.8-108.6 against 110.6-111.3 ms (losses equal to 2e-5), and the whole batch-256
  step 373.1 ms against 385.1 the call before on cuDNN's backward (README, Measured)."""
  return hopper_attention.pays_off(heads_shape) and heads_shape[1] <= 4096
