"""PixArt-alpha/Sigma checkpoints (original `.pth` or diffusers `PixArtTransformer2DModel`) -> (PixArtConfig, params).

As for DiT, diffusers keys are renamed to the original layout first, so one importer reads both; each block's
self-attention and MLP are identified through the operator registry (plain `mha`, KV-compressed attention, or a
grafted operator). Diffusers weights carry no learned null caption: it is imported as zeros, and guidance with them
should use the T5 encoding of "" (PixArt.forward_with_cfg with learned_null=False).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from graft_jax.convert.dit import check_params, operator_from_pool
from graft_jax.convert.state_dict import ConversionError, KeyPool
from graft_jax.models.config import LayerSpec, PixArtConfig
from graft_jax.models.embeddings import sincos_2d
from graft_jax.models.pixart import init_params
from graft_jax.operators.init import dense_from_torch

FORMATS = ("pixart", "diffusers")
XL_HEADS = {1152: 16}  # PixArt-XL/2, the only released width


def detect_format(tensors: Mapping[str, np.ndarray]) -> str | None:
  """"pixart", "diffusers", or None when the keys are not PixArt's at all."""
  if "t_block.1.weight" in tensors and "blocks.0.cross_attn.q_linear.weight" in tensors:
    return "pixart"
  if "adaln_single.linear.weight" in tensors and "transformer_blocks.0.attn2.to_q.weight" in tensors:
    return "diffusers"
  return None


