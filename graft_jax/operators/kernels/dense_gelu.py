"""The transformer MLP's GELU fused into its matmuls: Mosaic GPU kernels for Hopper.

Forward. XLA runs fc1 as a cuBLAS matmul, then a second, memory-bound pass reads the (tokens, 4 x width)
pre-activation back and writes the GELU: 13.6 ms of DiT-XL/2's 124 ms batch-256 forward on an H200. cuBLASLt's own
GELU epilogue is no faster, and a Triton matmul through Pallas is slower than cuBLAS at this shape. Here the GELU is
applied to each output tile's float32 accumulator before its one write.

Train steps. XLA keeps fc1's pre-activation u, writes fc2's input gradient dh = dy @ fc2^T, then a second pass reads
dh and u and writes du = dh * gelu'(u). Here a differentiated forward writes gelu'(u) next to the GELU, from the
same tanh, in place of u (the same bytes), and fc2's input-gradient matmul multiplies each float32 tile by it before
its one write: the backward's epilogue is one multiply. At DiT-XL/2's shape on an H200 that kernel takes 1.32 ms
against XLA's 1.66 for the matmul and its pass (cuBLAS's matmul alone: 1.19); computing gelu'(u) from a saved u in
its epilogue instead took 1.65 against cuBLAS's 1.08 in another call, while writing the derivative rather than u
costs the forward nothing measurable (1.27x and 1.28x cuBLAS's fc1 in the two calls). `mlp` is the whole MLP with
that custom VJP: an 8-layer DiT-XL/2 train step (batch 256) takes 112.9-113.3 against 115.5-116.0 ms on XLA's MLP.
The backward kernel also writes the float32 column sums of each tile's rows of du, which add up to fc1's bias
gradient (XLA's reduction over du took 0.18 ms a layer), and reads fc2's kernel as stored, through wgmma's
transposed operand (XLA wrote the transpose out each step): the 8-layer step 111.8-112.1 against 112.5-113.1 ms.

Structure (all three epilogues): one CTA per SM walks the output tiles (rows x 2 cols). CTAs run in clusters of two
on tiles of the same columns, one above the other, and TMA multicasts each weight tile to both: a third less
traffic out of L2 (1.021 against 1.054 ms alone at DiT-XL/2's fc1 on an H200; in its forward 0.5-1.3 ms of 113).
Its memory warpgroup streams the operands' tiles through a ring of shared-memory stages with TMA; two compute
warpgroups (one per column half) run wgmma into float32 accumulators and then the epilogue (bf16, TMA store), while
the memory warpgroup already loads the next tile. The tanh is the hardware approximation (relative error about
2^-11, under half a bf16 ulp). The kernels round once where XLA rounds the matmul output, the bias sum and the GELU
(or its derivative's product) in turn.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from graft_jax.operators.kernels import batch_partitioned, on_hopper, sixteen_bit, sm_count
from graft_jax.operators.remat import kept

_F32 = jnp.float32
_CLUSTER = 2  # CTAs a cluster: tiles one above the other, sharing the weights' tiles
# What a kernel writes from each float32 tile: the GELU of tile + bias; that and the GELU's derivative there (a
# differentiated forward); the tile times the matching tile of a saved derivative (the backward).
EPILOGUES = ("gelu", "gelu_and_derivative", "times_derivative")


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
  """fc1 and its GELU by XLA (`kept` for remat's elementwise policy): what the forward kernel replaces."""
  return kept(jax.nn.gelu(x @ kernel + bias, approximate=True))


def gelu_and_derivative(u):
  """gelu_tanh(u) (jax.nn.gelu's formula) and its derivative, from one tanh, for float32 u."""
  c, a = 0.7978845608028654, 0.044715
  t = jnp.tanh(c * (u + a * (u * u * u)))
  half = 0.5 * (1 + t)
  return u * half, half + 0.5 * u * (1 - t * t) * c * (1 + 3 * a * u * u)


def column_sums(a, rows: int):
  """float32 sums of each `rows` rows of a (m, n) (the last group padded with zeros): (ceil(m / rows), n)."""
  a = jnp.pad(a.astype(_F32), ((0, -a.shape[0] % rows), (0, 0)))
  return a.reshape(-1, rows, a.shape[1]).sum(axis=1)


def _reference_call(lhs, rhs, side, epilogue: str, rows: int = Tiles.rows):
  """An epilogue's XLA composition, with XLA's roundings: what the kernel computes on shapes it does not fit."""
  if epilogue == "times_derivative":
    product = (lhs @ rhs.T).astype(_F32) * side.astype(_F32)
    return product.astype(lhs.dtype), column_sums(product, rows)
  if epilogue == "gelu":
    return (reference(lhs, rhs, side),)
  pre = lhs @ rhs + side
  return tuple(a.astype(pre.dtype) for a in gelu_and_derivative(pre.astype(_F32)))


def fits(m: int, k: int, n: int, dtype, tiles: Tiles = Tiles()) -> bool:
  """16-bit operands on whole tiles, rows in whole cluster pairs: the kernels have no edge masking."""
  return (sixteen_bit(dtype) and m % (_CLUSTER * tiles.rows) == 0 and n % (2 * tiles.cols) == 0
          and k % tiles.depth == 0)


def supported(m: int, k: int, n: int, dtype, tiles: Tiles = Tiles()) -> bool:
  """`fits` (fc1's shape: tokens, width, hidden), on Hopper GPUs (`kernels.on_hopper`)."""
  return on_hopper() and fits(m, k, n, dtype, tiles)


def _kernel_call(lhs, rhs, side, tiles: Tiles, num_sms: int, epilogue: str):
  """lhs (m, k) @ rhs (k, n) with `epilogue` applied to each tile; `side` is the bias (n,) or the saved derivative
  (m, n). Returns a tuple: the GELU (and its derivative), (m, n); or for "times_derivative", whose rhs comes as
  stored, (n, k), lhs @ rhs^T times the derivative and its float32 `column_sums` over each tile's rows."""
  m, k = lhs.shape
  times = epilogue == "times_derivative"
  n = rhs.shape[0] if times else rhs.shape[1]
  tm, tn, tk = tiles.rows, tiles.cols, tiles.depth
  row_pairs, col_tiles = m // (_CLUSTER * tm), n // (2 * tn)
  item = jnp.dtype(lhs.dtype).itemsize
  # wgmma reads shared memory in 8-row tiles of 128-byte swizzled rows.
  in_transforms = (plgpu.TilingTransform((8, tk)), plgpu.SwizzleTransform(tk * item))
  out_swizzle = plgpu.find_swizzle(tn * item * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // item)), plgpu.SwizzleTransform(out_swizzle))
  # A weight tile: (k, n) blocks, or (n, k) ones that wgmma reads transposed (fc2's kernel as stored, for its input
  # gradient: XLA would write the transpose out each step).
  rhs_block, rhs_index = ((2 * tn, tk), lambda s: (0, s)) if times else ((tk, 2 * tn), lambda s: (s, 0))

  def pipeline(step, compute):
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(k // tk,),
        in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (0, s), transforms=in_transforms),
                  plgpu.BlockSpec(rhs_block, rhs_index, transforms=in_transforms, collective_axes=("cluster",))],
        compute_context=compute, max_concurrent_steps=tiles.stages, num_compute_wgs=2, memory_registers=40,
        wg_axis="wg")

  def weight_columns(rhs_gmem, first, width):
    """The weight's rows or columns that make output columns [first, first + width)."""
    return rhs_gmem.at[pl.ds(first, width)] if times else rhs_gmem.at[:, pl.ds(first, width)]

  def body(lhs_gmem, rhs_gmem, side_gmem, *out_gmems):
    wg = lax.axis_index("wg")
    half = pl.ds(wg * tn, tn)
    unused = lambda *_, **__: None

    # Allocated once for all of this CTA's tiles, so the memory warpgroup can run ahead across tiles. The staging
    # buffer holds each result on its way to a TMA store (and before the product, the derivative's tile).
    @functools.partial(
        pl.run_scoped,
        stages=pipeline(unused, unused).get_allocations(lhs_gmem.at[pl.ds(0, tm)], weight_columns(rhs_gmem, 0, 2 * tn)),
        out_smem=plgpu.SMEM((2, tm, tn), lhs.dtype, transforms=out_transforms),
        bias_smem=plgpu.SMEM((2, tn), lhs.dtype),
        sums_smem=plgpu.SMEM((2, tn), _F32),
        side_ready=plgpu.Barrier(num_barriers=2),
        summed=plgpu.Barrier(num_barriers=2),
        collective_axes="wg")
    def _(stages, out_smem, bias_smem, sums_smem, side_ready, summed):
      def store(value, out_gmem, rows, cols):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous stores have read out_smem and sums_smem
        out_smem[wg] = value.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, cols])

      def store_column_sums(product, sums_gmem, first_tile: bool):
        """The tile's column sums. A sum across a warpgroup's warps goes through Mosaic GPU's one scratch buffer,
        the same for both compute warpgroups, so they take turns: 0 (after 1's previous turn), then 1."""
        pl.when(wg == 1)(lambda: plgpu.barrier_wait(summed.at[0]))
        pl.when((wg == 0) & ~first_tile)(lambda: plgpu.barrier_wait(summed.at[1]))
        sums = product.sum(axis=0)
        plgpu.barrier_arrive(summed.at[wg])
        sums_smem[wg] = sums  # after `store`'s wait: the previous tile's sums have left
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sums_smem.at[wg], sums_gmem)

      @plgpu.nd_loop((row_pairs, col_tiles), collective_axes="clusters")
      def _(tile):
        pair, j = tile.index
        i = pair * _CLUSTER + lax.axis_index("cluster")
        rows, cols = pl.ds(i * tm, tm), pl.ds(j * 2 * tn + wg * tn, tn)

        def compute(run_pipeline):
          @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), _F32))
          def _(acc):
            # The side operand's load runs while the matmul does.
            if times:
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              plgpu.copy_gmem_to_smem(side_gmem.at[rows, cols], out_smem.at[wg], side_ready.at[wg])
            else:
              plgpu.copy_gmem_to_smem(side_gmem.at[cols], bias_smem.at[wg], side_ready.at[wg])
            run_pipeline(acc)
            plgpu.barrier_wait(side_ready.at[wg])
            if times:
              # Each thread reads the derivative's elements it then overwrites with its own products.
              derivative = plgpu.load(out_smem.at[wg], (), layout=plgpu.Layout.WGMMA).astype(_F32)
              product = acc[...] * derivative
              store(product, out_gmems[0], rows, cols)
              store_column_sums(product, out_gmems[1].at[i, cols], tile.local_index == 0)
              return
            b = plgpu.load(bias_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0)).astype(_F32)
            pre = acc[...] + lax.broadcast_in_dim(b, (tm, tn), (1,))
            if epilogue == "gelu":
              store(jax.nn.gelu(pre, approximate=True), out_gmems[0], rows, cols)
              return
            gelu, derivative = gelu_and_derivative(pre)
            store(derivative, out_gmems[1], rows, cols)  # its store reads out_smem while the GELU is rounded
            store(gelu, out_gmems[0], rows, cols)

        def step(_, lhs_smem, rhs_smem, acc):
          weights = plgpu.transpose_ref(rhs_smem.at[half], (1, 0)) if times else rhs_smem.at[:, half]
          plgpu.wgmma(acc, lhs_smem, weights)
          plgpu.wgmma_wait(0)
          return acc

        pipeline(step, compute)(lhs_gmem.at[rows], weight_columns(rhs_gmem, j * 2 * tn, 2 * tn), allocations=stages)

    plgpu.wait_smem_to_gmem(0)

  out = jax.ShapeDtypeStruct((m, n), lhs.dtype)
  out_type = {"gelu": (out,), "gelu_and_derivative": (out, out),
              "times_derivative": (out, jax.ShapeDtypeStruct((m // tm, n), _F32))}[epilogue]
  return plgpu.kernel(
      body, out_type=out_type, grid=(num_sms // _CLUSTER,), grid_names=("clusters",),
      cluster=(_CLUSTER,), cluster_names=("cluster",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))(lhs, rhs, side)


def matmul_epilogue(lhs, rhs, side, epilogue: str, *, tiles: Tiles = Tiles(), num_sms: int | None = None):
  """lhs (m, k) @ rhs (k, n) with an `EPILOGUES` entry applied to each tile, as a tuple: the GELU (and its
  derivative), (m, n), with `side` the bias (n,); or for "times_derivative", with rhs (n, k) as stored and `side`
  the saved derivative (m, n), lhs @ rhs^T times the derivative and its float32 `column_sums` over each
  `tiles.rows` rows. 16-bit operands on shapes that `fit` take the kernel (Hopper GPUs only; `num_sms` persistent
  CTAs, default the device's SM count), others XLA's composition.

  Under a sharded jit the kernel runs on each device's rows (the weights whole on every device; a saved derivative's
  rows sharded like lhs's). A shard whose rows do not fill whole tiles takes the composition: `supported` saw only
  the global shape."""
  num_sms = num_sms or sm_count()

  def call(lhs, rhs, side):
    n = rhs.shape[0] if epilogue == "times_derivative" else rhs.shape[1]
    if fits(*lhs.shape, n, lhs.dtype, tiles):
      return _kernel_call(lhs, rhs, side, tiles, num_sms, epilogue)
    return _reference_call(lhs, rhs, side, epilogue, tiles.rows)
  return batch_partitioned(call, replicated=(1,) if epilogue == "times_derivative" else (1, 2))(lhs, rhs, side)


def mlp(x, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, *, tiles: Tiles = Tiles(), num_sms: int | None = None):
  """fc2(gelu_tanh(fc1(x))) for x (..., width) and the Linears' kernels (in, out) and biases of one 16-bit dtype,
  fc1's shape as `fits` says; it compiles only for a Hopper GPU (`supported`). `num_sms` (persistent CTAs) defaults
  to the device's SM count. Other dtypes and shapes take XLA's composition through the same rules.

  Undifferentiated, the forward kernel writes the GELU and XLA's cuBLAS call applies fc2. Differentiated, the
  forward kernel also writes the GELU's derivative gelu'(u) at fc1's pre-activation u; remat's elementwise policy
  keeps it and the GELU (`kept`), as it keeps fc1's matmul output and the GELU on XLA's path, and fc2's matmul
  output as ever. The backward's fc2 input-gradient kernel reads fc2's kernel as stored and writes
  du = (dy @ fc2^T) * gelu'(u) and the column sums of each tile's rows, which add up to fc1's bias gradient; XLA's
  matmuls and fc2's bias gradient (a column sum of dy) do the rest.
  """
  kernel = lambda epilogue: functools.partial(matmul_epilogue, epilogue=epilogue, tiles=tiles, num_sms=num_sms)
  lead, width = x.shape[:-1], x.shape[-1]

  @jax.custom_vjp
  def call(x, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias):
    (h,) = kernel("gelu")(x, fc1_kernel, fc1_bias)
    return h @ fc2_kernel + fc2_bias

  def forward_rule(x, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias):
    h, derivative = map(kept, kernel("gelu_and_derivative")(x, fc1_kernel, fc1_bias))
    return h @ fc2_kernel + fc2_bias, (x, fc1_kernel, fc2_kernel, h, derivative)

  def backward_rule(residuals, dy):
    x, fc1_kernel, fc2_kernel, h, derivative = residuals
    du, du_sums = kernel("times_derivative")(dy, fc2_kernel, derivative)
    fc2_bias_grad = column_sums(dy, dy.shape[0])[0]
    return du @ fc1_kernel.T, x.T @ du, du_sums.sum(axis=0).astype(du.dtype), h.T @ dy, fc2_bias_grad.astype(dy.dtype)

  call.defvjp(forward_rule, backward_rule)
  return call(x.reshape(-1, width), fc1_kernel, fc1_bias, fc2_kernel, fc2_bias).reshape(*lead, fc2_kernel.shape[1])
