"""Forward and forward+backward time of every operator, bf16, against cuDNN MHA in the same run (issue: operators).

python benchmarks/operators.py [--only mamba2,swa] [--profile] [--out benchmarks/results]   (on a GPU)
Shapes: (B=256, N=256, D=1152) and (B=2, N=16384, D=1152). Writes operators.json with the command, machine, date.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import write_results
from benchmarks.profile import call_profile
from graft_jax.operators import build
from graft_jax.timing import median_ms

D = 1152
OPERATORS = [("mha", {"backend": "cudnn"}), ("mha", {"backend": "xla"}), ("mha", {"backend": "mosaic"}), ("swa", {}),
             ("hyena_x", {}), ("hyena_y", {}), ("hyena_se", {}), ("mamba2", {}), ("mamba2", {"ssd_kernel": "xla"}),
             ("mlp", {"ratio": 4.0}), ("mlp", {"ratio": 3.0}), ("mlp", {"ratio": 6.0}), ("mlp_hyena_x", {})]
SHAPES = [(256, 256), (2, 16384)]


def time_operator(name, config, batch, tokens, profile: bool = False):
  """(forward ms, forward+backward ms, forward+backward's kernel summary or None)."""
  module = build(name, D, **config)
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, tokens, D), jnp.bfloat16)
  params = jax.jit(module.init)(key, jnp.zeros((1, tokens, D), jnp.bfloat16))
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  forward = jax.jit(module.apply)
  loss = lambda p, x: jnp.sum(jnp.square(module.apply(p, x).astype(jnp.float32)))
  backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
  fwd, fwd_bwd = median_ms(forward, params, x), median_ms(backward, params, x)  # compiled and warm before profiling
  return fwd, fwd_bwd, call_profile(backward, params, x, top=12) if profile else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--only", help="comma-separated operator names (cuDNN MHA, the reference, always runs)")
  parser.add_argument("--name", default="operators", help="results file name (a partial run should not overwrite "
                      "the full table)")
  parser.add_argument("--profile", action="store_true", help="add forward+backward's device time by kernel")
  args = parser.parse_args()
  only = set(args.only.split(",")) | {"mha"} if args.only else None
  rows = []
  for batch, tokens in SHAPES:
    for name, config in OPERATORS:
      if only and name not in only:
        continue
      try:
        fwd, fwd_bwd, profile = time_operator(name, config, batch, tokens, args.profile)
      except Exception as e:  # a backend that cannot run this shape is reported, not fatal
        rows.append({"operator": name, "config": config, "batch": batch, "tokens": tokens,
                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(rows[-1], flush=True)
        continue
      rows.append({"operator": name, "config": config, "batch": batch, "tokens": tokens, "fwd_ms": fwd,
                   "fwd_bwd_ms": fwd_bwd} | ({"profile": profile} if profile else {}))
      print(f"B={batch} N={tokens} {name} {config}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms", flush=True)
  for batch, tokens in SHAPES:
    ref = next(r for r in rows if r["batch"] == batch and r["tokens"] == tokens and r["operator"] == "mha"
               and r["config"].get("backend") == "cudnn" and "fwd_ms" in r)
    for r in rows:
      if r["batch"] == batch and r["tokens"] == tokens and "fwd_ms" in r:
        r["fwd_vs_cudnn_mha"] = r["fwd_ms"] / ref["fwd_ms"]
        r["fwd_bwd_speedup_over_cudnn_mha"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
  targets = {"swa_and_hyena_x_at_16384_at_least_8x_faster_fwd_bwd": all(
      r["fwd_bwd_speedup_over_cudnn_mha"] >= 8 for r in rows
      if r["tokens"] == 16384 and r["operator"] in ("swa", "hyena_x") and "fwd_ms" in r),
      "none_slower_than_1.5x_mha_at_256": all(
          r["fwd_bwd_speedup_over_cudnn_mha"] >= 1 / 1.5 for r in rows
          if r["tokens"] == 256 and r["operator"] in ("swa", "hyena_x", "hyena_y", "hyena_se", "mamba2")
          and "fwd_ms" in r)}
  if only:  # a target over operators this run skipped would hold vacuously
    targets = {k: v for k, v in targets.items() if ("swa" in only or "hyena_x" in only) or "16384" not in k}
  print(write_results(args.name, rows, {"dtype": "bfloat16", "width": D, "targets_met": targets}, args.out))
  print(targets)


if __name__ == "__main__":
  main()
