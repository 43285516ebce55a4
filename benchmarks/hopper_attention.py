"""The Hopper self-attention kernel (graft_jax/operators/kernels/hopper_attention.py) against cuDNN, forward, bf16.

python benchmarks/hopper_attention.py [--out benchmarks/results]   (on a Hopper GPU)
Shapes: 16 heads of 72 (DiT-XL/2's and PixArt-Sigma's) at PixArt's 2048 px and 1024 px, batch 2 (16,384 and 4,096
tokens), 1,024 tokens at batch 64, and DiT-XL/2 at batch 256 (256 tokens). Per shape, `loop_ms` of: the attention
alone (both on heads of 72 as the projections write them, the kernel's q, k and v packed in one array and q's
bias added inside) with each one's largest deviation from a float32 evaluation of the same bf16 inputs (the first
1,024 queries), relative to the largest output; and the whole MHA operator on each, which is what `auto` chooses
by. Writes hopper_attention.json with the command, machine and date.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import kernel_benchmark
from graft_jax.operators import build
from graft_jax.operators.attention import softmax_attention
from graft_jax.operators.kernels import hopper_attention
from graft_jax.timing import loop_ms

HEADS, HEAD_DIM = 16, 72
SHAPES = {"pixart_2048px_batch2": (2, 16384), "pixart_1024px_batch2": (2, 4096), "tokens1024_batch64": (64, 1024),
          "dit_xl2_batch256": (256, 256)}


def bench(batch: int, tokens: int) -> dict:
  # The kernel reads q, k and v out of one packed array (as the fused projection writes them) and adds q's bias;
  # cuDNN takes them as three arrays.
  qkv = jax.random.normal(jax.random.key(0), (batch, tokens, 3, HEADS, HEAD_DIM), jnp.bfloat16)
  q_bias = (0.1 * jax.random.normal(jax.random.key(3), (HEADS, HEAD_DIM))).astype(jnp.bfloat16)
  q, k, v = (qkv[:, :, 0] + q_bias, qkv[:, :, 1], qkv[:, :, 2])
  f32 = lambda a: a.astype(jnp.float32)
  rows = min(tokens, 1024)
  exact = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(f32(q[:, :rows]), f32(k), f32(v)))(q, k, v)
  scale = float(jnp.abs(exact).max())
  windows = hopper_attention.Windows(HEADS, HEAD_DIM)
  paths = {"cudnn": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")),
                     (q, k, v)),
           "kernel": (jax.jit(lambda qkv, b: hopper_attention.attention(qkv, b, softmax_attention)), (qkv, q_bias))}
  row = {"batch": batch, "tokens": tokens, "heads": HEADS, "head_dim": HEAD_DIM, "window": windows.width,
         "auto_takes_kernel": hopper_attention.pays_off(q.shape),
         "tiles": vars(hopper_attention.Tiles.for_tokens(tokens))}
  for name, (fn, args) in paths.items():
    row[f"{name}_ms"] = loop_ms(fn, *args, iters=30)
    out = f32(fn(*args)[:, :rows])
    row[f"{name}_max_err_rel_to_max_output"] = float(jnp.abs(out - exact).max()) / scale
  row["speedup"] = row["cudnn_ms"] / row["kernel_ms"]
  x = jax.random.normal(jax.random.key(1), (batch, tokens, HEADS * HEAD_DIM), jnp.bfloat16)
  for backend in ("cudnn", "mosaic"):
    module = build("mha", HEADS * HEAD_DIM, num_heads=HEADS, backend=backend)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), jax.jit(module.init)(jax.random.key(2), x[:1]))
    row[f"mha_{backend}_ms"] = loop_ms(jax.jit(module.apply), params, x, iters=30)
  row["mha_speedup"] = row["mha_cudnn_ms"] / row["mha_mosaic_ms"]
  print(row, flush=True)
  return row


def main():
  shapes = [(batch, tokens, HEADS, HEAD_DIM) for batch, tokens in SHAPES.values()]
  available = all(hopper_attention.supported(shape, jnp.bfloat16) for shape in shapes)
  kernel_benchmark("hopper_attention", SHAPES, lambda shape: bench(*shape), available,
                   "a Hopper GPU (the kernel is Mosaic GPU wgmma)")


if __name__ == "__main__":
  main()
