"""DiT (Peebles & Xie) in Flax: adaLN-Zero blocks whose sequence and channel mixers are picked per layer by name.

Contract: latents NHWC (B, H, W, C), t int (B,), y int (B,) -> NHWC (B, H, W, 2C) when learn_sigma.
Each block sows, into the "intermediates" collection, every operator's input (after adaLN modulation) and output
(before the gate), and its own input and residual update; the model sows the conditioning vector: stage-1
distillation reads the teacher's activations from one ordinary forward pass.

A layer is a block or a parallel pair (depth to width). Block k's residual update is f_k(x) = a + m with
a = gate_msa * attn(modulate(LN(x))) and m = gate_mlp * mlp(modulate(LN(x + a))), so the block computes x + f_k(x).
A pair computes x + W [f_1(x); f_2(x)] + b: both blocks read the same x, and the merge W (2D, D), b (D) starts as
W = [I; I], b = 0: a new pair is exactly x + f_1(x) + f_2(x), which is the sequential pair
x + f_1(x) + f_2(x + f_1(x)) to first order in f_1.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from graft_jax.diffusion import guide
from graft_jax.models.config import DiTConfig, LayerSpec, ParallelPairSpec
from graft_jax.models.embeddings import sincos_2d, timestep_embedding, unpatchify
from graft_jax.operators.kernels import norm_modulate as norm_kernel
from graft_jax.operators.remat import kept, policy as remat_policy, site_input

zeros = nn.initializers.zeros
normal_002 = nn.initializers.normal(0.02)


def norm_modulate(x, shift, scale, eps: float = 1e-6):
  """LN(x) * (1 + scale) + shift (adaLN modulation) for x (B, N, D) and per-sample shift, scale (B, D). LayerNorm
  without affine, statistics always in float32 (bf16 statistics drift over 28 layers).

  The statistics are `kept` for the backward pass: two floats a token, where recomputing them costs the backward
  two reductions over x (an 8-layer DiT-XL/2 train step at batch 256 on an H200: 115.4-116.1 against 118.7-118.9
  ms)."""
  xf = x.astype(jnp.float32)
  mean = kept(xf.mean(-1, keepdims=True))
  rstd = kept(jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps))
  normed = ((xf - mean) * rstd).astype(x.dtype)
  return normed * (1 + scale[:, None]) + shift[:, None]


def fused_norm_modulate(x, shift, scale, stored: bool):
  """(norm_modulate, x) through the GPU kernels where they fit (operators/kernels/norm_modulate.py; XLA's own fusions
  are slower at DiT's width, and its backward takes several passes over x). The residual stream takes x from here, so
  that on the kernels its gradient joins the norm's inside the backward kernel. `stored`: whether an undifferentiated
  call has x in memory anyway (the attention's residual sum h is; a block's input is not, since XLA recomputes it
  inside the norm's fusion, so that call stays on XLA). A differentiated call always takes the kernels: a train step
  writes every block's input (the backward reads it). Mixed dtypes (the composition then promotes) stay on XLA: the
  kernels write x's dtype."""
  if x.dtype == shift.dtype == scale.dtype and norm_kernel.supported(x.shape[1], x.shape[2]):
    return norm_kernel.norm_modulate(x, shift, scale, norm_modulate, kernel_forward=stored)
  return norm_modulate(x, shift, scale), x


def adaln(c, chunks: int, name: str):
  """SiLU -> zero-initialised Linear -> `chunks` modulation vectors (adaLN-Zero)."""
  return jnp.split(nn.Dense(chunks * c.shape[-1], kernel_init=zeros, name=name)(nn.silu(c)), chunks, axis=-1)


class TimestepEmbedder(nn.Module):
  dim: int
  freq_dim: int = 256

  @nn.compact
  def __call__(self, t):
    h = timestep_embedding(t, self.freq_dim)
    h = nn.Dense(self.dim, kernel_init=normal_002, name="mlp_0")(h)
    return nn.Dense(self.dim, kernel_init=normal_002, name="mlp_2")(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class embedding with one extra row, the null class (index num_classes), when labels can be dropped."""
  num_classes: int
  dim: int
  dropout_prob: float

  @nn.compact
  def __call__(self, y, train: bool):
    rows = self.num_classes + (self.dropout_prob > 0)
    table = self.param("embedding_table", normal_002, (rows, self.dim))
    if train and self.dropout_prob > 0:
      drop = jax.random.bernoulli(self.make_rng("label_dropout"), self.dropout_prob, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    return jnp.take(table, y, axis=0)


class DiTBlock(nn.Module):
  """x -> x + f(x); with `update_only`, f(x) alone (a parallel pair's branch)."""
  dim: int
  spec: LayerSpec
  update_only: bool = False

  @nn.compact
  def __call__(self, x, c):
    self.sow("intermediates", "block_in", x)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln(c, 6, "adaLN_modulation")
    normed, x = fused_norm_modulate(x, shift_msa, scale_msa, stored=False)
    attn = self.site("attn", normed, gate_msa[:, None])
    # Written out: the block's output adds to it. `kept` under remat's elementwise policy, since the MLP norm's
    # backward reads it: recomputing it was a pass of 110 us a layer in DiT-XL/2's batch-256 step on an H200.
    h = kept(x + attn)
    normed, h = fused_norm_modulate(h, shift_mlp, scale_mlp, stored=True)
    mlp = self.site("mlp", normed, gate_mlp[:, None])
    # The update is summed on its own (not taken as output - x), so a 16-bit residual stream loses nothing.
    update = attn + mlp
    self.sow("intermediates", "block_update", update)
    return update if self.update_only else h + mlp

  def site(self, name: str, h, gate):
    return operator_site(self, name, h, gate)


def operator_site(block: nn.Module, name: str, h, gate):
  """gate * op(h) for the operator `block.spec` names at site `name` (built at width `block.dim` as a submodule
  called `name`), sowing its input, output and gate: what stage-1 distillation reads, in DiT and PixArt blocks."""
  block.sow("intermediates", f"{name}_in", h)
  out = block.spec.site(name).build(block.dim).clone(name=name, parent=block)(site_input(h, name))
  block.sow("intermediates", f"{name}_out", out)
  block.sow("intermediates", f"{name}_gate", gate)
  return gate * out


def remat_layer(cls: type[nn.Module], remat: str) -> type[nn.Module]:
  """`cls` with activations recomputed in the backward pass as `remat` says (operators/remat.py; parameter names
  unchanged)."""
  if remat == "none":
    return cls
  return nn.remat(cls, policy=remat_policy(remat))


def merge_init(key, shape, dtype=jnp.float32):
  """[I; I] for the (2D, D) merge kernel: the pair starts as the sum of its two blocks' updates."""
  del key
  eye = jnp.eye(shape[1], dtype=dtype)
  return jnp.concatenate([eye, eye])


class ParallelPair(nn.Module):
  """x -> x + W [f_1(x); f_2(x)] + b (see the module docstring); with `update_only`, the merged update alone."""
  dim: int
  spec: ParallelPairSpec
  update_only: bool = False

  @nn.compact
  def __call__(self, x, c):
    updates = [DiTBlock(self.dim, spec, update_only=True, name=f"block_{k}")(x, c)
               for k, spec in enumerate(self.spec.blocks)]
    update = nn.Dense(self.dim, kernel_init=merge_init, bias_init=zeros, name="merge")(jnp.concatenate(updates, -1))
    return update if self.update_only else x + update


class FinalLayer(nn.Module):
  patch_size: int
  out_channels: int

  @nn.compact
  def __call__(self, x, c):
    shift, scale = adaln(c, 2, "adaLN_modulation")
    x = norm_modulate(x, shift, scale)
    return nn.Dense(self.patch_size ** 2 * self.out_channels, kernel_init=zeros, name="linear")(x)


class DiT(nn.Module):
  config: DiTConfig

  @nn.compact
  def __call__(self, x, t, y, train: bool = False):
    cfg = self.config
    if x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
      raise ValueError(f"DiT expects latents (B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}) NHWC, "
                       f"got {x.shape}")
    p, d = cfg.patch_size, cfg.hidden_size
    # torch's xavier on the (D, C*p*p) view of the conv weight: fan_in = C*p*p, fan_out = D.
    patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init, name="x_embedder")(x)
    h = h.reshape(h.shape[0], -1, d) + jnp.asarray(sincos_2d(d, cfg.grid_size), h.dtype)
    c = TimestepEmbedder(d, name="t_embedder")(t).astype(h.dtype)
    c = c + LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, name="y_embedder")(y, train).astype(h.dtype)
    self.sow("intermediates", "cond", c)
    for i, spec in enumerate(cfg.layers):
      layer = remat_layer(ParallelPair if isinstance(spec, ParallelPairSpec) else DiTBlock, cfg.remat)
      h = layer(d, spec, name=f"blocks_{i}")(h, c)
    h = FinalLayer(p, cfg.out_channels, name="final_layer")(h, c)
    return unpatchify(h, p, cfg.grid_size, cfg.grid_size)

  def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = 3):
    """Classifier-free guidance as the original DiT: the batch is [cond; uncond] with identical halves of x;
    eps = uncond + s (cond - uncond) on the first `guided_channels` channels (None: all), the rest from each half."""
    half = x[: x.shape[0] // 2]
    cond, uncond = jnp.split(self(jnp.concatenate([half, half]), t, y), 2)
    guided = guide(cond, uncond, cfg_scale, guided_channels)
    k = cond.shape[-1] if guided_channels is None else guided_channels
    return jnp.concatenate([guided, jnp.concatenate([guided[..., :k], uncond[..., k:]], axis=-1)])


PAIR = "pair"


def capture(model: DiT, params, x, t, y, sites):
  """One forward pass -> (output, {(layer, site): (input, target, context)}) for the given sites of a sequential DiT
  or of a PixArt model (whose blocks sow the same "attn" and "mlp" names).

  `y` is the conditioning after (x, t): DiT's labels, or a tuple of arguments such as PixArt's (caption, mask).
  Site "attn" or "mlp": the operator's input after adaLN modulation, its output before the gate, and the gate
  (B, 1, D). Site "pair" at block i (DiT only): the input of block i, the residual update of blocks i and i + 1
  applied in sequence (their output minus that input), and the conditioning vector c (B, D). Under jit, activations
  of sites not asked for are never materialised.
  """
  cond = y if isinstance(y, tuple) else (y,)
  out, state = model.apply({"params": params}, x, t, *cond, mutable=["intermediates"])
  inter = state["intermediates"]

  def site(i, s):
    if s == PAIR:
      first, second = inter[f"blocks_{i}"], inter[f"blocks_{i + 1}"]
      return first["block_in"][0], first["block_update"][0] + second["block_update"][0], inter["cond"][0]
    return tuple(inter[f"blocks_{i}"][f"{s}_{k}"][0] for k in ("in", "out", "gate"))
  return out, {(i, s): site(i, s) for i, s in sites}


def init_params(config: DiTConfig, key: jax.Array):
  """Freshly initialised parameters for `config`, in one compiled program (eager init compiles every op)."""
  x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels))
  i = jnp.zeros((1,), jnp.int32)
  return jax.jit(DiT(config).init)(key, x, i, i)["params"]
