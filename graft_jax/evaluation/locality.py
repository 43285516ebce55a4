"""Attention locality (the grafting paper's L_k) and the layer choice it suggests.

L_k = (1/N) sum_ij A_ij [dist(i, j) <= k] for one attention matrix A (N queries x N keys, rows summing to one): the
share of attention mass that stays within k tokens of the query, averaged over queries. The paper measures it on
the raster-flattened token sequence, dist = |i - j| ("flat"); "grid" uses the Chebyshev distance on the 2-D token
grid instead (the neighbourhood a 2-D SWA would see). The analysis averages L_k over heads, samples and timesteps.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


DISTANCES = ("flat", "grid")


def token_distance(n: int, distance: str = "flat") -> np.ndarray:
  """(N, N) integer distance between token positions: |i - j| on the sequence, or Chebyshev on the square grid."""
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
  pos = np.arange(n)
  if distance == "flat":
    return np.abs(pos[:, None] - pos[None, :])
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"'grid' distance needs a square token grid, not {n} tokens")
  rows, cols = pos // side, pos % side
  return np.maximum(np.abs(rows[:, None] - rows[None, :]), np.abs(cols[:, None] - cols[None, :]))


def band_masks(n: int, bands: Sequence[int], distance: str = "flat") -> np.ndarray:
  """(K, N, N) float32: 1 where the key lies within each band k of the query."""
  d = token_distance(n, distance)
  return np.stack([(d <= k) for k in bands]).astype(np.float32)


def band_mass(probs: jax.Array, masks: jax.Array) -> jax.Array:
  """L_k of attention matrices probs (..., N, N) for each mask (K, N, N) -> (..., K)."""
  n = probs.shape[-1]
  return jnp.einsum("...qk,bqk->...b", probs.astype(jnp.float32), masks, precision="highest") / n


def attention_probs(x: jax.Array, attn: dict, num_heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(d)) per head, (B, H, N, N) in float32, from an MHA operator's input x (B, N, D) and its
  params (its q and k Linears): the matrix `MultiHeadAttention` applies to v (it never materialises it)."""
  def heads(name):
    h = jnp.einsum("bnd,de->bne", x.astype(jnp.float32), attn[name]["kernel"].astype(jnp.float32), precision="highest")
    return (h + attn[name]["bias"].astype(jnp.float32)).reshape(*x.shape[:2], num_heads, -1)
  q, k = heads("q"), heads("k")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
  return jax.nn.softmax(logits, axis=-1)


def suggest_layers(locality: Sequence[float | None], fraction: float = 0.5, count: int = 0) -> list[int]:
  """The most local layers (highest L_k), `count` of them or else round(fraction * analysed layers), at least one,
  returned in layer order. Layers without a value (no softmax attention there) are never suggested; ties go to the
  earlier layer so the choice is deterministic."""
  scored = [(i, v) for i, v in enumerate(locality) if v is not None]
  if not scored:
    return []
  n = count if count > 0 else max(1, math.floor(fraction * len(scored) + 0.5))
  ranked = sorted(scored, key=lambda iv: (-iv[1], iv[0]))
  return sorted(i for i, _ in ranked[:min(n, len(scored))])
