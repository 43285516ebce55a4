"""Hyena-X's conv + gate kernel (graft_jax/operators/kernels/hyena_gate.py) against XLA's fusion, forward, bf16.

python benchmarks/hyena_gate.py [--out benchmarks/results]   (on a GPU)
Shapes: in_proj's output at PixArt's 2048 px, batch 2 (2 x 16,384 tokens) and DiT-XL/2 at batch 256 (256 x 256),
3 x 1152 channels, 4 taps. Per shape: both paths' `loop_ms` and their largest deviation from a float32 evaluation
of the same bf16 inputs, relative to the largest output. Writes hyena_gate.json with the command, machine and date.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import kernel_benchmark
from graft_jax.operators.hyena import gated_conv_xla
from graft_jax.operators.kernels import hyena_gate
from graft_jax.timing import loop_ms

WIDTH, TAPS = 1152, 4
SHAPES = {"pixart_2048px_batch2": (2, 16384), "dit_xl2_batch256": (256, 256)}


def bench(batch: int, tokens: int) -> dict:
  ks = jax.random.split(jax.random.key(0), 3)
  u = jax.random.normal(ks[0], (batch, tokens, 3 * WIDTH), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (TAPS, 3 * WIDTH)) / TAPS ** 0.5).astype(jnp.bfloat16)
  b = jax.random.normal(ks[2], (3 * WIDTH,), jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  exact = jax.jit(gated_conv_xla)(f32(u), f32(w), f32(b))
  scale = float(jnp.abs(exact).max())
  paths = {"xla": jax.jit(gated_conv_xla),
           "kernel": jax.jit(lambda u, w, b: hyena_gate.gated_conv(u, w, b, gated_conv_xla))}
  row = {"batch": batch, "tokens": tokens, "channels": 3 * WIDTH, "taps": TAPS,
         "tiles": {"tokens": hyena_gate.BLOCK_T, "channels": hyena_gate.BLOCK_C, "warps": hyena_gate.WARPS}}
  for name, fn in paths.items():
    row[f"{name}_ms"] = loop_ms(fn, u, w, b, iters=50)
    row[f"{name}_max_err_rel_to_max_output"] = float(jnp.abs(f32(fn(u, w, b)) - exact).max()) / scale
  row["speedup"] = row["xla_ms"] / row["kernel_ms"]
  print(row, flush=True)
  return row


def main():
  available = all(hyena_gate.supported(tokens, 3 * WIDTH, TAPS) for _, tokens in SHAPES.values())
  kernel_benchmark("hyena_gate", SHAPES, lambda shape: bench(*shape), available, "a GPU (the kernel is Pallas Triton)")


if __name__ == "__main__":
  main()
