"""PixArt-alpha/Sigma in Flax: adaLN-single blocks with cross-attention to caption tokens; each layer's self-attention
and MLP are picked by registry name, exactly as DiT's sites, so the same plans graft them.

Contract: latents NHWC (B, H, W, C), t (B,), caption (B, L, caption_channels), mask (B, L) (true or 1 for a real
token, None for all real) -> NHWC (B, H, W, 2C) when learn_sigma. H and W may differ from the training size: the
position table is recomputed for the grid at hand with PixArt's base-size scaling.

Block: x += gate_msa * attn(modulate(LN(x))); x += cross_attn(x, caption) (no norm, no gate);
x += gate_mlp * mlp(modulate(LN(x))), with the six modulation vectors = the block's scale_shift_table + one
shared t_block(t) (adaLN-single). The "attn" and "mlp" sites sow their inputs, outputs and gates into
"intermediates" as DiT's do (dit.operator_site), which is what stage-1 distillation reads. Parallel pairs are a DiT
edit only, so nothing else is sown.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from graft_jax.diffusion import guide
from graft_jax.models.config import LayerSpec, PixArtConfig
from graft_jax.models.dit import TimestepEmbedder, norm_modulate, normal_002, operator_site, remat_layer, zeros
from graft_jax.models.embeddings import sincos_2d, unpatchify
from graft_jax.operators import init
from graft_jax.operators.attention import key_masked_attention


def randn_init(key, shape, dtype=jnp.float32):
  """randn / sqrt(last axis): PixArt's start for the scale-shift tables (D) and the null caption (caption channels)."""
  return jax.random.normal(key, shape, dtype) / jnp.sqrt(shape[-1]).astype(dtype)


class CaptionEmbedder(nn.Module):
  """Caption features -> width D (Linear, GELU tanh, Linear), after swapping dropped captions for the learned null
  caption `y_embedding` (L, caption_channels). The mask is left as it was: PixArt trains and guides that way."""
  dim: int
  channels: int
  length: int

  @nn.compact
  def __call__(self, caption, drop):
    null = self.param("y_embedding", randn_init, (self.length, self.channels))
    if drop is not None:
      if caption.shape[1] != self.length:
        raise ValueError(f"the null caption has {self.length} tokens, so dropped captions must too, got "
                         f"{caption.shape[1]}")
      caption = jnp.where(drop[:, None, None], null.astype(caption.dtype), caption)
    h = nn.Dense(self.dim, kernel_init=normal_002, name="fc1")(caption)
    return nn.Dense(self.dim, kernel_init=normal_002, name="fc2")(nn.gelu(h, approximate=True))


class CrossAttention(nn.Module):
  """Image tokens attend to caption tokens; padded caption tokens (mask false) get no weight."""
  dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x, y, mask):
    b, n, d = x.shape
    q = init.dense(d, "q_linear")(x).reshape(b, n, self.num_heads, -1)
    k, v = (u.reshape(b, y.shape[1], self.num_heads, -1) for u in init.FusedDense((d, d), name="kv_linear")(y))
    out = key_masked_attention(q, k, v, mask)
    return nn.Dense(d, kernel_init=zeros, name="proj")(out.reshape(b, n, d))


class PixArtBlock(nn.Module):
  dim: int
  num_heads: int
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, t6, y, mask):
    table = self.param("scale_shift_table", randn_init, (6, self.dim))
    mods = table[None].astype(t6.dtype) + t6.reshape(t6.shape[0], 6, self.dim)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mods[:, k] for k in range(6))
    x = x + operator_site(self, "attn", norm_modulate(x, shift_msa, scale_msa), gate_msa[:, None])
    x = x + CrossAttention(self.dim, self.num_heads, name="cross_attn")(x, y, mask)
    return x + operator_site(self, "mlp", norm_modulate(x, shift_mlp, scale_mlp), gate_mlp[:, None])


