"""LayerNorm with adaLN modulation, LN(x) * (1 + scale) + shift, as Pallas (Triton) kernels for GPUs: the forward,
and for train steps its backward.

Forward. XLA runs this as a Triton fusion of its own, on tiles of 8 rows padded from 1152 channels to 2048. Here a
program takes 8 whole rows in chunks of 128 channels, keeps them in registers between the statistics and the
normalisation, and writes the modulated rows once. At DiT-XL/2's batch-256 shape on an H200 (65,536 x 1152, bf16)
it takes 0.097 against XLA's 0.112 ms alone; at the MLP's norm of an 8-layer DiT-XL/2 forward, 31.49-31.62 against
31.73-32.37 ms (four rounds each, one call; other tiles of rows and warps were slower alone).

Backward. Differentiated, the forward also writes each row's mean and reciprocal deviation (`kept`: saved under
remat's elementwise policy), and one backward kernel reads the output's gradient and x once: it writes x's gradient
and, per sample, partial sums over its rows for shift's and scale's gradients (XLA adds the few partials). XLA's
own backward of the composition takes several passes over x (statistics terms, the row sums, the apply). At
DiT-XL/2's shape on an H200, forward and backward took 0.314 against XLA's 0.527 ms alone (a program walking 8
blocks of 8 rows with 8 warps; 4 or 2 warps, or 4, 16 or 32 blocks, took 0.62-1.00 ms), and an 8-layer DiT-XL/2
train step 113.9-114.3 against 115.2-115.9 ms with both norms of each block on the kernels (114.4-114.8 with the
MLP's alone). The norm hands x back, and a block's residual stream takes it from there, so x's gradient from the
residual stream reaches this custom VJP and the kernel adds it before its one write, where XLA added the two in a
pass of its own (119 us a layer). It loads that gradient with dy and x (loaded at the write, the kernel took 400 us
a layer) and walks 16 blocks of rows (214 us a layer; 8 blocks 237): the 8-layer step 110.9-111.7 against
112.3-112.9 ms.

Only an input XLA has written out anyway should take the forward in an undifferentiated call: a norm whose input
XLA would recompute inside its own fusion (a residual sum) costs an extra pass once a kernel needs that input in
memory. `kernel_forward=False` keeps such calls on the composition; a train step writes those inputs anyway.

The rounding follows `models.dit.norm_modulate` op by op (statistics in float32; the normalised row, 1 + scale, the
product and the sum in the activations' dtype; in the backward, the normalised row's gradient in that dtype, as
autodiff of the composition rounds it); XLA may keep intermediates in float32 instead, so on a GPU the two agree
within a 16-bit ulp.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from graft_jax.operators.kernels import batch_partitioned
from graft_jax.operators.remat import kept

_F32 = jnp.float32
BLOCK_T = 8  # tokens (rows) a program of the forward, and a step of the backward's loop
CHUNK = 128  # channels a load: Triton's blocks are powers of two, the width need not be
WARPS = 8  # forward and backward: both sweeps on an H200 chose 8
BACKWARD_STEPS = 16  # row blocks a backward program walks: fewer, larger partial sums for shift and scale


def fits(tokens: int, width: int) -> bool:
  """Whole programs of rows within each sample (shift and scale are per sample) and whole chunks of width."""
  return tokens % BLOCK_T == 0 and width % CHUNK == 0


def supported(tokens: int, width: int) -> bool:
  """`fits`, on a GPU."""
  return jax.default_backend() == "gpu" and fits(tokens, width)


def _chunks(width: int) -> list:
  return [pl.ds(c * CHUNK, CHUNK) for c in range(width // CHUNK)]


def _rounding(dtype):
  return lambda a: a.astype(dtype).astype(_F32)  # one op of the composition, in the activations' dtype


def _specs(span: int, width: int):
  """Blocks of a (sample, `span` rows) program: rows of (B, N, D) operands, their (B, N) statistics, and a
  sample's (B, 1, D) shift or scale."""
  return (pl.BlockSpec((None, span, width), lambda i, t: (i, t, 0)), pl.BlockSpec((None, span), lambda i, t: (i, t)),
          pl.BlockSpec((None, 1, width), lambda i, t: (i, 0, 0)))


def _rows(x_ref, shift_ref, scale_ref, out_ref, *stats_refs, eps: float):
  rounded = _rounding(out_ref.dtype)
  width = x_ref.shape[1]
  chunks = _chunks(width)
  xs = [x_ref[:, cols].astype(_F32) for cols in chunks]
  mean = sum(jnp.sum(x, axis=1) for x in xs)[:, None] / width
  var = sum(jnp.sum(jnp.square(x - mean), axis=1) for x in xs)[:, None] / width
  inv = lax.rsqrt(var + eps)
  for cols, x in zip(chunks, xs):
    normed = rounded((x - mean) * inv)
    modulated = rounded(normed * rounded(1 + scale_ref[:, cols].astype(_F32)))
    out_ref[:, cols] = (modulated + shift_ref[:, cols].astype(_F32)).astype(out_ref.dtype)
  if stats_refs:
    mean_ref, inv_ref = stats_refs
    mean_ref[...], inv_ref[...] = mean[:, 0], inv[:, 0]


