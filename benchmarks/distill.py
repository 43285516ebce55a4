"""Stage-1 speed on one accelerator: the 14 odd attention layers of DiT-XL/2 grafted with SWA, batch 64, bf16.

python benchmarks/distill.py [--steps 60] [--profile] [--preset DiT-XL/2 --batch 64] (a small preset: smoke runs)
Runs the real stage-1 trainer (random teacher weights, random latents), reads its measured steps/s (compilation
excluded) and extrapolates to the paper's 200 epochs over 8k samples. With --profile, the run's GPU kernels are
summed too (device ms per step against wall ms per step: a gap means the host, not the GPU, sets the pace).
Writes distill.json.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_results
from benchmarks.profile import kernel_times, summary
from graft_jax import graft
from graft_jax.data.arrays import ArrayIterator
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.dit import capture
from graft_jax.timing import median_ms
from graft_jax.train import distill
from graft_jax.train.metrics import read_metrics
from graft_jax.train.state import cast_floating


def teacher_forward_ms(teacher, params, edits, student, batch: int) -> float:
  """The teacher's share of a step: one bf16 capture forward returning every grafted site."""
  sites = [distill.teacher_site(student, i, s) for i, s in graft.sites(edits)]
  params = cast_floating(params, jnp.bfloat16)
  x = jnp.zeros((batch, teacher.input_size, teacher.input_size, teacher.in_channels), jnp.bfloat16)
  t, y = jnp.full((batch,), 500), jnp.zeros((batch,), jnp.int32)
  fn = jax.jit(lambda p, x: capture(DiT(teacher), p, x, t, y, sites)[1])
  return median_ms(fn, params, x)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--preset", default="DiT-XL/2")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  teacher = dit_config(args.preset)
  params = init_params(teacher, jax.random.key(0))
  edits = graft.parse_plan([dict(site="attn", layers="odd", operator="swa")], teacher)
  student, student_params = graft.graft(teacher, params, edits, jax.random.key(1))
  rng = np.random.default_rng(0)
  shape = (teacher.input_size, teacher.input_size, teacher.in_channels)
  rows_of = lambda n: {"x": rng.standard_normal((n, *shape), np.float32),
                       "y": rng.integers(0, teacher.num_classes, n).astype(np.int32)}
  data = ArrayIterator(rows_of(8 * args.batch), args.batch)
  heldout = [next(ArrayIterator(rows_of(args.batch), args.batch))]
  config = distill.default_config()
  config.update(dict(steps=args.steps, batch_size=args.batch, log_every=args.steps // 3,
                     checkpoint_every=args.steps, compute_dtype="bfloat16"))
  with tempfile.TemporaryDirectory() as workdir:
    def run():
      distill.run_distill(config, DiT(teacher), params, student, student_params, graft.sites(edits), data, heldout,
                          workdir)
    kernels = kernel_times(run, calls=1) if args.profile else run()
    rows = read_metrics(pathlib.Path(workdir) / "metrics" / "metrics.jsonl")
  teacher_ms = teacher_forward_ms(teacher, params, edits, student, args.batch)
  steps_per_sec = float(np.median([r["steps_per_sec"] for r in rows[1:]]))  # the first interval holds compilation
  paper_steps = 200 * 8000 // args.batch
  result = {"model": args.preset, "layers": len(graft.sites(edits)), "operator": "swa", "batch": args.batch,
            "steps_per_sec": steps_per_sec, "teacher_capture_forward_ms": teacher_ms, "step_ms": 1e3 / steps_per_sec,
            "paper_schedule_steps": paper_steps, "paper_schedule_minutes": paper_steps / steps_per_sec / 60,
            "target_minutes": 30, "target_met": paper_steps / steps_per_sec / 60 < 30}
  if args.profile:  # the whole run, compilation and held-out evaluation included, per step
    result["profile_per_step"] = summary({k: v / args.steps for k, v in kernels.items()}, top=30)
  print(write_results("distill", [result], {"dtype": "bfloat16"}, args.out))
  print(result)


if __name__ == "__main__":
  main()
