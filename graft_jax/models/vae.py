"""AutoencoderKL (the SD / SDXL VAE): encoder to a diagonal Gaussian over latents, decoder back to pixels.

Layout follows diffusers' AutoencoderKL, in NHWC. Parameter tree:
  encoder/{conv_in, down_i/{res_j, downsample}, mid/{res_0, attn, res_1}, norm_out, conv_out}, quant_conv,
  post_quant_conv, decoder/{conv_in, mid, up_i/{res_j, upsample}, norm_out, conv_out}
with up_0 the lowest resolution (diffusers' up_blocks order; LDM's decoder.up runs the other way).
SD and SDXL share the architecture and differ only in the latent scaling factor.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SD_SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025
SCALING_FACTORS = {"sd": SD_SCALING_FACTOR, "sdxl": SDXL_SCALING_FACTOR}

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before sampling.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an AutoencoderKL; the defaults are the SD / SDXL VAE."""
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-6

  def __post_init__(self):
    # Configs read back from JSON carry lists; a Flax module attribute must be hashable.
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))


def _conv(features: int, name: str, kernel: int = 3) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), name=name)


def _group_norm(config: VAEConfig, x: jax.Array, name: str) -> jax.Array:
  """torch GroupNorm in float32: two-pass variance, since E[x^2] - E[x]^2 loses digits on large activations."""
  norm = nn.GroupNorm(num_groups=config.norm_num_groups, epsilon=config.norm_eps, use_fast_variance=False,
                      dtype=jnp.float32, name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
  """norm, SiLU, conv, norm, SiLU, conv, plus the input (through a 1x1 conv when the width changes)."""
  config: VAEConfig
  features: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, "conv1")(nn.silu(_group_norm(self.config, x, "norm1")))
    h = _conv(self.features, "conv2")(nn.silu(_group_norm(self.config, h, "norm2")))
    if x.shape[-1] != self.features:
      x = _conv(self.features, "shortcut", kernel=1)(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over the H*W positions, channels as the embedding, with a residual."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = _group_norm(self.config, x, "norm").reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, name=name)(tokens) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = nn.Dense(c, name="out")(jnp.einsum("bqk,bkc->bqc", probs, v))
    return x + out.reshape(x.shape)


class MidBlock(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = ResnetBlock(self.config, width, name="res_0")(x)
    x = SpatialSelfAttention(self.config, name="attn")(x)
    return ResnetBlock(self.config, width, name="res_1")(x)


def _upsample_nearest(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class DownBlock(nn.Module):
  config: VAEConfig
  features: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.config.layers_per_block):
      x = ResnetBlock(self.config, self.features, name=f"res_{j}")(x)
    if self.downsample:
      # Asymmetric pad (bottom/right only) then a VALID stride-2 conv, as diffusers' Downsample2D(padding=0).
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = nn.Conv(self.features, (3, 3), strides=(2, 2), padding="VALID", name="downsample")(x)
    return x


class UpBlock(nn.Module):
  config: VAEConfig
  features: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.config.layers_per_block + 1):
      x = ResnetBlock(self.config, self.features, name=f"res_{j}")(x)
    if self.upsample:
      x = _conv(self.features, "upsample")(_upsample_nearest(x))
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels), f = 2^(len(block_out_channels) - 1)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    channels = self.config.block_out_channels
    x = _conv(channels[0], "conv_in")(x)
    for i, width in enumerate(channels):
      x = DownBlock(self.config, width, downsample=i < len(channels) - 1, name=f"down_{i}")(x)
    x = MidBlock(self.config, name="mid")(x)
    x = nn.silu(_group_norm(self.config, x, "norm_out"))
    return _conv(2 * self.config.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    channels = self.config.block_out_channels[::-1]
    x = _conv(channels[0], "conv_in")(z)
    x = MidBlock(self.config, name="mid")(x)
    for i, width in enumerate(channels):
      x = UpBlock(self.config, width, upsample=i < len(channels) - 1, name=f"up_{i}")(x)
    x = nn.silu(_group_norm(self.config, x, "norm_out"))
    return _conv(self.config.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder. Images are NHWC in [-1, 1]; `encode` gives the posterior's (mean, logvar)."""
  config: VAEConfig = VAEConfig()

  def setup(self):
    latent = self.config.latent_channels
    self.encoder = Encoder(self.config)
    self.quant_conv = _conv(2 * latent, "quant_conv", kernel=1)
    self.post_quant_conv = _conv(latent, "post_quant_conv", kernel=1)
    self.decoder = Decoder(self.config)

  def encode(self, x):
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, logvar

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    """Reconstruction from the posterior mean; also what `init` traces to create every parameter."""
    return self.decode(self.encode(x)[0])

  @nn.nowrap
  def encode_latents(self, params, images, key, scale: float):
    """Diffusion latents: a posterior sample (its mean when key is None) times the scaling factor, in float32.

    Images are cast to the parameters' dtype, so a bfloat16 parameter tree encodes in bfloat16.
    """
    images = images.astype(_param_dtype(params))
    mean, logvar = self.apply({"params": params}, images, method=AutoencoderKL.encode)
    mean = mean.astype(jnp.float32)
    if key is None:
      return mean * scale
    std = jnp.exp(0.5 * jnp.clip(logvar.astype(jnp.float32), *LOGVAR_RANGE))
    return (mean + std * jax.random.normal(key, mean.shape, jnp.float32)) * scale

  @nn.nowrap
  def decode_latents(self, params, latents, scale: float):
    """Images in about [-1, 1] (float32) from diffusion latents, undoing the scaling factor."""
    z = (latents / scale).astype(_param_dtype(params))
    return self.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)


def _param_dtype(params) -> jnp.dtype:
  return params["post_quant_conv"]["kernel"].dtype
