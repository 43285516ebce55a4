"""Softmax attention operators: full multi-head self-attention (MHA) with a backend choice."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.operators import flops, init
from graft_jax.operators.kernels import forward_only, hopper_attention, hopper_attention_grad, sixteen_bit
from graft_jax.operators.kernels.splash import splash_attention
from graft_jax.operators.matmul import einsum_f32
from graft_jax.operators.registry import register
from graft_jax.operators.remat import kept


def attention_backend(requested: str, dtype) -> str:
  """cuDNN's fused attention is the fast path on NVIDIA GPUs but only takes 16-bit inputs, so float32 calls (a
  float32 init, a parity test) run XLA whatever was asked; "auto" picks cuDNN on GPU for 16-bit inputs."""
  if requested == "cudnn" and not sixteen_bit(dtype):
    return "xla"
  if requested != "auto":
    return requested
  return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit(dtype) else "xla"


def attention_weights(x: jax.Array) -> tuple[jax.Array, dict]:
  """x and the (kernel, bias) of attention's q, k, v and output Linears (submodules "q", "k", "v", "proj"; q, k, v
  each (D, D), PyTorch's fused qkv Linear split and initialised as that one matrix is), promoted to one dtype as
  nn.Dense does."""
  d = x.shape[-1]
  part = init.fused_part_init(3)
  weights = {name: init.LinearWeights(d, part, name=name)(d) for name in "qkv"}
  weights["proj"] = init.LinearWeights(d, name="proj")(d)
  x, *leaves = nn.dtypes.promote_dtype(x, *jax.tree.leaves(weights))
  return x, jax.tree.unflatten(jax.tree.structure(weights), leaves)


def project_heads(x: jax.Array, weights: dict, num_heads: int):
  """(B, N, D) -> q, k, v, each (B, N, H, D/H).

  Only q gets its bias here, and as a whole parameter of its own, which XLA adds in cuBLAS's matmul epilogue (from a
  slice of a fused (D, 3D) parameter it did not: each bias add was then its own pass over a (tokens, D) output,
  2.55 ms of DiT-XL/2's 117 ms batch-256 forward on an H200). k's bias adds q_i . b_k to every logit of query i,
  which softmax cancels; v's bias adds b_v to every output row because each row's softmax weights sum to one, so
  `project_out` adds b_v W_o to the output bias instead. Both hold for any softmax attention over these keys (full,
  windowed, masked).

  q is `kept` with its bias: remat's elementwise policy then saves it in place of the matmul's output (the same
  bytes), so the bias stays in cuBLAS's epilogue in a train step's forward and the backward does not add it again
  (each add was a pass over q, 2 x 91 us a layer of DiT-XL/2's batch-256 train step on an H200).
  """
  b, n, _ = x.shape
  (wq, bq), (wk, _), (wv, _) = (weights[name] for name in "qkv")
  return [y.reshape(b, n, num_heads, -1) for y in (kept(x @ wq + bq), x @ wk, x @ wv)]


def project_packed(x: jax.Array, weights: dict, num_heads: int) -> jax.Array:
  """(B, N, D) -> x [W_q W_k W_v] as (B, N, 3, H, D/H): one matmul (0.67 against 0.71 ms for three at DiT-XL/2's
  65,536 tokens on an H200) for the Hopper kernel, which reads q, k and v out of it and adds q's bias itself (see
  `project_heads` for k's and v's)."""
  b, n, _ = x.shape
  w = jnp.concatenate([weights[name][0] for name in "qkv"], axis=1)
  return (x @ w).reshape(b, n, 3, num_heads, -1)


def project_out(y: jax.Array, weights: dict) -> jax.Array:
  """The output Linear on (B, N, H, d) values from `project_heads`, with the values' bias folded in:
  y W + (b + b_v W)."""
  (wo, bo), bv = weights["proj"], weights["v"][1]
  return y.reshape(*y.shape[:2], -1) @ wo + (bo + bv @ wo)


def torch_fused_qkv(qkv_name: str, out_name: str):
  """Importer for PyTorch attention with a fused (3D, D) qkv Linear (rows q, k, v) and an output Linear."""
  def from_torch(t, dim, num_heads):
    qkv = init.dense_from_torch(t, qkv_name)
    params = {name: jax.tree.map(lambda a: a[..., cut], qkv) for name, cut in zip("qkv", init.cuts((dim,) * 3))}
    return {"num_heads": num_heads}, {**params, "proj": init.dense_from_torch(t, out_name)}
  return from_torch


MHA_BACKENDS = ("auto", "cudnn", "xla", "mosaic", "splash")
# From this many tokens "auto" takes splash attention on TPUs: XLA's attention holds the (B, H, N, N) float32
# logits, 1 GB per (batch, head) here (34 GB at PixArt's 2048 px, batch 2). A memory bound, not a timing: nothing
# here has run on TPU hardware yet.
SPLASH_FROM_TOKENS = 4096


def mha_backend(requested: str, heads_shape, dtype) -> str:
  """MHA's backend (one of MHA_BACKENDS) for (B, N, H, d) heads: "cudnn" and "xla" as `attention_backend` resolves
  them; "mosaic" the Hopper kernel (`kernels.hopper_attention`; train steps on its backward kernels too, see
  `trains_on_kernel`); "splash" TPU splash attention (`kernels.splash`;
  off TPU it runs in Pallas interpret mode, correct but slow). "auto" takes the Hopper kernel on Hopper GPUs where
  it beat cuDNN (`hopper_attention.pays_off`: 256 tokens or more, heads not a multiple of 64), splash on TPUs from
  SPLASH_FROM_TOKENS tokens, `attention_backend`'s choice elsewhere."""
  if requested not in MHA_BACKENDS:
    raise ValueError(f"attention backend must be one of {MHA_BACKENDS}, got {requested!r}")
  if requested == "auto":
    if hopper_attention.supported(heads_shape, dtype) and hopper_attention.pays_off(heads_shape):
      return "mosaic"
    if jax.default_backend() == "tpu" and heads_shape[1] >= SPLASH_FROM_TOKENS:
      return "splash"
  return requested if requested in ("mosaic", "splash") else attention_backend(requested, dtype)


