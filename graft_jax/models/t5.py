"""The T5 v1.1 text encoder (PixArt-Sigma conditions on T5-XXL's last hidden states), in Flax.

Layout follows Hugging Face's `T5EncoderModel`: token embedding (no scaling), then per block a pre-norm self-attention
and a pre-norm gated-GELU feed-forward, each added to the residual stream, then a final norm. T5 specifics that a
generic transformer gets wrong:
  - the q.k scores are NOT divided by sqrt(d_kv) (T5 folds the scale into its initialisation);
  - positions enter only as a learned per-head bias over bucketed relative distances, owned by block 0 and reused by
    every block;
  - norms are RMS norms (no mean subtraction, no bias) with the variance taken in float32;
  - the feed-forward is wo(gelu_tanh(wi_0 x) * wi_1 x), no biases anywhere.
Dropout is left out: the encoder is only ever run for inference here.

Parameter tree: embed/embedding (vocab, d_model); relative_attention_bias (buckets, heads);
block_i/{attn_norm/scale, attn/{q,k,v,o}/kernel, ffn_norm/scale, ffn/{wi_0,wi_1,wo}/kernel}; final_norm/scale.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 v1.1 encoder; the defaults are T5-v1.1-XXL (google/t5-v1_1-xxl), PixArt-Sigma's encoder."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  num_heads: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  def to_json(self) -> dict[str, Any]:
    return {"model": "t5_encoder", **dataclasses.asdict(self)}

  def dumps(self) -> str:
    return json.dumps(self.to_json(), indent=1)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "T5Config":
    d = dict(d)
    if d.pop("model", "t5_encoder") != "t5_encoder":
      raise ValueError("this model config does not describe a T5 encoder")
    return cls(**d)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "T5Config":
    """From a Hugging Face T5Config (its config.json as a dict); only the gated-GELU (v1.1) variant is supported."""
    proj = d.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
      raise ValueError(f"feed_forward_proj {proj!r} is not supported; only T5 v1.1's 'gated-gelu' is.")
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(query_length, key_length) int32 bucket of each distance key - query, bidirectional (encoder) variant.

  Half the buckets are for keys after the query. Within each half, distances below num_buckets / 4 get one bucket each
  and larger ones share logarithmically wider buckets up to max_distance, beyond which all share the last. Computed in
  NumPy at trace time (the lengths are static) and, like Mesh TensorFlow and transformers, in float32 before the
  truncation: at exact bucket edges a float64 log can land on the other side.
  """
  distance = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  buckets = np.where(distance > 0, half, 0)
  distance = np.abs(distance)
  max_exact = half // 2
  # Distance 0 would give log(0); it is below max_exact, so its (discarded) value only needs to be finite.
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
  scale = np.float32(math.log(max_distance / max_exact))
  large = max_exact + (np.log(ratio) / scale * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RMSNorm(nn.Module):
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, the statistic in float32 whatever the compute dtype."""
  epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x.astype(jnp.float32) * jax.lax.rsqrt(variance + self.epsilon)
    return (scale * normed).astype(self.dtype)


def _dense(features: int, name: str, dtype, fan_in: int) -> nn.Dense:
  # T5's own initialisation: normal with std 1/sqrt(fan_in) (Mesh TF), no bias.
  return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                  kernel_init=nn.initializers.normal(stddev=fan_in ** -0.5))


class SelfAttention(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    """x (B, L, D); bias (B or 1, H, L, L) = relative position bias plus the padding mask, already combined."""
    c = self.config
    split = lambda t: t.reshape(t.shape[:-1] + (c.num_heads, c.d_kv))
    q = split(_dense(c.inner_dim, "q", self.dtype, c.d_model * c.d_kv)(x))
    k = split(_dense(c.inner_dim, "k", self.dtype, c.d_model)(x))
    v = split(_dense(c.inner_dim, "v", self.dtype, c.d_model)(x))
    # No 1/sqrt(d_kv): T5's convention. Scores and softmax in float32 so bf16 compute keeps the mask exact.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:-1] + (c.inner_dim,))
    return _dense(c.d_model, "o", self.dtype, c.inner_dim)(out)


class GatedGeluFFN(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    # transformers' "gelu_new" is the tanh approximation, which is flax's default.
    gate = nn.gelu(_dense(c.d_ff, "wi_0", self.dtype, c.d_model)(x), approximate=True)
    return _dense(c.d_model, "wo", self.dtype, c.d_ff)(gate * _dense(c.d_ff, "wi_1", self.dtype, c.d_model)(x))


class T5Block(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    eps = self.config.layer_norm_epsilon
    x = x + SelfAttention(self.config, self.dtype, name="attn")(RMSNorm(eps, self.dtype, name="attn_norm")(x), bias)
    return x + GatedGeluFFN(self.config, self.dtype, name="ffn")(RMSNorm(eps, self.dtype, name="ffn_norm")(x))


class T5Encoder(nn.Module):
  """`apply({"params": p}, ids (B, L) int, mask (B, L) bool/int)` -> last hidden states (B, L, d_model) float32.

  Padded positions (mask 0) are never attended to; their own outputs are computed anyway (as transformers does)
  and are meaningless, so consumers must use the mask too. `dtype` sets the compute dtype (bfloat16 halves the
  memory of XXL activations); parameters stay float32 unless converted otherwise.
  """
  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask=None):
    c = self.config
    length = ids.shape[1]
    x = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(1.0), name="embed")(ids)
    x = x.astype(self.dtype)
    table = self.param("relative_attention_bias", nn.initializers.normal(c.d_model ** -0.5),
                       (c.relative_attention_num_buckets, c.num_heads), jnp.float32)
    buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    # One (1, H, L, L) bias for every block: block 0 owns the table, the others reuse what it computes.
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]
    if mask is not None:
      # Additive -inf-like mask, as transformers does (finfo.min rather than -inf keeps an all-padding row finite).
      keep = jnp.asarray(mask).astype(bool)[:, None, None, :]
      bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(c.num_layers):
      x = T5Block(c, self.dtype, name=f"block_{i}")(x, bias)
    return RMSNorm(c.layer_norm_epsilon, jnp.float32, name="final_norm")(x)


def init_params(config: T5Config, key: jax.Array, length: int = 8) -> dict:
  ids, mask = jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32)
  # Jitted: initialising op by op costs far more than compiling once.
  return jax.jit(lambda k: T5Encoder(config).init(k, ids, mask)["params"])(key)