def _forward(x, shift, scale, eps: float, interpret: bool, stats: bool = False):
  """The modulated norm; with `stats`, also each row's mean and 1 / sqrt(var + eps), float32 (B, N)."""
  def call(x, shift, scale):  # sized by its operands: under a sharded jit, one device's batch shard
    batch, tokens, width = x.shape
    rows, row_stats, sample = _specs(BLOCK_T, width)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    stat = jax.ShapeDtypeStruct((batch, tokens), _F32)
    return pl.pallas_call(
        functools.partial(_rows, eps=eps),
        grid=(batch, tokens // BLOCK_T),
        in_specs=[rows, sample, sample],
        out_specs=(rows, row_stats, row_stats) if stats else rows,
        out_shape=(out, stat, stat) if stats else out,
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
    )(x, shift, scale)
  return batch_partitioned(call)(x, shift[:, None], scale[:, None])


def _backward_rows(dy_ref, dres_ref, x_ref, scale_ref, mean_ref, inv_ref, dx_ref, dshift_ref, dscale_ref, *,
                   steps: int):
  """x's gradient (the norm's plus the residual stream's, dres) for `steps` blocks of BLOCK_T rows, and the sums
  over those rows of shift's and scale's."""
  rounded = _rounding(dx_ref.dtype)
  width = x_ref.shape[1]
  chunks = _chunks(width)
  gains = [rounded(1 + scale_ref[:, cols].astype(_F32)) for cols in chunks]  # (1, CHUNK): 1 + scale, rounded

  def step(s, sums):
    rows = pl.ds(pl.multiple_of(s * BLOCK_T, BLOCK_T), BLOCK_T)
    mean, inv = mean_ref[rows][:, None], inv_ref[rows][:, None]
    dys = [dy_ref[rows, cols].astype(_F32) for cols in chunks]
    xhats = [(x_ref[rows, cols].astype(_F32) - mean) * inv for cols in chunks]
    dress = [dres_ref[rows, cols] for cols in chunks]  # loaded with the others, so their latencies overlap
    # The normalised row's gradient, rounded as the composition's is; then LayerNorm's backward in float32.
    grads = [rounded(dy * gain) for dy, gain in zip(dys, gains)]
    mean_g = sum(jnp.sum(g, axis=1) for g in grads)[:, None] / width
    mean_gx = sum(jnp.sum(g * xhat, axis=1) for g, xhat in zip(grads, xhats))[:, None] / width
    for cols, g, xhat, dres in zip(chunks, grads, xhats, dress):
      dx = inv * (g - mean_g - xhat * mean_gx) + dres.astype(_F32)
      dx_ref[rows, cols] = dx.astype(dx_ref.dtype)
    # Shift's and scale's sums stay (BLOCK_T, CHUNK) tiles until the last step: summing over rows at every step
    # would cost a reduction across warps each time.
    dshift, dscale = sums
    return (tuple(a + dy for a, dy in zip(dshift, dys)),
            tuple(a + rounded(dy * rounded(xhat)) for a, dy, xhat in zip(dscale, dys, xhats)))

  zeros = tuple(jnp.zeros((BLOCK_T, CHUNK), _F32) for _ in chunks)
  dshift, dscale = lax.fori_loop(0, steps, step, (zeros, zeros))
  for cols, a, b in zip(chunks, dshift, dscale):
    dshift_ref[cols], dscale_ref[cols] = jnp.sum(a, axis=0), jnp.sum(b, axis=0)


def _backward(dy, dres, x, scale, mean, inv, interpret: bool):
  """(x's gradient, the norm's plus dres, per-sample partial sums (B, P, D) float32 of shift's and of scale's
  gradients)."""
  def call(dy, dres, x, scale, mean, inv):
    batch, tokens, width = x.shape
    steps = math.gcd(tokens // BLOCK_T, BACKWARD_STEPS)
    span = steps * BLOCK_T
    rows, row_stats, sample = _specs(span, width)
    partial = pl.BlockSpec((None, None, width), lambda i, t: (i, t, 0))
    partials = jax.ShapeDtypeStruct((batch, tokens // span, width), _F32)
    return pl.pallas_call(
        functools.partial(_backward_rows, steps=steps),
        grid=(batch, tokens // span),
        in_specs=[rows, rows, rows, sample, row_stats, row_stats],
        out_specs=(rows, partial, partial),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), partials, partials),
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
    )(dy, dres, x, scale, mean, inv)
  return batch_partitioned(call)(dy, dres, x, scale[:, None], mean, inv)


def norm_modulate(x, shift, scale, reference, *, eps: float = 1e-6, kernel_forward: bool = True,
                  interpret: bool | None = None):
  """(LN(x) * (1 + scale) + shift, x) for x (B, N, D) and per-sample shift, scale (B, D) of x's dtype (shapes as
  `fits` says), through the kernels; `reference` is the composition, which an undifferentiated call runs instead
  when `kernel_forward` is False. x comes back so that the residual stream can take it from here: its gradient
  there then joins the norm's inside the backward kernel, where XLA would add the two in a pass of its own (an
  unused x's gradient is zeros). Off GPU (interpret None means "not on a GPU") the kernels run in Pallas interpret
  mode, for the tests."""
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  forward = functools.partial(_forward, eps=eps, interpret=interpret)
  call = jax.custom_vjp(lambda x, shift, scale: ((forward if kernel_forward else reference)(x, shift, scale), x))

  def forward_rule(x, shift, scale):
    y, mean, inv = forward(x, shift, scale, stats=True)
    return (y, x), (x, scale, kept(mean), kept(inv))

  def backward_rule(residuals, cotangents):
    x, scale, mean, inv = residuals
    dx, dshift, dscale = _backward(*cotangents, x, scale, mean, inv, interpret)
    return dx, dshift.sum(1).astype(x.dtype), dscale.sum(1).astype(scale.dtype)

  call.defvjp(forward_rule, backward_rule)
  return call(x, shift, scale)
