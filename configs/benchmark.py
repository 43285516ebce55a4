"""Teacher against student: forward latency and throughput, sampling speed, memory, params, FLOPs (`job=benchmark`).

python -m graft_jax.main --config=configs/benchmark.py:experiment=dit_xl2_swa[,ratio=75][,shrink=1] \
  --workdir=runs/bench_swa50 [--config.benchmark.student=runs/swa50/student]
`experiment` names a config file beside this one, whose teacher and graft plan are used (its other arguments pass
through). The student is benchmark.student, else WORKDIR/student, else the plan applied with fresh scions.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from graft_jax.experiment import parse_arg


def get_config(arg=None):
  args = parse_arg(arg)
  name = args.pop("experiment", "dit_xl2_swa")
  path = pathlib.Path(__file__).with_name(f"{name}.py")
  if name in ("benchmark", "analyze", "demo") or not path.exists():
    raise ValueError(f"experiment={name!r} is not a grafting config in {path.parent} (e.g. dit_xl2_swa).")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(",".join(f"{k}={v}" for k, v in args.items()) or None)
  c.stages = ("benchmark",)
  c.benchmark = ml_collections.ConfigDict(dict(
      student="", latency_batch=2, throughput_batch=64, sample_batch=32, sample_steps=50, dtype="bfloat16",
      warmup=2, iters=10, seed=0))
  if args.get("shrink", "0") not in ("0", ""):
    c.benchmark.update(dict(throughput_batch=8, sample_batch=4, sample_steps=4, dtype="float32", warmup=1, iters=3))
  return c