class FinalLayer(nn.Module):
  """Modulated by its own (2, D) table plus the raw timestep embedding (no SiLU, no Linear), as PixArt does."""
  patch_size: int
  out_channels: int

  @nn.compact
  def __call__(self, x, t):
    table = self.param("scale_shift_table", randn_init, (2, x.shape[-1]))
    mods = table[None].astype(t.dtype) + t[:, None]
    x = norm_modulate(x, mods[:, 0], mods[:, 1])
    return nn.Dense(self.patch_size ** 2 * self.out_channels, kernel_init=zeros, name="linear")(x)


class PixArt(nn.Module):
  config: PixArtConfig

  @nn.compact
  def __call__(self, x, t, caption, mask=None, train: bool = False, drop=None):
    """`drop` (B,) bool forces the null caption for those samples (classifier-free guidance); in training each
    caption is also dropped with probability caption_dropout_prob (rng "label_dropout", the name DiT's trainers
    already pass)."""
    cfg = self.config
    p, d = cfg.patch_size, cfg.hidden_size
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"PixArt expects latents (B, H, W, {cfg.in_channels}) NHWC with H, W divisible by {p}, "
                       f"got {x.shape}")
    if any(not isinstance(layer, LayerSpec) for layer in cfg.layers):
      raise ValueError("PixArt layers are plain blocks; parallel pairs are a DiT edit only")
    gh, gw = x.shape[1] // p, x.shape[2] // p
    patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init, name="x_embedder")(x)
    pos = sincos_2d(d, gh, gw, base_size=cfg.base_size, interpolation=cfg.pe_interpolation)
    h = h.reshape(h.shape[0], -1, d) + jnp.asarray(pos, h.dtype)

    temb = TimestepEmbedder(d, name="t_embedder")(t).astype(h.dtype)
    t6 = nn.Dense(6 * d, kernel_init=normal_002, name="t_block")(nn.silu(temb))
    if train and cfg.caption_dropout_prob > 0:
      dropped = jax.random.bernoulli(self.make_rng("label_dropout"), cfg.caption_dropout_prob, (x.shape[0],))
      drop = dropped if drop is None else drop | dropped
    y = CaptionEmbedder(d, cfg.caption_channels, cfg.caption_length, name="y_embedder")(caption, drop)
    y = y.astype(h.dtype)

    for i, spec in enumerate(cfg.layers):
      h = remat_layer(PixArtBlock, cfg.remat)(d, cfg.num_heads, spec, name=f"blocks_{i}")(h, t6, y, mask)
    h = FinalLayer(p, cfg.out_channels, name="final_layer")(h, temb)
    return unpatchify(h, p, gh, gw)

  def forward_with_cfg(self, x, t, caption, mask, cfg_scale: float, guided_channels: int | None = None,
                       learned_null: bool = True):
    """Classifier-free guidance: the batch is [cond; uncond] with identical halves of x; eps = uncond + s (cond -
    uncond) on the first `guided_channels` channels (None: all C, as PixArt's DPM-Solver wrapper guides), the rest
    from each half. The uncond half's caption is the learned null caption (its mask kept, as the original samples),
    or with `learned_null=False` whatever the caller put there: diffusers' way, the T5 encoding of "" and its mask,
    which is the only choice for diffusers weights (they carry no null caption)."""
    half = x.shape[0] // 2
    xx = jnp.concatenate([x[:half], x[:half]])
    drop = jnp.arange(x.shape[0]) >= half if learned_null else None
    cond, uncond = jnp.split(self(xx, t, caption, mask, drop=drop), 2)
    k = self.config.in_channels if guided_channels is None else guided_channels
    guided = guide(cond, uncond, cfg_scale, k)
    return jnp.concatenate([guided, jnp.concatenate([guided[..., :k], uncond[..., k:]], axis=-1)])


def init_params(config: PixArtConfig, key: jax.Array):
  """Freshly initialised parameters for `config`, in one compiled program."""
  x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels))
  caption = jnp.zeros((1, config.caption_length, config.caption_channels))
  return jax.jit(PixArt(config).init)(key, x, jnp.zeros((1,), jnp.int32), caption)["params"]
