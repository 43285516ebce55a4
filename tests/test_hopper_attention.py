"""The Hopper self-attention kernel (operators/kernels/hopper_attention.py) behind MHA's backend "mosaic": it cannot
run on a CPU, so these check what can be checked here. It lowers to Mosaic GPU at DiT's head width; differentiated
calls take the cuDNN/XLA composition's values and gradients exactly; shapes it does not take fall back to that
composition through the padding, also on batch shards under a sharded jit; "auto" picks it only where it beat cuDNN
on the H200. Its numerics and speed are the H200's to measure (benchmarks/hopper_attention.py: error against a
float32 evaluation, time against cuDNN)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import _sharded_matches_one_device

from graft_jax import operators as ops
from graft_jax.operators.attention import self_attention
from graft_jax.operators.kernels import hopper_attention


def _qkv(shape, dtype=jnp.bfloat16):
  return [jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(0), 3)]


def test_kernel_lowers_to_mosaic_gpu():
  # Heads of 72 padded to 80; 512 tokens: two 256-key steps, two programs of 128 queries per (batch, head).
  spec = jax.ShapeDtypeStruct((2, 512, 2, 72), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda q, k, v: self_attention(q, k, v, "mosaic")), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in ("mosaic_gpu", "mosaic_gpu_v2")],
  )(spec, spec, spec)
  assert "mosaic_gpu" in exported.mlir_module()
  assert exported.out_avals[0].shape == (2, 512, 2, 72)


def test_differentiated_call_takes_the_composition():
  q, k, v = _qkv((2, 512, 2, 72))
  cotangent = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
  xla, fused = (jax.vjp(lambda q, k, v: self_attention(q, k, v, backend), q, k, v) for backend in ("xla", "mosaic"))
  np.testing.assert_array_equal(xla[0], fused[0])
  for a, b in zip(xla[1](cotangent), fused[1](cotangent)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(2, 96, 2, 72), (1, 512, 2, 8)])
def test_shapes_it_does_not_take_run_the_composition(shape):
  # 96 tokens are no whole tile; float32 is no kernel dtype. Both go through the padding and back.
  q, k, v = _qkv(shape, jnp.float32)
  np.testing.assert_array_equal(self_attention(q, k, v, "mosaic"), self_attention(q, k, v, "xla"))


def test_kernel_call_runs_on_batch_shards():
  # float32 takes the composition inside the partitioned call, standing in for the kernel a CPU cannot run.
  _sharded_matches_one_device(lambda q, k, v: self_attention(q, k, v, "mosaic"), _qkv((8, 64, 2, 72), jnp.float32))


def test_auto_takes_the_kernel_only_where_it_paid_off():
  assert not hopper_attention.supported((2, 16384, 16, 72), (2, 16384, 16, 72), jnp.bfloat16)  # no GPU here
  assert hopper_attention.fits((2, 16384, 16, 72), (2, 16384, 16, 72), jnp.bfloat16)
  assert not hopper_attention.fits((2, 16384, 16, 72), (2, 16384, 16, 72), jnp.float32)
  assert hopper_attention.pays_off((2, 16384, 16, 72)) and hopper_attention.pays_off((2, 4096, 16, 72))
  assert not hopper_attention.pays_off((64, 1024, 16, 72)) and not hopper_attention.pays_off((256, 256, 16, 72))
  assert not hopper_attention.pays_off((2, 16384, 16, 64))  # cuDNN does not round a head of 64 up


def test_mha_module_takes_the_backend():
  x = jax.random.normal(jax.random.key(2), (2, 256, 64))
  mha, xla = (ops.build("mha", 64, num_heads=4, backend=backend) for backend in ("mosaic", "xla"))
  params = xla.init(jax.random.key(3), x)
  np.testing.assert_array_equal(mha.apply(params, x), xla.apply(params, x))
  with pytest.raises(ValueError, match=r"^attention backend must be one of \('auto', 'cudnn', 'xla', 'mosaic'\)"):
    ops.build("mha", 64, num_heads=4, backend="flash").apply(params, x)
