"""PyTorch AutoencoderKL state dict -> (config, Flax params) for graft_jax.models.vae.

Three spellings are read, picked from the keys:
  diffusers        encoder.down_blocks.i.resnets.j, mid_block.attentions.0.to_{q,k,v}, to_out.0
  diffusers (old)  as above, attention named query / key / value / proj_attn
  LDM / original   encoder.down.i.block.j, mid.block_{1,2}, mid.attn_1.{norm,q,k,v,proj_out} (1x1 convs),
                   nin_shortcut, norm_out, decoder.up.i indexed from the highest resolution
The architecture is read from tensor shapes; the GroupNorm group count is not stored, so it is an argument.
Every tensor must be used: missing, left-over or mis-shaped tensors raise one ValueError naming them all.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.models import vae as vae_model


@dataclasses.dataclass(frozen=True)
class _Spelling:
  """Torch module names, as str.format templates over block index i, layer index j and n = j + 1."""
  down: str
  up: str
  up_reversed: bool  # LDM numbers decoder blocks from the highest resolution, diffusers from the lowest
  resnet: str
  downsample: str
  upsample: str
  mid_resnet: str
  mid_attn: str
  shortcut: str
  norm_out: str
  attn: Mapping[str, str]  # flax name -> torch name inside the attention module


_DIFFUSERS = _Spelling(
    down="encoder.down_blocks.{i}", up="decoder.up_blocks.{i}", up_reversed=False, resnet="resnets.{j}",
    downsample="downsamplers.0.conv", upsample="upsamplers.0.conv", mid_resnet="mid_block.resnets.{j}",
    mid_attn="mid_block.attentions.0", shortcut="conv_shortcut", norm_out="conv_norm_out",
    attn={"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"})
_DIFFUSERS_OLD = dataclasses.replace(
    _DIFFUSERS, attn={"norm": "group_norm", "q": "query", "k": "key", "v": "value", "out": "proj_attn"})
_LDM = _Spelling(
    down="encoder.down.{i}", up="decoder.up.{i}", up_reversed=True, resnet="block.{j}",
    downsample="downsample.conv", upsample="upsample.conv", mid_resnet="mid.block_{n}", mid_attn="mid.attn_1",
    shortcut="nin_shortcut", norm_out="norm_out",
    attn={"norm": "norm", "q": "q", "k": "k", "v": "v", "out": "proj_out"})


class _Reader:
  """Takes tensors out of a state dict by name, recording the names asked for but absent."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.remaining = dict(state_dict)
    self.missing: list[str] = []

  def take(self, name: str) -> np.ndarray | None:
    if name not in self.remaining:
      self.missing.append(name)
      return None
    return np.asarray(self.remaining.pop(name), dtype=np.float32)

  def conv(self, name: str) -> dict[str, np.ndarray | None]:
    w = self.take(f"{name}.weight")
    return {"kernel": None if w is None else w.transpose(2, 3, 1, 0), "bias": self.take(f"{name}.bias")}

  def linear(self, name: str) -> dict[str, np.ndarray | None]:
    """A Linear, or the 1x1 conv (LDM) / 1-wide conv1d an older file stores in its place."""
    w = self.take(f"{name}.weight")
    return {"kernel": None if w is None else w.reshape(w.shape[:2]).T, "bias": self.take(f"{name}.bias")}

  def norm(self, name: str) -> dict[str, np.ndarray | None]:
    return {"scale": self.take(f"{name}.weight"), "bias": self.take(f"{name}.bias")}


def _spelling(keys) -> _Spelling:
  if any(k.startswith("encoder.down.") for k in keys):
    return _LDM
  if any(k.startswith("encoder.mid_block.attentions.0.query.") for k in keys):
    return _DIFFUSERS_OLD
  return _DIFFUSERS


def _shape(state_dict: Mapping[str, Any], name: str) -> tuple[int, ...]:
  if name not in state_dict:
    raise ValueError(f"not an AutoencoderKL state dict: it has no {name!r}.")
  return tuple(np.shape(state_dict[name]))


def _count(state_dict: Mapping[str, Any], template: str) -> int:
  n = 0
  while template.format(n) in state_dict:
    n += 1
  return n


def _infer_config(state_dict: Mapping[str, Any], sp: _Spelling, norm_num_groups: int) -> vae_model.VAEConfig:
  first_resnet = f"{sp.down}.{sp.resnet}.conv1.weight"
  num_blocks = _count(state_dict, first_resnet.format(i="{}", j=0))
  if num_blocks == 0:
    raise ValueError(f"not an AutoencoderKL state dict: it has no {first_resnet.format(i=0, j=0)!r}.")
  return vae_model.VAEConfig(
      block_out_channels=tuple(_shape(state_dict, first_resnet.format(i=i, j=0))[0] for i in range(num_blocks)),
      layers_per_block=_count(state_dict, first_resnet.format(i=0, j="{}")),
      latent_channels=_shape(state_dict, "post_quant_conv.weight")[0],
      in_channels=_shape(state_dict, "encoder.conv_in.weight")[1],
      out_channels=_shape(state_dict, "decoder.conv_out.weight")[0],
      norm_num_groups=norm_num_groups)


