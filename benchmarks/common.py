"""Shared benchmark plumbing: a results file that says how it was made (timing: graft_jax.timing, whose loop_ms is
the PyTorch reference's method)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

import jax

from graft_jax.models.config import LayerSpec, OpSpec
from graft_jax.timing import loop_ms


def machine() -> dict:
  gpu = ""
  try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return {"devices": [str(d) for d in jax.devices()], "gpu": gpu, "jax": jax.__version__,
          "python": platform.python_version(), "host": platform.node()}


# GPU 0's SM clock and its maximum, the board's power draw and limit, and whether the driver holds the clocks down
# to stay under that limit (the software power cap).
_CONDITIONS = "clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_throttle_reasons.sw_power_cap"


class GpuConditions:
  """Samples the clock and power of the GPU that JAX numbers 0 with nvidia-smi every `period_ms` while its block
  runs; `summary()` gives their means, or None where nvidia-smi is absent or answers nothing usable (CPU, TPU).

  Why: an H200 running DiT-XL/2's train step draws its 700 W limit and the driver holds the SM clock near 1,570 MHz
  of 1,980, so a time depends on the clock it ran at, and a kernel that only keeps the tensor cores busier can run
  faster alone and not in the step. A result that records its clock can be read against another."""

  def __init__(self, period_ms: int = 100):
    self.period_ms = period_ms
    self.samples: list[tuple] = []
    self._process = None

  def __enter__(self):
    # nvidia-smi numbers the GPUs as the machine does; CUDA_VISIBLE_DEVICES' first entry is JAX's device 0.
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    self._log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe's buffer would stall a long sampling
    try:
      self._process = subprocess.Popen(
          ["nvidia-smi", "-i", gpu, f"--query-gpu={_CONDITIONS}", "--format=csv,noheader,nounits",
           "-lms", str(self.period_ms)], stdout=self._log, stderr=subprocess.DEVNULL, text=True)
    except OSError:
      self._process = None
    return self

  def __exit__(self, *exc_info):
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._log.seek(0)
      self.samples = [s for s in map(_conditions_sample, self._log.read().splitlines()) if s is not None]
    self._log.close()
    return False

  def summary(self) -> dict | None:
    if not self.samples:
      return None
    clock, max_clock, power, limit, capped = zip(*self.samples)
    return {"samples": len(self.samples), "sm_mhz_mean": statistics.mean(clock), "sm_mhz_max": max(max_clock),
            "power_w_mean": statistics.mean(power), "power_limit_w": max(limit),
            "power_capped_fraction": statistics.mean(capped)}


def _conditions_sample(line: str) -> tuple | None:
  """One line of nvidia-smi's CSV as (clock, max clock, power, limit, capped), or None (a field it cannot report
  reads "[N/A]")."""
  fields = [f.strip() for f in line.split(",")]
  if len(fields) != 5 or fields[4] not in ("Active", "Not Active"):
    return None
  try:
    numbers = tuple(map(float, fields[:4]))
  except ValueError:
    return None
  return (*numbers, float(fields[4] == "Active"))


def sampled_loop_ms(fn, *args) -> tuple[float, dict | None]:
  """loop_ms of fn(*args) (the PyTorch reference's method) and `GpuConditions`' summary over its calls, with the
  energy of a call (`joules_per_call`: mean power x ms), the quantity a power-capped GPU's time follows. The first
  call, which compiles, runs before the sampling starts: the GPU idles through a compile."""
  jax.block_until_ready(fn(*args))
  with GpuConditions() as gpu:
    ms = loop_ms(fn, *args)
  summary = gpu.summary()
  if summary and "power_w_mean" in summary:
    summary["joules_per_call"] = summary["power_w_mean"] * ms / 1e3
  return ms, summary


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
