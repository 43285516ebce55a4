"""The MLP's GELU kernels (graft_jax/operators/kernels/dense_gelu.py) against XLA, bf16.

python benchmarks/dense_gelu.py [--out benchmarks/results]   (on a Hopper GPU)
Shapes: DiT-XL/2 at batch 256 (65,536 tokens) and PixArt at 2048 px, batch 2 (32,768 tokens); width 1152 -> 4608.
Per shape, ms: XLA's fc1 alone; fc1 + GELU by XLA and by the kernel; the same also writing the GELU's derivative (a
train step's forward); fc2's input gradient times that derivative (a train step's backward); the whole MLP forward,
and forward + backward, both ways; and the largest deviation of each result from a float32 reference. Writes
dense_gelu.json with the command, machine and date.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.common import kernel_benchmark
from graft_jax.operators.kernels import dense_gelu
from graft_jax.timing import median_ms

WIDTH, HIDDEN = 1152, 4608
SHAPES = {"dit_xl2_batch256": 65536, "pixart_2048px_batch2": 32768}


def _f32(a):
  return a.astype(jnp.float32)


def _xla_mlp(x, w1, b1, w2, b2):
  return dense_gelu.reference(x, w1, b1) @ w2 + b2


def _train(mlp):
  """Forward and backward of an MLP, the output's gradient given: the MLP's share of a train step."""
  def step(x, w1, b1, w2, b2, dy):
    y, vjp = jax.vjp(mlp, x, w1, b1, w2, b2)
    return y, vjp(dy)
  return jax.jit(step)


def bench(tokens: int) -> dict:
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (tokens, WIDTH), jnp.bfloat16)
  w1 = (jax.random.normal(ks[1], (WIDTH, HIDDEN)) * WIDTH ** -0.5).astype(jnp.bfloat16)
  b1 = (jax.random.normal(ks[2], (HIDDEN,)) * 0.1).astype(jnp.bfloat16)
  w2 = (jax.random.normal(ks[3], (HIDDEN, WIDTH)) * HIDDEN ** -0.5).astype(jnp.bfloat16)
  b2 = (jax.random.normal(ks[4], (WIDTH,)) * 0.1).astype(jnp.bfloat16)
  dy = jax.random.normal(ks[5], (tokens, WIDTH), jnp.bfloat16)
  weights = (w1, b1, w2, b2)
  derivative = dense_gelu.gelu_and_derivative(_f32(x @ w1 + b1))[1].astype(jnp.bfloat16)
  epilogue = lambda name: jax.jit(functools.partial(dense_gelu.matmul_epilogue, epilogue=name))
  xla = lambda name: jax.jit(functools.partial(dense_gelu._reference_call, epilogue=name))
  exact_gelu = jax.nn.gelu(_f32(x) @ _f32(w1) + _f32(b1), approximate=True)
  exact_product = (_f32(dy) @ _f32(w2).T) * _f32(derivative)
  exact_train = _train(lambda *a: _xla_mlp(*map(_f32, a)))(x, *weights, _f32(dy))
  err = lambda got, exact: float(jnp.abs(_f32(got) - exact).max())
  time = lambda fn, *args: median_ms(fn, *args, warmup=3, iters=30)
  row = {"tokens": tokens, "width": WIDTH, "hidden": HIDDEN,
         "xla_fc1_ms": time(jax.jit(lambda x, w, b: x @ w + b), x, w1, b1)}
  cases = (("gelu", b1, x, w1, exact_gelu), ("gelu_and_derivative", b1, x, w1, exact_gelu),
           ("times_derivative", derivative, dy, w2, exact_product))  # fc2's kernel as stored
  for name, side, lhs, rhs, exact in cases:
    for way, fn in (("xla", xla(name)), ("kernel", epilogue(name))):
      row[f"{way}_{name}_ms"] = time(fn, lhs, rhs, side)
      row[f"{way}_{name}_max_abs_err_vs_f32"] = err(fn(lhs, rhs, side)[0], exact)
  row["xla_mlp_ms"] = time(jax.jit(_xla_mlp), x, *weights)
  row["kernel_mlp_ms"] = time(jax.jit(dense_gelu.mlp), x, *weights)
  for way, mlp in (("xla", _xla_mlp), ("kernel", dense_gelu.mlp)):
    fn = _train(mlp)
    row[f"{way}_mlp_train_ms"] = time(fn, x, *weights, dy)
    grads = fn(x, *weights, dy)[1]
    row[f"{way}_mlp_train_grad_errs_vs_f32"] = {name: err(g, e) for name, g, e in zip(
        ("x", "w1", "b1", "w2", "b2"), grads, exact_train[1])}
  row["mlp_speedup"] = row["xla_mlp_ms"] / row["kernel_mlp_ms"]
  row["mlp_train_speedup"] = row["xla_mlp_train_ms"] / row["kernel_mlp_train_ms"]
  print(row, flush=True)
  return row


def main():
  kernel_benchmark("dense_gelu", SHAPES, bench, dense_gelu.supported(max(SHAPES.values()), WIDTH, HIDDEN, jnp.bfloat16),
                   "a Hopper GPU (the kernels are wgmma, sm_90)")


if __name__ == "__main__":
  main()