def _resnet(r: _Reader, prefix: str, sp: _Spelling) -> dict[str, Any]:
  params = {"norm1": r.norm(f"{prefix}.norm1"), "conv1": r.conv(f"{prefix}.conv1"),
            "norm2": r.norm(f"{prefix}.norm2"), "conv2": r.conv(f"{prefix}.conv2")}
  kernel = params["conv1"]["kernel"]
  if kernel is not None and kernel.shape[2] != kernel.shape[3]:
    params["shortcut"] = r.conv(f"{prefix}.{sp.shortcut}")
  return params


def _mid(r: _Reader, part: str, sp: _Spelling) -> dict[str, Any]:
  attn = f"{part}.{sp.mid_attn}"
  params = {f"res_{j}": _resnet(r, f"{part}.{sp.mid_resnet.format(j=j, n=j + 1)}", sp) for j in range(2)}
  params["attn"] = {flax_name: (r.norm if flax_name == "norm" else r.linear)(f"{attn}.{torch_name}")
                    for flax_name, torch_name in sp.attn.items()}
  return params


def _encoder(r: _Reader, sp: _Spelling, config: vae_model.VAEConfig) -> dict[str, Any]:
  num_blocks = len(config.block_out_channels)
  params: dict[str, Any] = {"conv_in": r.conv("encoder.conv_in")}
  for i in range(num_blocks):
    block = sp.down.format(i=i)
    params[f"down_{i}"] = {f"res_{j}": _resnet(r, f"{block}.{sp.resnet.format(j=j)}", sp)
                           for j in range(config.layers_per_block)}
    if i < num_blocks - 1:
      params[f"down_{i}"]["downsample"] = r.conv(f"{block}.{sp.downsample}")
  params["mid"] = _mid(r, "encoder", sp)
  params["norm_out"] = r.norm(f"encoder.{sp.norm_out}")
  params["conv_out"] = r.conv("encoder.conv_out")
  return params


def _decoder(r: _Reader, sp: _Spelling, config: vae_model.VAEConfig) -> dict[str, Any]:
  num_blocks = len(config.block_out_channels)
  params: dict[str, Any] = {"conv_in": r.conv("decoder.conv_in"), "mid": _mid(r, "decoder", sp)}
  for i in range(num_blocks):
    block = sp.up.format(i=num_blocks - 1 - i if sp.up_reversed else i)
    params[f"up_{i}"] = {f"res_{j}": _resnet(r, f"{block}.{sp.resnet.format(j=j)}", sp)
                         for j in range(config.layers_per_block + 1)}
    if i < num_blocks - 1:
      params[f"up_{i}"]["upsample"] = r.conv(f"{block}.{sp.upsample}")
  params["norm_out"] = r.norm(f"decoder.{sp.norm_out}")
  params["conv_out"] = r.conv("decoder.conv_out")
  return params


def _shape_errors(config: vae_model.VAEConfig, params: dict[str, Any]) -> list[str]:
  """Tensors whose shapes disagree with the model the inferred config builds."""
  size = 2 ** (len(config.block_out_channels) - 1)
  images = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  expected = jax.eval_shape(vae_model.AutoencoderKL(config).init, jax.random.key(0), images)["params"]
  want = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): np.shape(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  return [f"{path}: got {got.get(path)}, model expects {want.get(path)}"
          for path in sorted(want.keys() | got.keys()) if got.get(path) != want.get(path)]


def vae_params_from_torch(state_dict: Mapping[str, Any], *,
                          norm_num_groups: int = 32) -> tuple[dict[str, Any], dict[str, Any]]:
  """(config dict for VAEConfig, Flax params) from a PyTorch AutoencoderKL state dict of numpy arrays.

  The state dict holds the VAE's tensors only (strip a full checkpoint's "first_stage_model." / "vae." prefix
  first). Parameters come back as float32.
  """
  sp = _spelling(state_dict)
  config = _infer_config(state_dict, sp, norm_num_groups)
  r = _Reader(state_dict)
  params = {"encoder": _encoder(r, sp, config), "quant_conv": r.conv("quant_conv"),
            "post_quant_conv": r.conv("post_quant_conv"), "decoder": _decoder(r, sp, config)}
  problems = []
  if r.missing:
    problems.append("missing: " + ", ".join(r.missing))
  if r.remaining:
    problems.append("left over: " + ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in sorted(r.remaining.items())))
  if not problems:
    problems += _shape_errors(config, params)
  if problems:
    raise ValueError(f"AutoencoderKL state dict does not match an AutoencoderKL with {config}: "
                     + "; ".join(problems))
  return dataclasses.asdict(config), params
