"""The flash-attention kernel for heads that are not a power of two (kernels/flash.py): how a head splits into
pieces, its values in Pallas interpret mode against naive float32 attention (1e-5), that a differentiated call takes
the fallback path's gradients, that it runs on batch shards under a sharded jit, and that it lowers for CUDA at DiT's
head of 72. Its speed is the H200's to measure (benchmarks/dit.py and pixart.py, --attention flash)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import _grads, _normal, _sharded_matches_one_device

from graft_jax import operators as ops
from graft_jax.operators.attention import dense_attention_reference, self_attention
from graft_jax.operators.kernels import flash

jax.config.update("jax_default_matmul_precision", "highest")
TOL = dict(atol=1e-5, rtol=1e-5)


def test_heads_split_into_power_of_two_pieces():
  assert flash.pieces(72) == ((0, 64, 0), (56, 16, 8))  # the work of a head of 80, not 128
  assert flash.pieces(64) == ((0, 64, 0),)
  assert flash.pieces(80) == ((0, 64, 0), (64, 16, 0))
  assert flash.pieces(40) == ((0, 32, 0), (24, 16, 8))
  assert flash.pieces(8) is None  # below Triton's smallest matmul side


@pytest.mark.parametrize("head_dim", [72, 64, 40])
def test_kernel_matches_naive_attention(head_dim):
  # 256 tokens: two blocks of queries, four blocks of keys, so the online softmax rescales across blocks.
  q, k, v = _normal(head_dim, *[(2, 256, 2, head_dim)] * 3)
  q = 3 * q  # sharp rows: the running max moves between key blocks
  np.testing.assert_allclose(flash.flash_attention(q, k, v, interpret=True), dense_attention_reference(q, k, v),
                             **TOL)


def test_differentiated_call_takes_the_fallback():
  q, k, v = _normal(1, *[(1, 128, 2, 72)] * 3)
  fallback = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  for got, want in zip(_grads(lambda *a: flash.flash_attention(*a, interpret=True), q, k, v),
                       _grads(fallback, q, k, v)):
    np.testing.assert_array_equal(got, want)


def test_kernel_runs_on_batch_shards():
  q, k, v = _normal(2, *[(8, 128, 2, 72)] * 3)
  _sharded_matches_one_device(lambda q, k, v: flash.flash_attention(q, k, v, interpret=True), [q, k, v])


def test_kernel_lowers_for_cuda_at_dits_head():
  q = jax.ShapeDtypeStruct((2, 256, 16, 72), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda q, k, v: flash.flash_attention(q, k, v, interpret=False)), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, q, q)
  assert "triton" in exported.mlir_module()
  assert exported.out_avals[0].shape == (2, 256, 16, 72)


def test_mha_flash_backend_falls_back_off_gpu():
  x, = _normal(3, (2, 16, 32))
  module = ops.build("mha", 32, num_heads=4, backend="flash")
  params = module.init(jax.random.key(0), x)
  np.testing.assert_allclose(module.apply(params, x), ops.build("mha", 32, num_heads=4, backend="xla").apply(params, x),
                             **TOL)
  with pytest.raises(ValueError, match="attention backend"):
    self_attention(x[:, :, None], x[:, :, None], x[:, :, None], "splash")
