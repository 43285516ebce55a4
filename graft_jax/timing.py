"""Wall time of jitted work, measured the same way by the demo report and the GPU benchmarks.

Two measures, for two questions:
- `median_ms` (latency): each call waits for the one before it, so host dispatch and launch gaps count. The paper's
  forward latency and the demo report use it.
- `loop_ms` (throughput): calls issued back to back and one wait at the end, so the host runs ahead of the device.
  This is how shared/bench/torch_reference.py times PyTorch (`timeit`: warm-up, synchronise, a loop, synchronise),
  so the benchmarks that state a ratio over PyTorch use it for our side too.
"""
from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median wall time of fn(*args) in ms, each call synchronised (block_until_ready), after compile + warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def loop_ms(fn, *args, warmup: int = 3, iters: int = 10) -> float:
  """Mean wall ms per call of `iters` calls of fn(*args) issued back to back after compile + warm-up, waiting only
  for all of their results at the end (the PyTorch reference's method and defaults)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready([fn(*args) for _ in range(iters)])
  return float((time.perf_counter() - start) / iters * 1e3)
