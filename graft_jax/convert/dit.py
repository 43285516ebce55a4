"""DiT checkpoints (original `.pt` or diffusers `DiTTransformer2DModel`) -> (DiTConfig, Flax params).

Diffusers keys are first renamed to the original layout, so one importer reads both. Each block's operators are
identified by their PyTorch submodule names through the operator registry, which also reads the official grafted
checkpoints (SWA, Hyena, Mamba-2, MLP variants) layer by layer.
"""
from __future__ import annotations

import re
from typing import Mapping

import jax
import numpy as np

from graft_jax import operators
from graft_jax.convert.state_dict import ConversionError, KeyPool
from graft_jax.models.config import SIZES, DiTConfig, LayerSpec, OpSpec
from graft_jax.models.dit import init_params
from graft_jax.models.embeddings import sincos_2d
from graft_jax.operators.init import dense_from_torch

FORMATS = ("dit", "diffusers")


def detect_format(tensors: Mapping[str, np.ndarray]) -> str:
  if "blocks.0.adaLN_modulation.1.weight" in tensors:
    return "dit"
  if "transformer_blocks.0.norm1.linear.weight" in tensors and "proj_out_2.weight" in tensors:
    return "diffusers"
  some = ", ".join(sorted(tensors)[:3])
  raise ConversionError(f"this state dict is not a DiT (original or diffusers) checkpoint; its first keys are {some}.")


_DIFFUSERS_BLOCK = {
    "norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2"}
_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear"}
_EMBEDDERS = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table"}


def diffusers_to_original(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rename a diffusers DiT state dict to the original layout; the per-block embedder copies must all agree."""
  out, qkv = {}, {}
  for key, value in tensors.items():
    module, _, leaf = key.rpartition(".")
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m is None:
      out[f"{_DIFFUSERS_TOP.get(module, module)}.{leaf}"] = value
      continue
    i, sub = m.groups()
    if sub in _EMBEDDERS:
      name = f"{_EMBEDDERS[sub]}.{leaf}"
      if name in out and not np.array_equal(out[name], value):
        raise ConversionError(f"block {i}'s copy of {name} differs from block 0's; the checkpoint is inconsistent.")
      out.setdefault(name, value)
    elif sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
      qkv.setdefault((i, leaf), {})[sub[-1]] = value
    else:
      out[f"blocks.{i}.{_DIFFUSERS_BLOCK.get(sub, sub)}.{leaf}"] = value
  for (i, leaf), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise ConversionError(f"block {i} lacks some of attn1.to_q/to_k/to_v.{leaf}.")
    out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def operator_from_pool(pool: KeyPool, prefix: str, site: str, dim: int, num_heads: int):
  tensors = pool.take_prefix(prefix)
  modules = frozenset(k.split(".")[0] for k in tensors)
  try:
    op = operators.match_torch_modules(site, modules)
  except ValueError as e:
    raise ConversionError(f"{prefix[:-1]}: {e}.") from None
  config, params = op.from_torch(tensors, dim, num_heads)
  return OpSpec.make(op.name, **config), params


def dit_from_torch(tensors: Mapping[str, np.ndarray], fmt: str = "auto", num_heads: int | None = None,
                   input_size: int | None = None, diffusers_config: Mapping | None = None):
  """(DiTConfig, params) from a DiT state dict. Width, patch, channels, depth, classes and learn_sigma come from the
  shapes; the head count from the diffusers config, `num_heads`, or the DiT preset of that width; the latent size
  from `pos_embed`, the diffusers config, or `input_size` (default 32)."""
  fmt = detect_format(tensors) if fmt == "auto" else fmt
  if fmt not in FORMATS:
    raise ConversionError(f"unknown DiT format {fmt!r}; use one of {FORMATS}.")
  if detect_format(tensors) != fmt:
    raise ConversionError(f"this state dict is not in the {fmt!r} layout.")
  diffusers_config = diffusers_config or {}
  if fmt == "diffusers":
    tensors = diffusers_to_original(tensors)
    num_heads = num_heads or diffusers_config.get("num_attention_heads")
    input_size = input_size or diffusers_config.get("sample_size")
  pool = KeyPool(tensors)

  patch_w = pool.take("x_embedder.proj.weight")  # (D, C, p, p)
  dim, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
  num_heads = num_heads or {width: heads for _, width, heads in SIZES.values()}.get(dim)
  if not num_heads:
    raise ConversionError(f"width {dim} is no DiT preset, so the head count is unknown: pass --num-heads.")
  if "pos_embed" in pool:
    tokens = pool.take("pos_embed").reshape(-1, dim)
    grid = int(round(np.sqrt(tokens.shape[0])))
    if not np.allclose(tokens, sincos_2d(dim, grid), atol=1e-6):
      raise ConversionError("pos_embed differs from DiT's 2-D sin-cos table, so this is not a DiT checkpoint we "
                            "can reproduce.")
    input_size = grid * patch
  depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
  table = pool.take("y_embedder.embedding_table.weight")
  out_dim = tensors["final_layer.linear.weight"].shape[0] // patch ** 2

  params = {
      "x_embedder": {"kernel": patch_w.transpose(2, 3, 1, 0), "bias": pool.take("x_embedder.proj.bias")},
      "t_embedder": {"mlp_0": dense_from_torch(pool.take_prefix("t_embedder.mlp.0."), ""),
                     "mlp_2": dense_from_torch(pool.take_prefix("t_embedder.mlp.2."), "")},
      "y_embedder": {"embedding_table": table},
      "final_layer": {"adaLN_modulation": dense_from_torch(pool.take_prefix("final_layer.adaLN_modulation.1."), ""),
                      "linear": dense_from_torch(pool.take_prefix("final_layer.linear."), "")},
  }
  layers = []
  for i in range(depth):
    attn, attn_params = operator_from_pool(pool, f"blocks.{i}.attn.", "attn", dim, num_heads)
    mlp, mlp_params = operator_from_pool(pool, f"blocks.{i}.mlp.", "mlp", dim, num_heads)
    layers.append(LayerSpec(attn, mlp))
    params[f"blocks_{i}"] = {"adaLN_modulation": dense_from_torch(pool.take_prefix(f"blocks.{i}.adaLN_modulation.1."),
                                                                  ""),
                             "attn": attn_params, "mlp": mlp_params}
  pool.finish()
  config = DiTConfig(input_size=input_size or 32, patch_size=patch, in_channels=in_channels, hidden_size=dim,
                     num_heads=num_heads, num_classes=table.shape[0] - 1, learn_sigma=out_dim == 2 * in_channels,
                     class_dropout_prob=0.1, layers=tuple(layers))
  check_params(config, params)
  return config, params


def check_params(config, params, init=init_params) -> None:
  """The converted tree must have exactly the model's parameter paths and shapes (a missing bias, a wrong width);
  `init(config, key)` makes the model's parameters (DiT's by default)."""
  want = {jax.tree_util.keystr(p): s.shape for p, s in
          jax.tree_util.tree_leaves_with_path(jax.eval_shape(lambda k: init(config, k), jax.random.key(0)))}
  have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  wrong = [f"{k} missing (needs {want[k]})" for k in sorted(set(want) - set(have))]
  wrong += [f"{k} unexpected {have[k]}" for k in sorted(set(have) - set(want))]
  wrong += [f"{k} is {have[k]}, needs {want[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  if wrong:
    raise ConversionError(f"the converted parameters do not fit the model: {'; '.join(wrong[:10])}.")
