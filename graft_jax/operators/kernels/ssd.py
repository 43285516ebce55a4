"""The within-chunk term of Mamba-2's chunked SSD as a fused Pallas (Triton) kernel, with a custom VJP.

For each chunk and head: y[l] = sum_{m <= l} (C_l . B_m) exp(a_l - a_m) xdt[m], where a is the chunk's cumulative
log-decay. Written with XLA, the (chunk, chunk) mixing matrix of every head is a tensor in HBM (at DiT-XL/2's
256 tokens and 144 heads of width 16 it is 0.6 G elements), built, cast and read several times forward and backward,
which is most of the operator's time. Here one program takes one chunk and a block of heads: C B^T is computed once
(B and C are shared by the heads), and each head's decay and mixing matrix live only in registers.

Backward, per head: dxdt = M^T dy and dM = dy xdt^T with M the mixing matrix; G = dM * M gives the log-decay
gradient (row sums minus column sums, as a_l enters with + and a_m with -), and dM * decay, summed over the heads,
is the gradient of C B^T, turned into dC and dB by two small matmuls left to XLA.

Shapes: b batch, c chunks, l (= m) chunk positions, s state size, h heads, p head width. Matmul operands are in the
inputs' dtype with float32 accumulation, as `operators.matmul.einsum_f32` does; the decays are float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from graft_jax.operators.kernels import batch_partitioned
from graft_jax.operators.matmul import einsum_f32

_F32 = jnp.float32


def supported(chunk: int, state: int, head_width: int) -> bool:
  """Triton's matmul tiles need power-of-two sides of at least 16; past 64 the per-program (chunk, chunk) float32
  matrices (six live in the backward) would no longer fit in registers, so larger shapes stay on XLA."""
  return all(n in (16, 32, 64) for n in (chunk, state, head_width))


def _head_block(heads: int) -> int:
  """Heads per program: the largest power of two up to 16 that divides them."""
  return next(k for k in (16, 8, 4, 2, 1) if heads % k == 0)


def _masked_decay(a_col, a_row):
  """exp(a_l - a_m) for m <= l, else 0; masked before exp, whose argument above the diagonal can overflow."""
  size = a_col.shape[0]
  causal = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0) >= jax.lax.broadcasted_iota(
      jnp.int32, (size, size), 1)
  return jnp.exp(jnp.where(causal, a_col - a_row, -jnp.inf))


def _forward_kernel(c_ref, b_ref, a_ref, at_ref, x_ref, y_ref, *, heads: int, width: int):
  cb = plgpu.dot(c_ref[...], b_ref[...], trans_b=True)  # (l, m) float32
  for j in range(heads):
    cols = pl.ds(j * width, width)
    x = x_ref[:, cols]
    mix = (cb * _masked_decay(a_ref[:, pl.ds(j, 1)], at_ref[pl.ds(j, 1), :])).astype(x.dtype)
    y_ref[:, cols] = plgpu.dot(mix, x).astype(y_ref.dtype)


def _backward_kernel(c_ref, b_ref, a_ref, at_ref, x_ref, dy_ref, dx_ref, da_rows_ref, da_cols_ref, dcb_ref, *,
                     heads: int, width: int):
  # A loop rather than the forward's unrolled heads: each head keeps four (l, m) float32 matrices live, and unrolled
  # their register allocation spans all heads (H200, DiT-XL/2's shape: 14.7 against 16.8 ms forward+backward).
  cb = plgpu.dot(c_ref[...], b_ref[...], trans_b=True)

  def head(j, dcb):
    cols = pl.ds(pl.multiple_of(j * width, width), width)
    x = x_ref[:, cols]
    dy = dy_ref[:, cols].astype(x.dtype)
    decay = _masked_decay(a_ref[:, pl.ds(j, 1)], at_ref[pl.ds(j, 1), :])
    mix = cb * decay
    dx_ref[:, cols] = plgpu.dot(mix.astype(x.dtype), dy, trans_a=True).astype(dx_ref.dtype)
    dmix = plgpu.dot(dy, x, trans_b=True)  # (l, m) float32
    g = dmix * mix
    da_rows_ref[pl.ds(j, 1), :] = jnp.sum(g, axis=1)[None, :]
    da_cols_ref[pl.ds(j, 1), :] = jnp.sum(g, axis=0)[None, :]
    return dcb + dmix * decay

  dcb_ref[...] = jax.lax.fori_loop(0, heads, head, jnp.zeros_like(cb))


def _block_specs(l: int, s: int, p: int, hb: int) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over the grid (batch, chunk, head block), by the layout they tile."""
  return {
      "chunk": pl.BlockSpec((None, None, l, s), lambda i, k, g: (i, k, 0, 0)),  # C, B: (b, c, l, s)
      "a": pl.BlockSpec((None, None, l, hb), lambda i, k, g: (i, k, 0, g)),  # a: (b, c, l, h)
      "per_head": pl.BlockSpec((None, None, hb, l), lambda i, k, g: (i, k, g, 0)),  # a^T, da: (b, c, h, l)
      "features": pl.BlockSpec((None, None, l, hb * p), lambda i, k, g: (i, k, 0, g)),  # xdt, y: (b, c, l, h * p)
      "partial_cb": pl.BlockSpec((None, None, None, l, l), lambda i, k, g: (i, k, g, 0, 0)),  # (b, c, h/hb, l, l)
  }


