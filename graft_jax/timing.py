"""Wall time of jitted work, measured the same way by the demo report and the GPU benchmarks."""
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
