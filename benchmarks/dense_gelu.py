"""The fused fc1 + GELU Hopper kernel (graft_jax/operators/kernels/dense_gelu.py) against XLA, forward, bf16.

python benchmarks/dense_gelu.py [--out benchmarks/results]   (on a Hopper GPU)
Shapes: DiT-XL/2 at batch 256 (65,536 tokens) and PixArt at 2048 px, batch 2 (32,768 tokens); width 1152 -> 4608.
Per shape: XLA's fc1 alone and fc1 + GELU, the kernel, the whole MLP (fc2 included) both ways, and the largest
deviation of each from a float32 reference. Writes dense_gelu.json with the command, machine and date.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import kernel_benchmark
from graft_jax.operators.kernels import dense_gelu
from graft_jax.timing import median_ms

WIDTH, HIDDEN = 1152, 4608
SHAPES = {"dit_xl2_batch256": 65536, "pixart_2048px_batch2": 32768}


def bench(tokens: int) -> dict:
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (tokens, WIDTH), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (WIDTH, HIDDEN)) * WIDTH ** -0.5).astype(jnp.bfloat16)
  b = (jax.random.normal(ks[2], (HIDDEN,)) * 0.1).astype(jnp.bfloat16)
  w2 = (jax.random.normal(ks[3], (HIDDEN, WIDTH)) * HIDDEN ** -0.5).astype(jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  exact = np.asarray(jax.jit(lambda x, w, b: jax.nn.gelu(f32(x) @ f32(w) + f32(b), approximate=True))(x, w, b))
  xla, fused = jax.jit(dense_gelu.reference), jax.jit(dense_gelu.dense_gelu)
  time = lambda fn, *args: median_ms(fn, *args, warmup=3, iters=30)
  row = {"tokens": tokens, "width": WIDTH, "hidden": HIDDEN,
         "xla_fc1_ms": time(jax.jit(lambda x, w, b: x @ w + b), x, w, b),
         "xla_fc1_gelu_ms": time(xla, x, w, b), "kernel_fc1_gelu_ms": time(fused, x, w, b),
         "xla_mlp_ms": time(jax.jit(lambda *a: dense_gelu.reference(*a[:3]) @ a[3]), x, w, b, w2),
         "kernel_mlp_ms": time(jax.jit(lambda *a: dense_gelu.dense_gelu(*a[:3]) @ a[3]), x, w, b, w2),
         "xla_max_abs_err_vs_f32": float(np.abs(f32(xla(x, w, b)) - exact).max()),
         "kernel_max_abs_err_vs_f32": float(np.abs(f32(fused(x, w, b)) - exact).max())}
  row["mlp_speedup"] = row["xla_mlp_ms"] / row["kernel_mlp_ms"]
  print(row, flush=True)
  return row


def main():
  kernel_benchmark("dense_gelu", SHAPES, bench, dense_gelu.supported(max(SHAPES.values()), WIDTH, HIDDEN, jnp.bfloat16),
                   "a Hopper GPU (the kernel is wgmma, sm_90)")


if __name__ == "__main__":
  main()
