"""AutoencoderKL: parity with diffusers (random weights), the three checkpoint spellings, and import errors."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from graft_jax.convert.vae import vae_params_from_torch
from graft_jax.models import vae

RTOL = 1e-5


def torch_vae(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32, seed=0):
  """A tiny diffusers VAE whose norms and biases (constant at init) are randomised too."""
  torch.manual_seed(seed)
  n = len(block_out_channels)
  model = TorchAutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=block_out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, sample_size=16)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


_OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_LDM_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_old_spelling(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  pattern = re.compile(r"(attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\.")
  return {pattern.sub(lambda m: f"{m[1]}{_OLD_ATTN[m[2]]}.", k): v for k, v in sd.items()}


def to_ldm_spelling(sd: dict[str, np.ndarray], num_blocks: int) -> dict[str, np.ndarray]:
  """Rename the way the original LDM code names modules; attention Linears become (C, C, 1, 1) convs."""
  rules = [
      (r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
      (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
      (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_blocks - 1 - int(m[1])}.block."),
      (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_blocks - 1 - int(m[1])}.upsample."),
      (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
      (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
       lambda m: f"mid.attn_1.{_LDM_ATTN[m[1]]}."),
      (r"conv_shortcut\.", lambda m: "nin_shortcut."),
      (r"conv_norm_out\.", lambda m: "norm_out."),
  ]
  out = {}
  for key, value in sd.items():
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
      value = value[:, :, None, None]
    out[key] = value
  return out


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


class Compiled:
  """One jitted function per entry point, so each test pays XLA's compile once per shape, not per op."""

  def __init__(self, ours: vae.AutoencoderKL):
    self.encode = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=ours.encode))
    self.decode = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=ours.decode))
    self.encode_latents = jax.jit(ours.encode_latents)
    self.decode_latents = jax.jit(ours.decode_latents)


@pytest.fixture(scope="module")
def tiny():
  model = torch_vae()
  config, params = vae_params_from_torch(numpy_state_dict(model))
  return model, Compiled(vae.AutoencoderKL(vae.VAEConfig(**config))), params


@pytest.mark.parametrize("layers_per_block,groups", [(2, 32), (1, 8)])
def test_encode_decode_match_diffusers(layers_per_block, groups):
  model = torch_vae(layers_per_block=layers_per_block, norm_num_groups=groups)
  config, params = vae_params_from_torch(numpy_state_dict(model), norm_num_groups=groups)
  assert config["block_out_channels"] == (32, 64) and config["layers_per_block"] == layers_per_block
  ours = Compiled(vae.AutoencoderKL(vae.VAEConfig(**config)))
  # Non-square images catch an H/W mix-up in the attention's token order.
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  latents = np.random.default_rng(1).normal(size=(2, 8, 12, 4)).astype(np.float32)
  with torch.no_grad():
    ref_mean, ref_logvar = torch.chunk(model.quant_conv(model.encoder(nchw(images))), 2, dim=1)
    ref_images = model.decode(nchw(latents)).sample
  mean, logvar = ours.encode(params, images)
  decoded = ours.decode(params, latents)
  assert mean.shape == (2, 8, 12, 4) and decoded.shape == images.shape
  assert rel_err(mean, nhwc(ref_mean)) < RTOL
  assert rel_err(logvar, nhwc(ref_logvar)) < RTOL
  assert rel_err(decoded, nhwc(ref_images)) < RTOL


def test_encode_latents_follow_diffusers_posterior(tiny):
  """Sample = mean + std * noise with diffusers' clamped std; a huge logvar bias exercises the clamp."""
  model, ours, params = tiny
  params = jax.tree_util.tree_map(np.copy, params)
  params["quant_conv"]["bias"][4:] += 60.0
  with torch.no_grad():
    model = torch_vae()
    model.quant_conv.bias[4:] += 60.0
  images = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  key = jax.random.key(3, impl="rbg")  # threefry would add seconds of CPU compile for the same check
  with torch.no_grad():
    posterior = model.encode(nchw(images)).latent_dist
  noise = np.asarray(jax.random.normal(key, (1, 8, 8, 4)))
  expected = (nhwc(posterior.mean) + nhwc(posterior.std) * noise) * vae.SDXL_SCALING_FACTOR
  sampled = ours.encode_latents(params, images, key, vae.SDXL_SCALING_FACTOR)
  assert sampled.dtype == jnp.float32
  assert rel_err(sampled, expected) < RTOL
  mode = ours.encode_latents(params, images, None, vae.SD_SCALING_FACTOR)
  assert rel_err(mode, nhwc(posterior.mean) * vae.SD_SCALING_FACTOR) < RTOL


