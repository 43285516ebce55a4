"""Where device time goes: jitted work run under jax.profiler, its GPU kernels summed by name and by kind.

The trace is read back with jax.profiler.ProfileData (no TensorBoard needed), so a device call can print the
table instead of shipping a trace home.
"""
from __future__ import annotations

import collections
import pathlib
import tempfile

import jax

# Substrings of kernel names, lower-cased, that say what a kernel is. First match wins.
KINDS = (("attention", ("cudnn", "fmha", "flash", "sdpa")),
         ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "wgmma")),
         ("triton", ("triton",)),
         ("copy", ("memcpy", "memset", "copy")))


def kind_of(kernel: str) -> str:
  name = kernel.lower()
  return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "fusion")


def kernel_times(run, calls: int = 3) -> dict[str, float]:
  """Device ms per call of every kernel name while `run()` is called `calls` times (it must block itself)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        run()
    trace = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
  totals = collections.defaultdict(float)
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      # Kernels sit on the stream lines; "XLA Ops"/"XLA Modules" lines repeat the same time at coarser grain.
      if line.name.startswith("Stream"):
        for event in line.events:
          totals[event.name] += event.duration_ns / 1e6 / calls
  return dict(totals)


def call_profile(fn, *args, top: int = 15) -> dict:
  """`summary` of the kernels of the call fn(*args) (jitted and already compiled)."""
  return summary(kernel_times(lambda: jax.block_until_ready(fn(*args))), top=top)


def summary(times: dict[str, float], top: int = 15) -> dict:
  """Total, per-kind totals and the `top` kernels by time (ms per call)."""
  kinds = collections.defaultdict(float)
  for name, ms in times.items():
    kinds[kind_of(name)] += ms
  ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
  return {"device_ms": sum(times.values()), "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
          "top": [{"kernel": name[:120], "kind": kind_of(name), "ms": ms} for name, ms in ranked]}
