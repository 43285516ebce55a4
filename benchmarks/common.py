"""Shared benchmark plumbing: a results file that says how it was made (timing: graft_jax.timing, whose loop_ms is
the PyTorch reference's method)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import subprocess
import sys

import jax

from graft_jax.models.config import LayerSpec, OpSpec


def machine() -> dict:
  gpu = ""
  try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return {"devices": [str(d) for d in jax.devices()], "gpu": gpu, "jax": jax.__version__,
          "python": platform.python_version(), "host": platform.node()}


def write_results(name: str, rows: list[dict], extra: dict | None = None, out_dir: str = "benchmarks/results"):
  record = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": machine(), **(extra or {}), "rows": rows}
  path = pathlib.Path(out_dir) / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=1))
  return path


def with_options(config, site: str, operator: str, **options):
  """`config` with `options` set on every `operator` at `site` ("attn" or "mlp") of a plain layer: the benchmarks'
  --gelu-kernel (the MLPs' gelu_kernel) and --attention (MHA's backend)."""
  def edit(layer):
    spec = getattr(layer, site, None) if isinstance(layer, LayerSpec) else None
    if spec is None or spec.name != operator:
      return layer
    return dataclasses.replace(layer, **{site: OpSpec.make(operator, **{**spec.config, **options})})
  return config.replace(layers=tuple(map(edit, config.layers)))


def kernel_benchmark(name: str, shapes: dict, bench, available: bool, requirement: str):
  """A kernel microbenchmark's command line: --out, one clear exit where the kernel cannot run, then bench(shape)
  for each named shape into NAME.json (bf16)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  if not available:
    raise SystemExit(f"benchmarks/{name}.py needs {requirement}.")
  rows = [{"shape": shape_name, **bench(shape)} for shape_name, shape in shapes.items()]
  print(write_results(name, rows, {"dtype": "bfloat16"}, args.out))