def test_decode_latents_divides_by_scale(tiny):
  model, ours, params = tiny
  latents = np.random.default_rng(4).normal(size=(1, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    expected = nhwc(model.decode(nchw(latents / vae.SD_SCALING_FACTOR)).sample)
  assert rel_err(ours.decode_latents(params, latents, vae.SD_SCALING_FACTOR), expected) < RTOL


def test_bfloat16_params_compute_close_to_float32(tiny):
  _, ours, params = tiny
  images = np.random.default_rng(5).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  half = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.bfloat16), params)
  exact = ours.encode_latents(params, images, None, 1.0)
  approx = ours.encode_latents(half, images, None, 1.0)
  decoded_err = rel_err(ours.decode_latents(half, exact, 1.0), ours.decode_latents(params, exact, 1.0))
  assert approx.dtype == jnp.float32
  # Above 1e-4 shows the bfloat16 tree really computed in bfloat16 rather than being promoted to float32.
  assert 1e-4 < rel_err(approx, exact) < 0.1 and 1e-4 < decoded_err < 0.1


def test_ldm_renaming_is_what_diffusers_converts_back():
  """Guards the test's own LDM spelling with diffusers' independent single-file converter."""
  model = torch_vae(block_out_channels=(32, 32, 64))
  sd = numpy_state_dict(model)
  back = convert_ldm_vae_checkpoint(to_ldm_spelling(sd, 3), dict(model.config))
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(np.asarray(back[k]), sd[k])


def test_old_and_ldm_spellings_convert_identically():
  model = torch_vae(block_out_channels=(32, 32, 64))  # three blocks: LDM's reversed decoder order matters
  sd = numpy_state_dict(model)
  config, params = vae_params_from_torch(sd)
  for other in (to_old_spelling(sd), to_ldm_spelling(sd, 3)):
    assert set(other) != set(sd)
    other_config, other_params = vae_params_from_torch(other)
    assert other_config == config
    assert_trees_equal(other_params, params)


def test_sd_sized_state_dict_gives_default_config():
  with torch.device("meta"):
    model = TorchAutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
  # Zero-strided views: the shapes of the real thing without its memory.
  sd = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()}
  config, params = vae_params_from_torch(sd)
  assert vae.VAEConfig(**config) == vae.VAEConfig()
  assert sum(np.size(p) for p in jax.tree_util.tree_leaves(params)) == sum(np.size(v) for v in sd.values())


def test_errors_name_the_offending_tensors(tiny):
  model, _, _ = tiny
  sd = numpy_state_dict(model)
  extra = dict(sd, **{"decoder.extra.weight": np.zeros((5, 7), np.float32)})
  with pytest.raises(ValueError, match=r"left over: decoder\.extra\.weight \(5, 7\)"):
    vae_params_from_torch(extra)
  missing = {k: v for k, v in sd.items() if k != "encoder.mid_block.attentions.0.to_k.bias"}
  with pytest.raises(ValueError, match=r"missing: encoder\.mid_block\.attentions\.0\.to_k\.bias"):
    vae_params_from_torch(missing)
  wrong = dict(sd, **{"decoder.up_blocks.1.resnets.0.norm1.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"'up_1'.*'res_0'.*'norm1'.*got \(3,\), model expects \(64,\)"):
    vae_params_from_torch(wrong)
  with pytest.raises(ValueError, match="not an AutoencoderKL state dict"):
    vae_params_from_torch({"pos_embed": np.zeros((1, 4, 8), np.float32)})