def _call(kernel, C, B, a, xdt, extra_features, outputs, interpret):
  """Runs `kernel` over (batch, chunk, head block) on C, B, a, a^T, xdt (and `extra_features` laid out as xdt);
  `outputs` lists (dtype, layout name) pairs."""
  h, p = xdt.shape[-2:]
  hb = _head_block(h)
  flat = lambda u: u.reshape(*u.shape[:3], h * p)

  def call(C, B, a, at, *features):  # sized by its operands: under a sharded jit, one device's batch shard
    b, c, l, s = C.shape
    specs = _block_specs(l, s, p, hb)
    shapes = {"features": (b, c, l, h * p), "per_head": (b, c, h, l), "partial_cb": (b, c, h // hb, l, l)}
    return pl.pallas_call(
        functools.partial(kernel, heads=hb, width=p),
        grid=(b, c, h // hb),
        in_specs=[specs[k] for k in ("chunk", "chunk", "a", "per_head")] + [specs["features"]] * len(features),
        out_specs=[specs[layout] for _, layout in outputs],
        out_shape=[jax.ShapeDtypeStruct(shapes[layout], dtype) for dtype, layout in outputs],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(C, B, a, at, *features)
  return batch_partitioned(call)(C, B, a, jnp.swapaxes(a, 2, 3), flat(xdt), *map(flat, extra_features))


def _forward(C, B, a, xdt, interpret):
  y, = _call(_forward_kernel, C, B, a, xdt, [], [(_F32, "features")], interpret)
  return y.reshape(xdt.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _diagonal(C, B, a, xdt, interpret):
  return _forward(C, B, a, xdt, interpret)


def _diagonal_fwd(C, B, a, xdt, interpret):
  return _forward(C, B, a, xdt, interpret), (C, B, a, xdt)


def _diagonal_bwd(interpret, residuals, dy):
  C, B, a, xdt = residuals
  outputs = [(xdt.dtype, "features"), (_F32, "per_head"), (_F32, "per_head"), (_F32, "partial_cb")]
  # The kernel rounds dy to the matmul dtype as it loads it, so rounding here changes no value and halves what it
  # reads; in Mamba-2, whose y is rounded to bf16, dy holds bf16 values already and XLA drops both casts.
  dy = dy.astype(xdt.dtype)
  dx, da_rows, da_cols, dcb = _call(_backward_kernel, C, B, a, xdt, [dy], outputs, interpret)
  # d(C B^T) summed over head blocks, then back through the matmul it came from, in the operands' dtype.
  dcb = dcb.sum(2).astype(C.dtype)
  dC = einsum_f32("bclm,bcms->bcls", dcb, B).astype(C.dtype)
  dB = einsum_f32("bclm,bcls->bcms", dcb, C).astype(B.dtype)
  da = jnp.swapaxes(da_rows - da_cols, 2, 3)
  return dC, dB, da.astype(a.dtype), dx.reshape(xdt.shape)


_diagonal.defvjp(_diagonal_fwd, _diagonal_bwd)


def ssd_diagonal_pallas(C, B, a, xdt, *, interpret: bool | None = None):
  """sum_{m <= l} (C_l . B_m) exp(a_l - a_m) xdt_m per chunk and head, float32 (b, c, l, h, p).

  C, B (b, c, l, s) and xdt (b, c, l, h, p) in the matmul dtype; a (b, c, l, h) float32. Off GPU (interpret None
  means "not on a GPU") it runs in Pallas interpret mode, which is how the tests check it on CPU.
  """
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  return _diagonal(C, B, a.astype(_F32), xdt, interpret)