def softmax_attention(q, k, v):
  """cuDNN's (16-bit on a GPU) or XLA's attention."""
  return jax.nn.dot_product_attention(q, k, v, implementation=attention_backend("auto", q.dtype))


def _mha(x, weights, num_heads: int, backend: str):
  """MHA on a resolved `backend` other than "mosaic": "splash", or jax.nn's implementation ("cudnn", "xla")."""
  q, k, v = project_heads(x, weights, num_heads)
  if backend == "splash":
    y = splash_attention(q, k, v)
  else:
    y = jax.nn.dot_product_attention(q, k, v, implementation=backend)
  return project_out(kept(y), weights)


def _mha_on_hopper_kernel(x, weights, num_heads: int, train: bool):
  """`_mha` with the attention on the Hopper kernel over one packed projection. `train`: differentiated calls (a
  train step) run the kernel's backward too (`hopper_attention_grad`); otherwise they run `_mha` on cuDNN, so what
  remat saves there is exactly what it saves without the kernel."""
  def fused(x, weights):
    q_bias = weights["q"][1].reshape(num_heads, -1)
    qkv = project_packed(x, weights, num_heads)
    y = (hopper_attention_grad.attention(qkv, q_bias) if train
         else hopper_attention.attention(qkv, q_bias, softmax_attention))
    return project_out(kept(y), weights)
  if train:
    return fused(x, weights)
  reference = lambda x, weights: _mha(x, weights, num_heads, attention_backend("auto", x.dtype))
  return forward_only(fused, reference)(x, weights)


def trains_on_kernel(requested: str, heads_shape, dtype) -> bool:
  """Whether MHA's differentiated calls on the Hopper kernel run its backward kernels as well: for "mosaic", where
  they take the shapes; for "auto", where they also beat cuDNN's backward (`hopper_attention_grad.pays_off`)."""
  if not hopper_attention_grad.fits_train(heads_shape, dtype):
    return False
  return requested == "mosaic" or (requested == "auto" and hopper_attention_grad.pays_off(heads_shape))


@register("mha", "attn", defaults={"num_heads": 16, "backend": "auto"}, flops=flops.attention(lambda c, n: n),
          torch_modules=("qkv", "proj"), from_torch=torch_fused_qkv("qkv", "proj"))
class MultiHeadAttention(nn.Module):
  """DiT's attention: q, k, v Linears with bias, softmax(q k^T / sqrt(d)) v over all tokens, output projection.
  `backend`: see `mha_backend`."""
  dim: int
  num_heads: int = 16
  backend: str = "auto"

  @nn.compact
  def __call__(self, x):
    if self.dim % self.num_heads:
      raise ValueError(f"width {self.dim} is not divisible by {self.num_heads} heads")
    x, weights = attention_weights(x)
    heads_shape = (*x.shape[:2], self.num_heads, self.dim // self.num_heads)
    backend = mha_backend(self.backend, heads_shape, x.dtype)
    if backend == "mosaic":
      train = trains_on_kernel(self.backend, heads_shape, x.dtype)
      return _mha_on_hopper_kernel(x, weights, self.num_heads, train)
    return _mha(x, weights, self.num_heads, backend)


def real_keys_first(k, v, mask):
  """Reorders (B, S, H, d) keys and values so each row's real ones (boolean (B, S) mask) come first, and counts
  them: cuDNN takes a padding mask only as per-row key counts, and attention does not depend on the order of its
  keys, so this makes any mask, not only a prefix, exact there."""
  order = jnp.argsort(~mask, axis=-1, stable=True)[:, :, None, None]
  return jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1), mask.sum(-1, dtype=jnp.int32)


