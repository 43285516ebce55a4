"""Linear + bias + tanh GELU (the transformer MLP's first layer) as one Mosaic GPU kernel for Hopper.

XLA runs fc1 as a cuBLAS matmul, then a second, memory-bound pass reads the (tokens, 4 x width) pre-activation back
and writes the GELU: 13.6 ms of DiT-XL/2's 124 ms batch-256 forward on an H200. cuBLASLt's own GELU epilogue is no
faster, and a Triton matmul through Pallas is slower than cuBLAS at this shape. Here the GELU is applied to each
output tile's float32 accumulator before its one write.

Structure: one CTA per SM walks the output tiles (rows x 2 cols). CTAs run in clusters of two on tiles of the same
columns, one above the other, and TMA multicasts each w tile to both: a third less traffic out of L2 (1.021 against
1.054 ms alone at DiT-XL/2's fc1 on an H200; in its forward 0.5-1.3 ms of 113). Its memory warpgroup streams x and w
tiles through a ring of shared-memory stages with TMA; two compute warpgroups (one per column half) run wgmma into
float32 accumulators and then the epilogue (bias, GELU, bf16, TMA store), while the memory warpgroup already loads
the next tile. The tanh is the hardware approximation (relative error about 2^-11, under half a bf16 ulp).

Forward only (`kernels.forward_only`): `dense_gelu`'s forward rule is the XLA composition, so a differentiated call (a
train step, under any remat policy) saves and recomputes exactly what XLA would; undifferentiated calls (sampling,
the teacher's forward in stage 1, inference) run the kernel. It rounds once where XLA rounds the matmul output, the
bias sum and the GELU in turn.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from graft_jax.operators.kernels import batch_partitioned, forward_only, on_hopper, sixteen_bit, sm_count
from graft_jax.operators.remat import kept

_F32 = jnp.float32
_CLUSTER = 2  # CTAs a cluster: tiles one above the other, sharing w's tiles


@dataclasses.dataclass(frozen=True)
class Tiles:
  """A CTA computes rows x (2 * cols) outputs, stepping through k `depth` at a time with `stages` buffers.

  Chosen on an H200 (DiT-XL/2's and PixArt's fc1, 4 x 1152 wide): 3 stages are what shared memory holds next to
  the output tile; walking the output by rows of tiles keeps x's rows in L2 across a row's column tiles."""
  rows: int = 128
  cols: int = 128
  depth: int = 64
  stages: int = 3


def reference(x, kernel, bias):
  """The XLA composition the kernel replaces (and its VJP's forward rule); `kept` for remat's elementwise policy."""
  return kept(jax.nn.gelu(x @ kernel + bias, approximate=True))


def fits(m: int, k: int, n: int, dtype, tiles: Tiles = Tiles()) -> bool:
  """16-bit operands on whole tiles, rows in whole cluster pairs: the kernel has no edge masking."""
  return (sixteen_bit(dtype) and m % (_CLUSTER * tiles.rows) == 0 and n % (2 * tiles.cols) == 0
          and k % tiles.depth == 0)


def supported(m: int, k: int, n: int, dtype, tiles: Tiles = Tiles()) -> bool:
  """`fits`, on Hopper GPUs (`kernels.on_hopper`)."""
  return on_hopper() and fits(m, k, n, dtype, tiles)


def _kernel_call(x, kernel, bias, tiles: Tiles, num_sms: int):
  m, k = x.shape
  n = kernel.shape[1]
  tm, tn, tk = tiles.rows, tiles.cols, tiles.depth
  row_pairs, col_tiles = m // (_CLUSTER * tm), n // (2 * tn)
  item = jnp.dtype(x.dtype).itemsize
  # wgmma reads shared memory in 8-row tiles of 128-byte swizzled rows.
  in_transforms = (plgpu.TilingTransform((8, tk)), plgpu.SwizzleTransform(tk * item))
  out_swizzle = plgpu.find_swizzle(tn * item * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // item)), plgpu.SwizzleTransform(out_swizzle))

  def pipeline(step, compute):
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(k // tk,),
        in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (0, s), transforms=in_transforms),
                  plgpu.BlockSpec((tk, 2 * tn), lambda s: (s, 0), transforms=in_transforms,
                                  collective_axes=("cluster",))],
        compute_context=compute, max_concurrent_steps=tiles.stages, num_compute_wgs=2, memory_registers=40,
        wg_axis="wg")

  def body(x_gmem, w_gmem, b_gmem, o_gmem):
    wg = lax.axis_index("wg")
    half = pl.ds(wg * tn, tn)
    unused = lambda *_, **__: None

    # Allocated once for all of this CTA's tiles, so the memory warpgroup can run ahead across tiles.
    @functools.partial(
        pl.run_scoped,
        stages=pipeline(unused, unused).get_allocations(x_gmem.at[pl.ds(0, tm)], w_gmem.at[:, pl.ds(0, 2 * tn)]),
        out_smem=plgpu.SMEM((2, tm, tn), x.dtype, transforms=out_transforms),
        bias_smem=plgpu.SMEM((2, tn), x.dtype),
        bias_ready=plgpu.Barrier(num_barriers=2),
        collective_axes="wg")
    def _(stages, out_smem, bias_smem, bias_ready):
      @plgpu.nd_loop((row_pairs, col_tiles), collective_axes="clusters")
      def _(tile):
        pair, j = tile.index
        i = pair * _CLUSTER + lax.axis_index("cluster")
        rows, cols = pl.ds(i * tm, tm), pl.ds(j * 2 * tn + wg * tn, tn)

        def compute(run_pipeline):
          @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), _F32))
          def _(acc):
            plgpu.copy_gmem_to_smem(b_gmem.at[cols], bias_smem.at[wg], bias_ready.at[wg])
            run_pipeline(acc)
            plgpu.barrier_wait(bias_ready.at[wg])
            b = plgpu.load(bias_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0)).astype(_F32)
            y = jax.nn.gelu(acc[...] + lax.broadcast_in_dim(b, (tm, tn), (1,)), approximate=True)
            y = y.astype(out_smem.dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
            out_smem[wg] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], o_gmem.at[rows, cols])

        def step(_, x_smem, w_smem, acc):
          plgpu.wgmma(acc, x_smem, w_smem.at[:, half])
          plgpu.wgmma_wait(0)
          return acc

        pipeline(step, compute)(x_gmem.at[rows], w_gmem.at[:, pl.ds(j * 2 * tn, 2 * tn)], allocations=stages)

    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(num_sms // _CLUSTER,), grid_names=("clusters",),
      cluster=(_CLUSTER,), cluster_names=("cluster",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))(x, kernel, bias)


def _sharded_call(x, kernel, bias, tiles: Tiles, num_sms: int):
  """The kernel on each device's rows of x under a sharded jit (the weights whole on every device). A shard whose
  rows do not fill whole tiles takes the XLA composition instead: `supported` saw only the global shape."""
  def call(x, kernel, bias):
    if fits(*x.shape, kernel.shape[1], x.dtype, tiles):
      return _kernel_call(x, kernel, bias, tiles, num_sms)
    return reference(x, kernel, bias)
  return batch_partitioned(call, replicated=(1, 2))(x, kernel, bias)


def dense_gelu(x, kernel, bias, *, tiles: Tiles = Tiles(), num_sms: int | None = None):
  """gelu_tanh(x @ kernel + bias) through the kernel, for x (..., k), kernel (k, n), bias (n,) of one 16-bit dtype
  whose shapes `fit`; it compiles only for a Hopper GPU (`supported`). `num_sms` (persistent CTAs) defaults to the
  device's SM count."""
  num_sms = num_sms or sm_count()
  lead, k = x.shape[:-1], x.shape[-1]
  # Differentiated, the XLA composition runs: remat sees its matmul and its `kept` GELU output.
  fused = forward_only(functools.partial(_sharded_call, tiles=tiles, num_sms=num_sms), reference)
  y = fused(x.reshape(-1, k), kernel, bias)
  return y.reshape(*lead, kernel.shape[1])