_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj", "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "adaln_single.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1", "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "proj_out": "final_layer.linear", "scale_shift_table": "final_layer.scale_shift_table"}  # a whole key
_DIFFUSERS_BLOCK = {
    "attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}
# Projections diffusers splits that the original fuses, in the fused order.
_FUSED = {"attn1": ("attn.qkv", ("to_q", "to_k", "to_v")), "attn2": ("cross_attn.kv_linear", ("to_k", "to_v"))}


def diffusers_to_original(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rename a diffusers PixArt state dict to the original layout, fusing attn1's q, k, v and attn2's k, v."""
  out, parts = {}, {}
  for key, value in tensors.items():
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(?:(.+)\.)?(\w+)", key)
    if m is None:  # top level; the final layer's scale_shift_table sits here in diffusers
      module, _, leaf = key.rpartition(".")
      out[_DIFFUSERS_TOP.get(key) or f"{_DIFFUSERS_TOP.get(module, module)}.{leaf}"] = value
      continue
    i, sub, leaf = m.groups()
    attn, _, proj = (sub or "").partition(".")
    if sub is None:  # the block's own scale_shift_table
      out[f"blocks.{i}.{leaf}"] = value
    elif attn in _FUSED and proj in _FUSED[attn][1]:
      parts.setdefault((i, attn, leaf), {})[proj] = value
    else:
      out[f"blocks.{i}.{_DIFFUSERS_BLOCK.get(sub, sub)}.{leaf}"] = value
  for (i, attn, leaf), found in parts.items():
    fused, order = _FUSED[attn]
    if set(found) != set(order):
      raise ConversionError(f"block {i} lacks some of {attn}.{{{','.join(order)}}}.{leaf}.")
    out[f"blocks.{i}.{fused}.{leaf}"] = np.concatenate([found[p] for p in order], axis=0)
  return out


def infer_pe_interpolation(table: np.ndarray, grid: int) -> float:
  """PixArt's stored table encodes row r at angle r / pe_interpolation in its first frequency (base_size = grid), so
  row 1's sin and cos give the scale; the caller checks the whole table against it."""
  half = table.shape[-1] // 2
  row1 = table[grid, half:]  # token (1, 0): the second half encodes the row
  return float(np.round(1.0 / np.arctan2(row1[0], row1[half // 2]), 4))


def _geometry(pool: KeyPool, dim: int, patch: int, input_size: int | None, pe_interpolation: float | None):
  """(latent size, pe_interpolation): a stored pos_embed fixes both (and is dropped once it matches the recomputed
  table); otherwise the given values, else PixArt-Sigma-1024's 128 and PixArt's rule image size / 512."""
  if "pos_embed" in pool:
    table = pool.take("pos_embed").reshape(-1, dim)
    grid = int(round(np.sqrt(table.shape[0])))
    if pe_interpolation is None:
      pe_interpolation = infer_pe_interpolation(table, grid) if grid > 1 else 1.0
    if not np.allclose(table, sincos_2d(dim, grid, base_size=grid, interpolation=pe_interpolation), atol=1e-5):
      raise ConversionError(f"pos_embed is not PixArt's 2-D sin-cos table with pe_interpolation {pe_interpolation}, "
                            "so this checkpoint cannot be reproduced.")
    return grid * patch, pe_interpolation
  input_size = input_size or 128
  return input_size, pe_interpolation or input_size * 8 / 512


def pixart_from_torch(tensors: Mapping[str, np.ndarray], fmt: str = "auto", num_heads: int | None = None,
                      input_size: int | None = None, pe_interpolation: float | None = None,
                      diffusers_config: Mapping | None = None):
  """(PixArtConfig, params) from a PixArt state dict. Width, patch, channels, caption channels and length, depth and
  learn_sigma come from the shapes; heads from the diffusers config, `num_heads` or 16 at width 1152; the latent
  size and pe_interpolation from the stored pos_embed, the diffusers config, the arguments, or PixArt-Sigma's rule
  (128 latents, pe_interpolation = image size / 512)."""
  found = detect_format(tensors)
  if found is None:
    some = ", ".join(sorted(tensors)[:3])
    raise ConversionError(f"this state dict is not a PixArt (original or diffusers) checkpoint; its first keys are "
                          f"{some}.")
  fmt = found if fmt == "auto" else fmt
  if fmt not in FORMATS:
    raise ConversionError(f"unknown PixArt format {fmt!r}; use one of {FORMATS}.")
  if found != fmt:
    raise ConversionError(f"this state dict is not in the {fmt!r} layout.")
  if any(k.startswith(("csize_embedder.", "ar_embedder.", "adaln_single.emb.resolution_embedder.")) for k in tensors):
    raise ConversionError("this PixArt-alpha checkpoint uses resolution and aspect-ratio micro-conditions, which "
                          "PixArt-Sigma and this importer do not have.")
  diffusers_config = diffusers_config or {}
  if fmt == "diffusers":
    tensors = diffusers_to_original(tensors)
    num_heads = num_heads or diffusers_config.get("num_attention_heads")
    input_size = input_size or diffusers_config.get("sample_size")
    if pe_interpolation is None and input_size:
      pe_interpolation = diffusers_config.get("interpolation_scale") or max(input_size // 64, 1)
  pool = KeyPool(tensors)

  patch_w = pool.take("x_embedder.proj.weight")  # (D, C, p, p)
  dim, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
  num_heads = num_heads or XL_HEADS.get(dim)
  if not num_heads:
    raise ConversionError(f"width {dim} is not PixArt-XL's, so the head count is unknown: pass --num-heads.")
  input_size, pe_interpolation = _geometry(pool, dim, patch, input_size, pe_interpolation)
  null = pool.take("y_embedder.y_embedding") if "y_embedder.y_embedding" in pool else None
  caption_channels = tensors["y_embedder.y_proj.fc1.weight"].shape[1]
  if null is None:  # diffusers: no learned null caption (see the module docstring)
    null = np.zeros((300, caption_channels), np.float32)  # PixArt-Sigma's T5 length
  depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
  out_dim = tensors["final_layer.linear.weight"].shape[0] // patch ** 2

  def dense(name):
    return dense_from_torch(pool.take_prefix(f"{name}."), "")
  params = {
      "x_embedder": {"kernel": patch_w.transpose(2, 3, 1, 0), "bias": pool.take("x_embedder.proj.bias")},
      "t_embedder": {"mlp_0": dense("t_embedder.mlp.0"), "mlp_2": dense("t_embedder.mlp.2")},
      "t_block": dense("t_block.1"),
      "y_embedder": {"y_embedding": null, "fc1": dense("y_embedder.y_proj.fc1"),
                     "fc2": dense("y_embedder.y_proj.fc2")},
      "final_layer": {"scale_shift_table": pool.take("final_layer.scale_shift_table"),
                      "linear": dense("final_layer.linear")},
  }
  layers = []
  for i in range(depth):
    b = f"blocks.{i}."
    attn, attn_params = operator_from_pool(pool, f"{b}attn.", "attn", dim, num_heads)
    mlp, mlp_params = operator_from_pool(pool, f"{b}mlp.", "mlp", dim, num_heads)
    layers.append(LayerSpec(attn, mlp))
    cross = {name: dense(f"{b}cross_attn.{name}") for name in ("q_linear", "kv_linear", "proj")}
    params[f"blocks_{i}"] = {"scale_shift_table": pool.take(f"{b}scale_shift_table"), "attn": attn_params,
                             "cross_attn": cross, "mlp": mlp_params}
  pool.finish()
  config = PixArtConfig(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=dim,
                        num_heads=num_heads, caption_channels=caption_channels, caption_length=null.shape[0],
                        learn_sigma=out_dim == 2 * in_channels, pe_interpolation=float(pe_interpolation),
                        layers=tuple(layers))
  check_params(config, params, init_params)
  return config, params
