"""PixArt-Sigma's KV-compressed self-attention: keys and values are pooled on the 2-D token grid before attention.

Queries stay at full resolution; K and V each pass through one shared depthwise conv (kernel = stride = sr_ratio,
started as the average, 1 / sr_ratio^2) and one shared LayerNorm, so attention costs N * N / sr_ratio^2.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.operators import flops, init
from graft_jax.operators.attention import attention_backend
from graft_jax.operators.registry import register


def _from_torch(t, dim, num_heads):
  sr = np.asarray(t["sr.weight"])  # (D, 1, r, r): depthwise Conv2d
  params = {"qkv": init.dense_from_torch(t, "qkv"), "proj": init.dense_from_torch(t, "proj"),
            "sr": {"kernel": sr.transpose(2, 3, 1, 0), "bias": np.asarray(t["sr.bias"])},
            "norm": {"scale": np.asarray(t["norm.weight"]), "bias": np.asarray(t["norm.bias"])}}
  return {"num_heads": num_heads, "sr_ratio": sr.shape[-1]}, params


@register("mha_kv_compress", "attn", defaults={"num_heads": 16, "sr_ratio": 2, "grid": None, "backend": "auto"},
          flops=flops.kv_compress, torch_modules=("qkv", "proj", "sr", "norm"), from_torch=_from_torch)
class KVCompressAttention(nn.Module):
  """`grid` (h, w) is the token grid; None takes the square one (an operator sees only (B, N, D), and PixArt's
  released checkpoints are square). Sides not divisible by sr_ratio lose their last rows/columns, as torch's
  strided conv does."""
  dim: int
  num_heads: int = 16
  sr_ratio: int = 2
  grid: tuple[int, int] | None = None
  backend: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    h, w = self.grid or (int(round(np.sqrt(n))),) * 2
    if h * w != n:
      raise ValueError(f"token grid {(h, w)} does not hold the sequence of {n} tokens; set `grid`")
    r = self.sr_ratio
    sr = nn.Conv(d, (r, r), strides=(r, r), padding="VALID", feature_group_count=d, name="sr",
                 kernel_init=nn.initializers.constant(1.0 / r ** 2), bias_init=nn.initializers.zeros)
    norm = nn.LayerNorm(epsilon=1e-5, name="norm")  # torch's default LayerNorm, affine

    def compress(t):
      return norm(sr(t.reshape(b, h, w, d)).reshape(b, -1, d))
    q, k, v = jnp.split(init.dense(3 * d, "qkv")(x), 3, axis=-1)
    k, v = compress(k), compress(v)
    q, k, v = (t.reshape(b, t.shape[1], self.num_heads, -1) for t in (q, k, v))
    y = jax.nn.dot_product_attention(q, k, v, implementation=attention_backend(self.backend, q.dtype))
    return init.dense(d, "proj")(y.reshape(b, n, d))
