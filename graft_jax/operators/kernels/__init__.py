"""Backend-specific kernels (Pallas) behind the operators' `backend`, `ssd_kernel` and `gelu_kernel` options, and
the ones DiT's blocks take for their norms (norm_modulate, forward and backward); each has an XLA twin it is tested
against.

The TPU kernels (causal_conv, splash) and the Triton ones (ssd, hyena_gate, norm_modulate) run on CPU through Pallas
interpret mode (`interpret=True`), which is how the tests check their numerics; the TPU ones have not been compiled
or timed on TPU hardware yet, the Triton ones have, on an H200. The Mosaic GPU ones (dense_gelu, hopper_attention
and its backward hopper_attention_grad, Hopper wgmma) do not run in jax 0.10's GPU interpret mode
(`InterpretGPUParams`), which lacks what they use: 2-D barrier arrays, `plgpu.load` with a layout, accumulators
started from a value (`ACC.init`, run_state), a CPU rule for `layout_cast`, and transposed wgmma operands (tried
2026-11-30). They do lower on a CPU-only machine (`jax.export` for platform "cuda", or `.lower(lowering_platforms=
("cuda",))`), which runs Mosaic's own shape, layout and alignment checks: the tests check that they lower, that
hopper_attention's differentiated calls take their reference's values and gradients where MHA does not train on
its backward kernels, and that the MLP's custom VJP over dense_gelu's kernels gives autodiff's gradients with XLA's
compositions standing in for them; their numbers come from the H200 (benchmarks/dense_gelu.py,
benchmarks/hopper_attention.py, and for the attention's backward the ad-hoc runs in benchmarks/HISTORY.md). Under a
sharded jit, causal_conv, ssd, dense_gelu, hyena_gate, norm_modulate, hopper_attention (and its backward) and splash
run on each device's batch shard (`batch_partitioned`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def sixteen_bit(dtype) -> bool:
  """The fused GPU paths (cuDNN attention and these kernels) take bf16 or fp16 operands only."""
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU: the Mosaic GPU kernels use wgmma, which is sm_90 only."""
  return jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "").startswith("9")


def sm_count() -> int:
  """The default device's streaming multiprocessors, which the persistent Mosaic GPU kernels run one program on
  each; an H100's or H200's 132 where the device does not say."""
  return getattr(jax.devices()[0], "core_count", 132)


def forward_only(kernel: Callable, reference: Callable) -> Callable:
  """kernel(*arrays) in undifferentiated calls; a differentiated call runs `reference` instead (the composition the
  kernel replaces). The forward rule is reference's own (jax.vjp's function is a pytree of arrays, so its residuals
  are the residuals), so remat policies save and recompute exactly what they would without the kernel."""
  call = jax.custom_vjp(lambda *arrays: kernel(*arrays))
  call.defvjp(lambda *arrays: jax.vjp(reference, *arrays), lambda vjp, cotangent: vjp(cotangent))
  return call


def batch_partitioned(fn: Callable, replicated: tuple[int, ...] = ()) -> Callable:
  """fn (a Pallas call) as an op the SPMD partitioner runs on each device's share of the batch.

  Every operand but those at `replicated` (weights) and every result of fn has the batch on axis 0, and fn maps
  batch entries independently. A Pallas call has no sharding rule of its own, so under a sharded jit XLA would
  gather its operands and run the whole batch on every device; this keeps the batch axis sharded as the first
  batched operand's is (replicating the other axes and the `replicated` operands) and calls fn on the shards,
  unless a result's rows do not split evenly over those devices (a row per tile of rows, say): then every device
  runs the whole batch. On one device fn is simply inlined.
  """
  op = custom_partitioning(fn)

  def shardings(mesh, arg_shapes, result_shape):
    spec = next(shape.sharding.spec for i, shape in enumerate(arg_shapes) if i not in replicated)
    axis = spec[0] if len(spec) else None
    devices = math.prod(mesh.shape[name] for name in jax.tree.leaves(axis))
    # A result with fewer rows than whole per device cannot be split: then every device runs the whole batch.
    if any(result.shape[0] % devices for result in jax.tree.leaves(result_shape)):
      axis = None
    batch = NamedSharding(mesh, PartitionSpec(axis))
    args = tuple(NamedSharding(mesh, PartitionSpec()) if i in replicated else batch for i in range(len(arg_shapes)))
    return args, jax.tree.map(lambda _: batch, result_shape)

  def partition(mesh, arg_shapes, result_shape):
    args, results = shardings(mesh, arg_shapes, result_shape)
    return mesh, fn, results, args

  def sharding_rule(mesh, operand_types, result_types):
    # Shardy's rule: factor "b" is the batch; every other dimension is its own factor, kept unsharded.
    kept = []

    def factors(prefix, rank, batched):
      names = [f"{prefix}{d}" for d in range(rank)]
      if batched:
        names[0] = "b"
      kept.extend(name for name in names if name != "b")
      return " ".join(names)
    operands = ", ".join(factors(f"i{i}_", len(t.shape), i not in replicated) for i, t in enumerate(operand_types))
    results = ", ".join(factors(f"o{i}_", len(t.shape), True) for i, t in enumerate(result_types))
    return f"{operands} -> {results}", {"need_replication_factors": tuple(kept)}

  op.def_partition(partition=partition, sharding_rule=sharding_rule,
                   infer_sharding_from_operands=lambda mesh, args, result: shardings(mesh, args, result)[1])
  return op
