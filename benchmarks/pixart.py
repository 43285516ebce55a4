"""PixArt-Sigma forward at 2048 px (16,384 tokens), batch 2 (one prompt with classifier-free guidance), bf16: the
teacher and its Hyena-X graft (the paper's layers) against shared/bench/torch_reference.py in the same device call
(issue: PixArt-Sigma, point 5).

python benchmarks/pixart.py [--torch FILE] [--image-size 2048] [--depth 28] [--gelu-kernel auto|xla]
  [--attention auto|cudnn|xla|mosaic] [--profile] [--out benchmarks/results]
`--torch` takes the JSON lines of `torch_reference.py pixart` from the same call. Targets: our teacher at least 1.15x
faster than PyTorch eager; the graft at least 1.6x faster than our teacher. Writes pixart.json.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import sampled_loop_ms, with_options, write_results
from benchmarks.dit import torch_lines
from benchmarks.profile import call_profile
from graft_jax import graft
from graft_jax.experiment_pixart import PAPER_LAYERS
from graft_jax.models.config import pixart_config
from graft_jax.models.pixart import PixArt, init_params
from graft_jax.operators.attention import key_masked_attention
from graft_jax.train.state import cast_floating


def forward_ms(config, params, batch: int = 2, profile: bool = False) -> tuple[float, dict | None, dict | None]:
  """`sampled_loop_ms` (the PyTorch reference's method, and the GPU's clock and power) of one bf16 forward on a
  random batch (t = 500, a full 300-token caption), and with `profile` its kernel summary."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, config.input_size, config.input_size, config.in_channels), jnp.bfloat16)
  caption = jax.random.normal(key, (batch, config.caption_length, config.caption_channels), jnp.bfloat16)
  t = jnp.full((batch,), 500)
  run = jax.jit(lambda p, x, c: PixArt(config).apply({"params": p}, x, t, c))
  params = cast_floating(params, jnp.bfloat16)
  ms, conditions = sampled_loop_ms(run, params, x, caption)
  return ms, conditions, call_profile(run, params, x, caption, top=20) if profile else None


def cross_attention_agreement(tokens: int, caption_length: int = 300, heads: int = 16, head_dim: int = 72) -> dict:
  """Largest difference between the cuDNN and XLA cross-attention paths in bf16, relative to the largest XLA value,
  for the output and the q, k, v gradients, on a padded and a scattered caption mask: the fast path's check."""
  kq, kk, kv, kc, km = jax.random.split(jax.random.key(2), 5)
  q = jax.random.normal(kq, (2, tokens, heads, head_dim), jnp.bfloat16)
  k, v = (jax.random.normal(key, (2, caption_length, heads, head_dim), jnp.bfloat16) for key in (kk, kv))
  cotangent = jax.random.normal(kc, q.shape, jnp.bfloat16)
  mask = jnp.stack([jnp.arange(caption_length) < 120, jax.random.bernoulli(km, 0.3, (caption_length,))])

  def outputs(backend):
    fn = lambda q, k, v: key_masked_attention(q, k, v, mask, backend)
    out, pull = jax.vjp(fn, q, k, v)
    return [a.astype(jnp.float32) for a in (out, *pull(cotangent))]

  cudnn, xla = jax.jit(lambda: outputs("cudnn"))(), jax.jit(lambda: outputs("xla"))()
  return {name: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
          for name, a, b in zip(("out", "dq", "dk", "dv"), cudnn, xla)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--torch", help="JSON lines printed by shared/bench/torch_reference.py pixart in the same run")
  parser.add_argument("--image-size", type=int, default=2048)
  parser.add_argument("--depth", type=int, default=28, help="fewer layers for a smoke run (the plan is clipped)")
  parser.add_argument("--profile", action="store_true", help="add each forward's device time by kernel")
  parser.add_argument("--gelu-kernel", default="auto", help="the MLPs' fc1 + GELU: auto, xla or mosaic")
  parser.add_argument("--attention", default="auto", help="self-attention's backend: auto, cudnn, xla or mosaic")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  layers = [i for i in PAPER_LAYERS if i < args.depth]
  if not layers:
    parser.error(f"--depth {args.depth} keeps none of the paper's grafted layers (the first is {PAPER_LAYERS[0]}).")
  teacher = with_options(pixart_config(args.image_size, depth=args.depth), "mlp", "mlp", gelu_kernel=args.gelu_kernel)
  teacher = with_options(teacher, "attn", "mha", backend=args.attention)
  params = init_params(teacher, jax.random.key(0))
  edits = graft.parse_plan([dict(site="attn", layers=layers, operator="hyena_x")], teacher)
  student, student_params = graft.graft(teacher, params, edits, jax.random.key(1))
  row = {"image_size": args.image_size, "tokens": teacher.num_tokens, "depth": args.depth, "batch": 2,
         "grafted_layers": layers, "gelu_kernel": args.gelu_kernel, "attention": args.attention}
  row["teacher_ms"], row["teacher_gpu"], teacher_kernels = forward_ms(teacher, params, profile=args.profile)
  row["graft_ms"], row["graft_gpu"], graft_kernels = forward_ms(student, student_params, profile=args.profile)
  row["graft_speedup"] = row["teacher_ms"] / row["graft_ms"]
  eager = next((r for r in torch_lines(args.torch) if r["what"] == "pixart_sigma_fwd_bf16_eager"
                and r.get("res") == args.image_size), None)
  if eager and args.depth == 28:  # the reference is the whole 28-layer model
    row["torch_eager_ms"] = eager["ms"]
    row["teacher_speedup_over_torch_eager"] = eager["ms"] / row["teacher_ms"]
  if jax.default_backend() == "gpu":
    row["cross_attention_cudnn_vs_xla_rel_err"] = cross_attention_agreement(teacher.num_tokens)
  row["targets"] = {"teacher_over_torch_eager": 1.15, "graft_over_teacher": 1.6}
  if args.profile:
    row["profile"] = {"teacher": teacher_kernels, "graft": graft_kernels}
  print(row, flush=True)
  print(write_results("pixart", [row], {"dtype": "bfloat16"}, args.out))


if __name__ == "__main__":
  main()