def key_masked_attention(q, k, v, mask=None, backend: str = "auto"):
  """Softmax attention of (B, T, H, d) queries over (B, S, H, d) keys whose (B, S) boolean `mask` marks the real
  ones (PixArt's caption padding); a row with no real key attends over all of them, as diffusers' additive -10000
  bias does in float32.

  The XLA path is written out: jax.nn.dot_product_attention's runs its backward matmuls in float32, and einsum_f32
  rounds the cotangent to bf16 as cuDNN does.
  """
  backend = attention_backend(backend, q.dtype)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask | ~mask.any(-1, keepdims=True)
  if backend == "cudnn":
    lengths = None
    if mask is not None:
      k, v, lengths = real_keys_first(k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
  logits = einsum_f32("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return einsum_f32("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def dense_attention_reference(q, k, v, mask=None):
  """Naive float32 softmax attention over (B, N, H, d), optionally masked by a boolean (N, N) array; test oracle."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


def _grid_shifts(x: jax.Array, grid: tuple[int, int], reach: tuple[int, int]) -> list[jax.Array]:
  """x (B, N, H, d) on an (h, w) token grid, seen from every neighbour offset within `reach` (rows, cols).

  Entry (dy, dx) (row-major over dy, dx) holds at token (r, c) the token (r + dy, c + dx), zeros past the edges.
  Static pads and slices only, so XLA fuses each shift into whatever consumes it.
  """
  b, n = x.shape[:2]
  (h, w), (ry, rx) = grid, reach
  xg = jnp.pad(x.reshape(b, h, w, *x.shape[2:]), ((0, 0), (ry, ry), (rx, rx)) + ((0, 0),) * (x.ndim - 2))
  return [xg[:, dy:dy + h, dx:dx + w].reshape(x.shape) for dy in range(2 * ry + 1) for dx in range(2 * rx + 1)]


def _grid_mask(grid: tuple[int, int], reach: tuple[int, int]) -> jax.Array:
  """(N, O) boolean: whether the neighbour at each offset of `_grid_shifts` lies inside the grid."""
  def inside(size, r):
    pos = jnp.arange(size)[:, None] + jnp.arange(-r, r + 1)
    return (pos >= 0) & (pos < size)
  (h, w), (ry, rx) = grid, reach
  rows, cols = inside(h, ry), inside(w, rx)
  return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, -1)


def neighbourhood_attention(q, k, v, window: int, grid: tuple[int, int] | None = None):
  """Softmax attention of each query over the keys within `window` of it, for (B, N, H, d) q, k, v.

  Without `grid`, tokens form a 1-D sequence and query i sees keys j with |i - j| <= window. With grid (h, w) (the
  row-major token grid, h * w = N) it sees the keys within `window` rows and columns (Chebyshev distance). A 1-D
  sequence is the 1 x N grid, so both share one path. The cost is O(N * number of neighbours): for each offset o,
  logits_o = sum(q * shift(k, o)) is one elementwise multiply-reduce, never an N x N matrix. Logits, softmax and
  the weighted sum of values run in float32 inside the fusions; only the output is cast back.
  """
  n = q.shape[1]
  grid = (1, n) if grid is None else tuple(grid)
  if grid[0] * grid[1] != n:
    raise ValueError(f"token grid {grid} does not hold the sequence of {n} tokens")
  # Offsets that can never land inside the grid would only add masked work.
  reach = (min(window, grid[0] - 1), min(window, grid[1] - 1))
  qf = q.astype(jnp.float32) / np.sqrt(q.shape[-1])
  logits = jnp.stack([jnp.sum(qf * ko.astype(jnp.float32), axis=-1) for ko in _grid_shifts(k, grid, reach)], -1)
  logits = jnp.where(_grid_mask(grid, reach)[:, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = sum(probs[..., o, None] * vo.astype(jnp.float32) for o, vo in enumerate(_grid_shifts(v, grid, reach)))
  return out.astype(q.dtype)


def tiled_band_attention(q, k, v, window: int, tile: int = 16):
  """The same 1-D band attention as `neighbourhood_attention`, as batched matmuls over tiles of queries.

  Each tile of `tile` queries meets the tile + 2 * window keys around it (the halo comes from the neighbouring
  tiles by static slices), so the work is O(N * (tile + 2w)) and runs on tensor cores; the band and the sequence
  ends are masked per tile. XLA reduces the shifts' short rows of d=72 poorly, so on an H200 this is faster (bf16,
  w=4, 16 heads of 72, forward + backward: 1.5 vs 2.5 ms at B=2, N=16384; 2.6 vs 4.5 ms at B=256, N=256).
  """
  b, n, h, d = q.shape
  w = min(window, n - 1)
  t = max(tile, 2 * w)  # a tile's right halo must fit in the next tile
  nt = -(-n // t)
  # Heads before tokens so that (batch, head, tile) is a plain batch of small matmuls.
  heads_first = lambda x, lo: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (lo, (nt + 1) * t - n - lo), (0, 0)))
  def halo_tiles(x):
    xt = heads_first(x, w).reshape(b, h, nt + 1, t, d)
    return jnp.concatenate([xt[:, :, :-1], xt[:, :, 1:, :2 * w]], axis=3)
  qt = heads_first(q, 0)[:, :, :nt * t].reshape(b, h, nt, t, d)
  logits = einsum_f32("bhtqd,bhtkd->bhtqk", qt, halo_tiles(k)) / np.sqrt(d)
  rel = jnp.arange(t + 2 * w) - w  # key position relative to the tile start
  key_pos = jnp.arange(nt)[:, None] * t + rel
  valid = (jnp.abs(rel - jnp.arange(t)[:, None]) <= w) & ((key_pos >= 0) & (key_pos < n))[:, None, :]
  # Finite: padding queries past the end may see no key, and -inf there would put NaNs into dk and dv.
  logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = einsum_f32("bhtqk,bhtkd->bhtqd", probs, halo_tiles(v))
  return jnp.swapaxes(out.reshape(b, h, nt * t, d)[:, :, :n], 1, 2).astype(q.dtype)


SWA_BACKENDS = ("auto", "tiled", "shift", "splash")


def swa_backend(requested: str, grid) -> str:
  """What "auto" means for SWA: TPU splash attention (block-sparse, LocalMask) for a 1-D window on TPU, the tiled
  XLA path for a 1-D window elsewhere, the shifts for a 2-D one (splash has no 2-D neighbourhood mask)."""
  if requested != "auto":
    return requested
  if grid is not None:
    return "shift"
  return "splash" if jax.default_backend() == "tpu" else "tiled"


@register("swa", "attn", defaults={"num_heads": 16, "window": 4, "grid": None, "backend": "auto"},
          flops=flops.attention(flops.window_keys), torch_modules=("Wqkv", "out_proj"),
          from_torch=torch_fused_qkv("Wqkv", "out_proj"))
class SlidingWindowAttention(nn.Module):
  """MHA (DiT's projections) where each token attends only to its neighbours within `window`.

  The default is the grafting paper's SWA: window 4 on the raster-flattened sequence (9 keys, bidirectional).
  `grid` (h, w) switches to the 2-D neighbourhood on the token grid (Chebyshev distance <= window).
  `backend` picks the formulation: "tiled" (`tiled_band_attention`, 1-D only), "shift"
  (`neighbourhood_attention`), "splash" (TPU splash attention, 1-D only; off TPU it runs in Pallas interpret mode,
  correct but slow), or "auto" (see `swa_backend`). cuDNN is no option here: its sliding window is causal only.
  """
  dim: int
  num_heads: int = 16
  window: int = 4
  grid: tuple[int, int] | None = None
  backend: str = "auto"

  @nn.compact
  def __call__(self, x):
    if self.dim % self.num_heads:
      raise ValueError(f"width {self.dim} is not divisible by {self.num_heads} heads")
    if self.backend not in SWA_BACKENDS:
      raise ValueError(f"SWA backend must be one of {SWA_BACKENDS}, got {self.backend!r}")
    if self.backend in ("tiled", "splash") and self.grid is not None:
      raise ValueError(f"the {self.backend} SWA backend runs 1-D windows only; use 'shift' (or 'auto') with a grid")
    x, weights = attention_weights(x)
    q, k, v = project_heads(x, weights, self.num_heads)
    backend = swa_backend(self.backend, self.grid)
    if backend == "splash":
      y = splash_attention(q, k, v, self.window)
    elif backend == "tiled":
      y = tiled_band_attention(q, k, v, self.window)
    else:
      y = neighbourhood_attention(q, k, v, self.window, self.grid)
    return project_out(y, weights)
