"""Hugging Face `T5EncoderModel` state dict -> (T5Config, Flax params) for graft_jax.models.t5.

Keys read (Linear weights are (out, in), none has a bias):
  shared.weight and/or encoder.embed_tokens.weight   token embedding (tied: when both are present they must agree)
  encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight, encoder.block.N.layer.0.layer_norm.weight
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (buckets, heads), block 0 only
  encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight, encoder.block.N.layer.1.layer_norm.weight
  encoder.final_layer_norm.weight
The architecture is read from the shapes; the maximum bucketed distance and the norm epsilon are not stored, so they
are arguments (T5's values by default). A full encoder-decoder checkpoint's decoder.* and lm_head.* keys are dropped
only when `drop_decoder` says so. Every other key must be used.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from graft_jax.convert.state_dict import ConversionError, KeyPool
from graft_jax.models.t5 import T5Config

_ATTN = "encoder.block.{i}.layer.0"
_FFN = "encoder.block.{i}.layer.1"


def _embedding(pool: KeyPool) -> np.ndarray:
  found = [k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in pool]
  if not found:
    raise ConversionError("the checkpoint has neither shared.weight nor encoder.embed_tokens.weight, so it is not a "
                          "T5 encoder.")
  tables = [pool.take(k) for k in found]
  if len(tables) == 2 and not np.array_equal(tables[0], tables[1]):
    raise ConversionError("shared.weight and encoder.embed_tokens.weight differ, but T5's encoder ties them.")
  return tables[0]


def _linear(pool: KeyPool, key: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
  weight = pool.take(f"{key}.weight")
  if weight.shape != shape:
    raise ConversionError(f"{key}.weight has shape {tuple(weight.shape)}, expected {shape}.")
  return {"kernel": np.asarray(weight).T}


def _norm(pool: KeyPool, key: str, dim: int) -> dict[str, np.ndarray]:
  scale = pool.take(f"{key}.weight")
  if scale.shape != (dim,):
    raise ConversionError(f"{key}.weight has shape {tuple(scale.shape)}, expected ({dim},).")
  return {"scale": np.asarray(scale)}


def is_t5(tensors: Mapping[str, np.ndarray]) -> bool:
  """Whether a state dict is a Hugging Face T5 (T5EncoderModel or a whole T5 model, whose decoder is dropped)."""
  return any(k.startswith("encoder.block.0.layer.0.SelfAttention.") for k in tensors)


def convert_t5_encoder(tensors: Mapping[str, np.ndarray], max_distance: int = 128, layer_norm_epsilon: float = 1e-6,
                       drop_decoder: bool = False) -> tuple[T5Config, dict]:
  """(config, params) with `T5Encoder(config).apply({"params": params}, ids, mask)` equal to the torch encoder."""
  if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in tensors:
    raise ConversionError("this is a T5 v1.0 checkpoint (ReLU feed-forward, DenseReluDense.wi); only v1.1's gated-GELU "
                          "feed-forward (wi_0, wi_1) is supported.")
  pool = KeyPool(tensors)
  if drop_decoder:
    for key in tensors:
      if key.startswith(("decoder.", "lm_head.")):
        pool.take(key)
  embed = _embedding(pool)
  vocab, d_model = embed.shape
  table = pool.take(f"{_ATTN.format(i=0)}.SelfAttention.relative_attention_bias.weight")
  num_buckets, num_heads = table.shape
  inner = pool.take(f"{_ATTN.format(i=0)}.SelfAttention.q.weight").shape[0]
  if inner % num_heads:
    raise ConversionError(f"block 0's query width {inner} is not a multiple of the {num_heads} heads that the "
                          "relative attention bias has.")
  d_ff = pool.take(f"{_FFN.format(i=0)}.DenseReluDense.wi_0.weight").shape[0]
  blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
  num_layers = len(blocks)
  if blocks != set(range(num_layers)):
    raise ConversionError(f"the encoder blocks are not numbered 0..{num_layers - 1}: found {sorted(blocks)}.")
  config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, num_heads=num_heads, d_ff=d_ff,
                    num_layers=num_layers, relative_attention_num_buckets=num_buckets,
                    relative_attention_max_distance=max_distance, layer_norm_epsilon=layer_norm_epsilon)

  params = {"embed": {"embedding": np.asarray(embed)}, "relative_attention_bias": np.asarray(table)}
  for i in range(num_layers):
    attn, ffn = _ATTN.format(i=i), _FFN.format(i=i)
    if i > 0 and f"{attn}.SelfAttention.relative_attention_bias.weight" in pool:
      raise ConversionError(f"block {i} has its own relative_attention_bias, but T5 shares block 0's with all blocks.")
    params[f"block_{i}"] = {
        "attn_norm": _norm(pool, f"{attn}.layer_norm", d_model),
        "attn": {n: _linear(pool, f"{attn}.SelfAttention.{n}", (inner, d_model)) for n in ("q", "k", "v")}
        | {"o": _linear(pool, f"{attn}.SelfAttention.o", (d_model, inner))},
        "ffn_norm": _norm(pool, f"{ffn}.layer_norm", d_model),
        "ffn": {n: _linear(pool, f"{ffn}.DenseReluDense.{n}", (d_ff, d_model)) for n in ("wi_0", "wi_1")}
        | {"wo": _linear(pool, f"{ffn}.DenseReluDense.wo", (d_model, d_ff))},
    }
  params["final_norm"] = _norm(pool, "encoder.final_layer_norm", d_model)
  pool.finish()
  return config, params
