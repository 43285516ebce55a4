"""Fixed position tables, the timestep embedding and unpatchify, exactly as the original DiT."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim): sin of pos * omega in the first half, cos in the second;
  omega = 1/10000^(i/(dim/2))."""
  if dim % 2:
    raise ValueError(f"a 1-D sin-cos table needs an even width, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, base_size: int | None = None,
              interpolation: float = 1.0) -> np.ndarray:
  """(grid_h*grid_w, dim) float64 table, row-major tokens; first half encodes the column (w), second half the row (h).

  DiT: integer coordinates. PixArt (`base_size` given): each axis of n tokens has coordinates
  arange(n) / (n / base_size) / interpolation, computed in float32 as both PixArt and diffusers do, so any grid spans
  the range of the base grid and a checkpoint's stored table is reproduced exactly.
  """
  grid_w = grid_h if grid_w is None else grid_w
  if dim % 4:
    raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")

  def coords(n):
    if base_size is None:
      return np.arange(n, dtype=np.float64)
    return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation)
  h, w = np.meshgrid(coords(grid_h), coords(grid_w), indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """(B,) timesteps -> (B, dim) float32: [cos, sin] at frequencies exp(-ln(max_period) i / (dim/2)).

  This is the original DiT formula; diffusers' DiT divides by (dim/2 - 1) instead, so converted diffusers weights
  run with this one (the original training formula).
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def unpatchify(tokens: jax.Array, p: int, grid_h: int, grid_w: int) -> jax.Array:
  """(B, gh*gw, p*p*C) -> (B, gh*p, gw*p, C): DiT's (h, w, p, q, c) token layout."""
  b, _, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, c)
