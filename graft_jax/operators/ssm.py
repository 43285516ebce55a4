"""Mamba-2: selective state-space sequence mixer computed with the chunked SSD algorithm (Dao & Gu, 2024).

Shapes in this file: b batch, n tokens, h heads, p head width, s state size, c chunks, l and m positions in a chunk.
One group (ngroups = 1): B and C are shared by all heads, as in the grafting paper's Mamba-2.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.operators import flops, init
from graft_jax.operators.hyena import CausalConv
from graft_jax.operators.kernels import sixteen_bit
from graft_jax.operators.kernels import ssd as ssd_kernel
from graft_jax.operators.matmul import einsum_f32
from graft_jax.operators.registry import register

_F32 = jnp.float32


def ssd_reference(x, dt, A, B, C):
  """Sequential SSD, the test oracle: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t (no D skip).

  x (b, n, h, p), dt (b, n, h), A (h,), B and C (b, n, s); float32 result (b, n, h, p).
  """
  x, dt, A, B, C = (t.astype(_F32) for t in (x, dt, A, B, C))

  def step(state, inputs):
    x_t, dt_t, b_t, c_t = inputs
    state = (jnp.exp(dt_t * A)[..., None, None] * state
             + jnp.einsum("bhp,bs->bhps", x_t * dt_t[..., None], b_t))
    return state, jnp.einsum("bhps,bs->bhp", state, c_t)

  b, _, h, p = x.shape
  state = jnp.zeros((b, h, p, B.shape[-1]), _F32)
  _, y = jax.lax.scan(step, state, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C)))
  return jnp.moveaxis(y, 0, 1)


def _decay_matrix(a):
  """exp(a_l - a_m) for m <= l, else 0, over the last axis of within-chunk cumulative log-decays a (..., l).

  The exponent is masked to -inf BEFORE exp: above the diagonal a_l - a_m is a large positive number whose exp
  overflows, and masking only the result would turn the backward pass into inf * 0 = NaN.
  """
  size = a.shape[-1]
  causal = jnp.tril(jnp.ones((size, size), bool))
  return jnp.exp(jnp.where(causal, a[..., :, None] - a[..., None, :], -jnp.inf))


def _leaving_states(states, log_decay):
  """State leaving each chunk, counting every chunk before it; states (b, c, h, p, s), log_decay (b, c, h).

  A parallel (log-depth) scan of h_c = exp(log_decay_c) h_{c-1} + states_c. Each step multiplies by the exact decay
  of its own chunk, so long sequences lose no precision (a difference of global cumulative sums would).
  """
  def combine(earlier, later):
    (decay_e, state_e), (decay_l, state_l) = earlier, later
    return decay_e + decay_l, jnp.exp(decay_l)[..., None, None] * state_e + state_l

  return jax.lax.associative_scan(combine, (log_decay, states), axis=1)[1]


SSD_KERNELS = ("xla", "pallas", "auto")


def _diagonal_xla(C, B, a, xdt):
  """The within-chunk term: sum_{m <= l} (C_l . B_m) exp(a_l - a_m) xdt_m, through a (b, c, h, l, m) tensor."""
  mix = einsum_f32("bcls,bcms->bclm", C, B)[:, :, None] * _decay_matrix(jnp.moveaxis(a, 3, 2))
  return einsum_f32("bchlm,bcmhp->bclhp", mix.astype(xdt.dtype), xdt)


def _diagonal_term(kernel: str, C, B, a, xdt):
  """`kernel` "auto" takes the fused Pallas kernel (kernels/ssd.py) on GPUs (under a sharded jit it runs on each
  device's batch shard) for 16-bit inputs of shapes it tiles, else XLA."""
  if kernel not in SSD_KERNELS:
    raise ValueError(f"SSD kernel {kernel!r} is not one of {', '.join(SSD_KERNELS)}.")
  if kernel == "auto":
    fits = ssd_kernel.supported(C.shape[2], C.shape[3], xdt.shape[-1])
    kernel = "pallas" if jax.default_backend() == "gpu" and sixteen_bit(xdt.dtype) and fits else "xla"
  if kernel == "pallas":
    return ssd_kernel.ssd_diagonal_pallas(C, B, a, xdt)
  return _diagonal_xla(C, B, a, xdt)


def ssd_chunked(x, dt, A, B, C, chunk_size=64, kernel: str = "xla"):
  """The same map as `ssd_reference`, by chunks: quadratic attention-like form inside a chunk, recurrence across.

  The tail is padded with dt = 0 (decay 1, no input), so padded steps are identities and never reach real outputs.
  Decays, cumulative sums and the scan across chunks are float32; the four matmuls take their operands in x's dtype
  and accumulate in float32 (as mamba_ssm's kernels do; in the backward too, see operators.matmul), so bfloat16
  inputs halve the traffic of the (l, m) mixing tensors, which dominate at short lengths.
  """
  b, n, h, p = x.shape
  dtype = x.dtype
  mm = lambda spec, u, v: einsum_f32(spec, u.astype(dtype), v.astype(dtype))
  size = min(chunk_size, n)
  pad = -n % size
  x, dt, B, C = (jnp.pad(t.astype(_F32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, dt, B, C))
  c = (n + pad) // size
  xdt = (x * dt[..., None]).reshape(b, c, size, h, p)
  B, C = B.reshape(b, c, size, -1), C.reshape(b, c, size, -1)
  a = jnp.cumsum((dt * A.astype(_F32)).reshape(b, c, size, h), axis=2)  # log-decay from chunk start, (b, c, l, h)

  y = _diagonal_term(kernel, C.astype(dtype), B.astype(dtype), a, xdt.astype(dtype))
  if c > 1:
    # Decays scale the (b, c, l, h, p) operands elementwise, so each contraction is one matmul batched over chunks.
    # A state reaches only the chunks after its own: the last chunk's state and the first chunk's entering one (zero)
    # are never formed, which at DiT's four chunks saves a quarter of both matmuls and a padded copy of the states.
    states = mm("bcls,bclhp->bchps", B[:, :-1], (xdt * jnp.exp(a[:, :, -1:] - a)[..., None])[:, :-1])
    entering = _leaving_states(states, a[:, :-1, -1])
    later = mm("bcls,bchps->bclhp", C[:, 1:], entering) * jnp.exp(a[:, 1:])[..., None]
    y = y + jnp.pad(later, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
  return y.reshape(b, c * size, h, p)[:, :n]


def ssd_bidirectional(x, dt, A, B, C, chunk_size=64, kernel: str = "xla"):
  """Causal SSD plus the same SSD run over the reversed sequence, with the doubly counted diagonal removed.

  The mixing matrix is the causal one (lower triangle and diagonal) plus its mirror strictly above the diagonal:
  a quasiseparable matrix as in Hydra (Hwang et al., 2024), built from shared parameters. Both directions go
  through one chunked SSD call, stacked along the batch.
  """
  b = x.shape[0]
  both = ssd_chunked(*(jnp.concatenate([t, jnp.flip(t, 1)]) for t in (x, dt)), A,
                     *(jnp.concatenate([t, jnp.flip(t, 1)]) for t in (B, C)), chunk_size=chunk_size, kernel=kernel)
  diagonal = jnp.einsum("bns,bns,bnh,bnhp->bnhp", C.astype(_F32), B.astype(_F32), dt.astype(_F32),
                        x.astype(_F32))
  return both[:b] + jnp.flip(both[b:], 1) - diagonal


def _a_log_init(key, shape, dtype=_F32):
  """A = -exp(A_log) with A ~ U(1, 16), as mamba_ssm."""
  return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype=_F32, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
  """Inverse softplus of dt log-uniform in [dt_min, dt_max] (floored), so softplus(dt_bias) starts there."""
  log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
  dt = jnp.maximum(jnp.exp(log_dt), dt_floor)
  return dt + jnp.log(-jnp.expm1(-dt))


class GatedRMSNorm(nn.Module):
  """mamba_ssm's RMSNormGated with norm_before_gate=False and one group: rmsnorm(y * silu(z)) * weight, in fp32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, y, z):
    weight = self.param("weight", nn.initializers.ones, (y.shape[-1],))
    y = y.astype(_F32) * nn.silu(z.astype(_F32))
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
    return (y * weight.astype(_F32)).astype(z.dtype)


def _mamba2_from_torch(t, dim, num_heads):
  """Import mamba_ssm `Mamba2` weights.

  Inferred from shapes: d_inner (out_proj input), nheads (A_log), headdim = d_inner / nheads, expand = d_inner / dim,
  d_conv (conv1d kernel), d_state = (in_proj rows - 2 d_inner - nheads) / 2. Not recoverable from weights and
  assumed: ngroups = 1 (only ngroups * d_state is visible), norm_before_gate = False, SiLU, no dt limit, zero initial
  state; chunk_size and bidirectional are compute choices that keep their defaults (official runs are causal).
  """
  d_inner, nheads = t["out_proj.weight"].shape[1], t["A_log"].shape[0]
  d_state, odd = divmod(t["in_proj.weight"].shape[0] - 2 * d_inner - nheads, 2)
  problems = [
      (odd or d_state <= 0, "in_proj's width is not 2*d_inner + 2*d_state + nheads (ngroups must be 1)"),
      (d_inner % dim or d_inner % nheads, f"d_inner {d_inner} is not a multiple of width {dim} and {nheads} heads"),
      ("in_proj.bias" in t or "out_proj.bias" in t, "projection biases are not supported"),
      (t["conv1d.weight"].shape[0] != d_inner + 2 * d_state, "conv1d's channels are not d_inner + 2*d_state"),
      ("conv1d.bias" not in t, "conv1d has no bias"),
      (t["D"].shape != (nheads,), "D must hold one value per head (D_has_hdim=False)"),
  ]
  for failed, message in problems:
    if failed:
      raise ValueError(f"cannot import this Mamba2 checkpoint: {message}.")
  config = {"d_state": d_state, "d_conv": t["conv1d.weight"].shape[-1], "expand": d_inner // dim,
            "headdim": d_inner // nheads}
  params = {
      "in_proj": init.dense_from_torch(t, "in_proj"),
      "conv1d": {"kernel": np.asarray(t["conv1d.weight"])[:, 0, :].T, "bias": np.asarray(t["conv1d.bias"])},
      "dt_bias": np.asarray(t["dt_bias"]), "A_log": np.asarray(t["A_log"]), "D": np.asarray(t["D"]),
      "norm": {"weight": np.asarray(t["norm.weight"])},
      "out_proj": init.dense_from_torch(t, "out_proj"),
  }
  return config, params


@register("mamba2", "attn",
          defaults={"d_state": 64, "d_conv": 4, "expand": 2, "headdim": 16, "chunk_size": 64, "bidirectional": False,
                    "ssd_kernel": "auto"},
          flops=flops.mamba2, torch_modules=("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj"),
          from_torch=_mamba2_from_torch)
class Mamba2(nn.Module):
  """Mamba-2 block as mamba_ssm's `Mamba2` (ngroups 1, no projection bias, gated RMSNorm), causal by default.

  `bidirectional=True` keeps every parameter (same count and checkpoint layout as the causal operator) and adds a
  reversed scan: see `ssd_bidirectional`. Image tokens have no causal order, and sharing parameters lets a causal
  checkpoint start a bidirectional one; the diagonal is counted once so the token's own term is the causal one's.
  """
  dim: int
  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 16
  chunk_size: int = 64
  bidirectional: bool = False
  ssd_kernel: str = "auto"  # the within-chunk term: one of SSD_KERNELS (auto: the Pallas kernel on a GPU in bf16)

  @nn.compact
  def __call__(self, u):
    d_inner = self.expand * self.dim
    if d_inner % self.headdim:
      raise ValueError(f"d_inner {d_inner} is not divisible by headdim {self.headdim}")
    nheads = d_inner // self.headdim
    # in_proj's rows are (z, x, B, C, dt) and conv1d's channels (x, B, C), as in mamba_ssm; z and x, the wide
    # parts, come out of their own matmuls and convs so that no gradient is concatenated across them.
    z, x, bcdt = init.FusedDense((d_inner, d_inner, 2 * self.d_state + nheads), use_bias=False, name="in_proj")(u)
    bc, dt = jnp.split(bcdt, [2 * self.d_state], axis=-1)
    x, bc = (nn.silu(y) for y in CausalConv(self.d_conv, name="conv1d")(x, bc))
    B, C = jnp.split(bc, 2, axis=-1)
    x = x.reshape(*x.shape[:2], nheads, self.headdim)

    dt_bias = self.param("dt_bias", _dt_bias_init, (nheads,))
    A = -jnp.exp(self.param("A_log", _a_log_init, (nheads,)).astype(_F32))
    skip = self.param("D", nn.initializers.ones, (nheads,))
    dt = jax.nn.softplus(dt.astype(_F32) + dt_bias.astype(_F32))
    ssd = ssd_bidirectional if self.bidirectional else ssd_chunked
    y = ssd(x, dt, A, B, C, chunk_size=self.chunk_size, kernel=self.ssd_kernel)
    y = y + skip.astype(_F32)[:, None] * x.astype(_F32)
    # Rounded to the activations' dtype before the norm, as mamba_ssm's chunk scan writes its output: a float32 y is
    # the operator's largest tensor (4 bytes x d_inner per token), written once and read forward and backward.
    y = y.astype(x.dtype)

    y = GatedRMSNorm(name="norm")(y.reshape(*y.shape[:2], d_inner), z)
    return init.dense(self.dim, "out_proj", use_bias=False)(y)
