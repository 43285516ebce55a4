"""Backend-specific kernels (Pallas) behind the operators' `backend`, `ssd_kernel` and `gelu_kernel` options; each
has an XLA twin it is tested against.

The TPU kernels (causal_conv, splash) and the Triton one (ssd) run on CPU through Pallas interpret mode
(`interpret=True`), which is how the tests check their numerics; the TPU ones have not been compiled or timed on TPU
hardware yet, ssd has, on an H200. The Mosaic GPU one (dense_gelu, Hopper wgmma) has no interpret mode here: the
tests check that it lowers and that differentiated calls take its XLA rule; its numbers come from the H200
(benchmarks/dense_gelu.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sixteen_bit(dtype) -> bool:
  """The fused GPU paths (cuDNN attention and these kernels) take bf16 or fp16 operands only."""
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def one_gpu() -> bool:
  """A single GPU: the kernels have no sharding rule, so under a sharded jit they would replicate their operands."""
  return jax.default_backend() == "gpu" and jax.device_count() == 1
