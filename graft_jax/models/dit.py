"""DiT (Peebles & Xie) in Flax: adaLN-Zero blocks whose sequence and channel mixers are picked per layer by name.

Contract: latents NHWC (B, H, W, C), t int (B,), y int (B,) -> NHWC (B, H, W, 2C) when learn_sigma.
Each block sows, into the "intermediates" collection, every operator's input (after adaLN modulation) and output
(before the gate): stage-1 distillation reads the teacher's activations from one ordinary forward pass.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from graft_jax.models.config import DiTConfig, LayerSpec
from graft_jax.models.embeddings import sincos_2d, timestep_embedding, unpatchify
from graft_jax.operators import init

zeros = nn.initializers.zeros
normal_002 = nn.initializers.normal(0.02)


def layer_norm(x, eps: float = 1e-6):
  """LayerNorm without affine, always in float32 (bf16 statistics drift over 28 layers)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


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
  dim: int
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln(c, 6, "adaLN_modulation")
    x = x + self.site("attn", modulate(layer_norm(x), shift_msa, scale_msa), gate_msa[:, None])
    return x + self.site("mlp", modulate(layer_norm(x), shift_mlp, scale_mlp), gate_mlp[:, None])

  def site(self, name: str, h, gate):
    self.sow("intermediates", f"{name}_in", h)
    out = self.spec.site(name).build(self.dim).clone(name=name, parent=self)(h)
    self.sow("intermediates", f"{name}_out", out)
    self.sow("intermediates", f"{name}_gate", gate)
    return gate * out


class FinalLayer(nn.Module):
  patch_size: int
  out_channels: int

  @nn.compact
  def __call__(self, x, c):
    shift, scale = adaln(c, 2, "adaLN_modulation")
    x = modulate(layer_norm(x), shift, scale)
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
    for i, spec in enumerate(cfg.layers):
      h = DiTBlock(d, spec, name=f"blocks_{i}")(h, c)
    h = FinalLayer(p, cfg.out_channels, name="final_layer")(h, c)
    return unpatchify(h, p, cfg.grid_size, cfg.grid_size)

  def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = 3):
    """Classifier-free guidance as the original DiT: the batch is [cond; uncond] with identical halves of x;
    eps = uncond + s (cond - uncond) on the first `guided_channels` channels (None: all), the rest from each half."""
    half = x[: x.shape[0] // 2]
    out = self(jnp.concatenate([half, half]), t, y)
    k = out.shape[-1] if guided_channels is None else guided_channels
    cond, uncond = jnp.split(out[..., :k], 2)
    guided = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([guided, guided]), out[..., k:]], axis=-1)


def capture(model: DiT, params, x, t, y, sites):
  """One forward pass -> (output, {(layer, site): (operator input, operator output, gate)}) for the given sites.

  The input is after adaLN modulation, the output before the gate; the gate is (B, 1, D). Under jit, activations of
  sites not asked for are never materialised.
  """
  out, state = model.apply({"params": params}, x, t, y, mutable=["intermediates"])
  inter = state["intermediates"]
  return out, {(i, s): tuple(inter[f"blocks_{i}"][f"{s}_{k}"][0] for k in ("in", "out", "gate")) for i, s in sites}


def init_params(config: DiTConfig, key: jax.Array):
  """Freshly initialised parameters for `config`, in one compiled program (eager init compiles every op)."""
  x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels))
  i = jnp.zeros((1,), jnp.int32)
  return jax.jit(DiT(config).init)(key, x, i, i)["params"]
