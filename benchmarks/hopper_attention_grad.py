"""The Hopper attention kernels' backward (graft_jax/operators/kernels/hopper_attention_grad.py) against cuDNN's,
bf16: what decides whether MHA's "auto" trains on them (`hopper_attention_grad.pays_off`).

python benchmarks/hopper_attention_grad.py [--out benchmarks/results]   (on a Hopper GPU)
Shapes: 16 heads of 72 (DiT-XL/2's and PixArt-Sigma's) for DiT-XL/2 at batch 256 (256 tokens), 1,024 tokens at
batch 64 and PixArt's 1024 px at batch 2 (4,096 tokens). Per shape, `loop_ms` of the attention's forward and
backward (cuDNN on q, k and v as three arrays; the kernels on the packed array with q's bias added inside), each
one's gradients' largest deviation from a float32 evaluation of the same bf16 inputs (the first 4 examples),
relative to each gradient's largest value; and the whole MHA operator's forward and backward on "cudnn" and
"mosaic". Writes hopper_attention_grad.json with the command, machine and date.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import kernel_benchmark
from graft_jax.operators import build
from graft_jax.operators.attention import softmax_attention
from graft_jax.operators.kernels import hopper_attention, hopper_attention_grad
from graft_jax.timing import loop_ms

HEADS, HEAD_DIM = 16, 72
SHAPES = {"dit_xl2_batch256": (256, 256), "tokens1024_batch64": (64, 1024), "pixart_1024px_batch2": (2, 4096)}
CHECKED = 4  # examples the float32 evaluation covers


def gradients(attend):
  """(qkv, q_bias, do) -> (dqkv, dq_bias) of attend(qkv, q_bias) for the output's cotangent do."""
  return jax.jit(lambda qkv, q_bias, do: jax.vjp(attend, qkv, q_bias)[1](do))


def bench(batch: int, tokens: int, kernels=hopper_attention_grad.attention) -> dict:
  keys = jax.random.split(jax.random.key(0), 3)
  qkv = jax.random.normal(keys[0], (batch, tokens, 3, HEADS, HEAD_DIM), jnp.bfloat16)
  q_bias = (0.5 * jax.random.normal(keys[1], (HEADS, HEAD_DIM))).astype(jnp.bfloat16)
  do = jax.random.normal(keys[2], (batch, tokens, HEADS, HEAD_DIM), jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  exact_attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  exact = gradients(lambda qkv, q_bias: hopper_attention.unpacked(qkv, q_bias, exact_attention))(
      f32(qkv[:CHECKED]), f32(q_bias), f32(do[:CHECKED]))
  paths = {"cudnn": lambda qkv, q_bias: hopper_attention.unpacked(qkv, q_bias, softmax_attention), "kernels": kernels}
  row = {"batch": batch, "tokens": tokens, "heads": HEADS, "head_dim": HEAD_DIM,
         "auto_trains_on_kernels": hopper_attention_grad.pays_off((batch, tokens, HEADS, HEAD_DIM))}
  for name, attend in paths.items():
    grad = gradients(attend)
    row[f"{name}_fwd_bwd_ms"] = loop_ms(grad, qkv, q_bias, do, iters=30)
    approx = grad(qkv[:CHECKED], q_bias, do[:CHECKED])
    errors = [float(jnp.abs(f32(a) - e).max() / jnp.abs(e).max()) for a, e in
              ((approx[0][:, :, 0], exact[0][:, :, 0]), (approx[0][:, :, 1], exact[0][:, :, 1]),
               (approx[0][:, :, 2], exact[0][:, :, 2]), (approx[1], exact[1]))]
    row[f"{name}_max_err_rel"] = dict(zip(("dq", "dk", "dv", "dq_bias"), errors))
  row["speedup"] = row["cudnn_fwd_bwd_ms"] / row["kernels_fwd_bwd_ms"]
  x = jax.random.normal(jax.random.key(1), (batch, tokens, HEADS * HEAD_DIM), jnp.bfloat16)
  dy = jax.random.normal(jax.random.key(2), x.shape, x.dtype)
  for backend in ("cudnn", "mosaic"):
    module = build("mha", HEADS * HEAD_DIM, num_heads=HEADS, backend=backend)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), jax.jit(module.init)(jax.random.key(3), x[:1]))
    step = jax.jit(lambda params, x, dy, apply=module.apply: jax.vjp(apply, params, x)[1](dy))
    row[f"mha_{backend}_fwd_bwd_ms"] = loop_ms(step, params, x, dy, iters=30)
  row["mha_speedup"] = row["mha_cudnn_fwd_bwd_ms"] / row["mha_mosaic_fwd_bwd_ms"]
  print(row, flush=True)
  return row


def main():
  shapes = [(batch, tokens, HEADS, HEAD_DIM) for batch, tokens in SHAPES.values()]
  available = all(hopper_attention.supported(shape, jnp.bfloat16) and
                  hopper_attention_grad.fits_train(shape, jnp.bfloat16) for shape in shapes)
  kernel_benchmark("hopper_attention_grad", SHAPES, lambda shape: bench(*shape), available,
                   "a Hopper GPU (the kernels are Mosaic GPU wgmma)")


if __name__ == "__main__":
  main()
