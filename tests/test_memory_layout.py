"""Choices made for memory and layout, not maths: the fused qkv Linear applied as three matmuls equals one Dense,
and remat policies give the gradients of no remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graft_jax.models import DiT, dit_config, init_params
from graft_jax.operators import init

jax.config.update("jax_default_matmul_precision", "highest")


def test_fused_dense_equals_one_dense():
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  fused = init.FusedDense(8, 3, name="qkv")
  params = fused.init(jax.random.key(1), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, params, init.dense(24, "qkv").init(jax.random.key(1), x)))
  whole = init.dense(24, "qkv").apply(params, x)
  np.testing.assert_allclose(jnp.concatenate(fused.apply(params, x), -1), whole, atol=1e-6)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_keeps_gradients(remat):
  cfg = dit_config("DiT-S/2", depth=2, hidden_size=32, num_heads=4, input_size=8)
  params = init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), params)
  x, t, y = jax.random.normal(jax.random.key(2), (2, 8, 8, 4)), jnp.array([3, 500]), jnp.array([1, 2])

  def grads(config):
    return jax.grad(lambda p: jnp.sum(DiT(config).apply({"params": p}, x, t, y) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grads(cfg.replace(remat=remat))), jax.tree.leaves(grads(cfg))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unknown_remat_is_one_sentence():
  with pytest.raises(ValueError, match="model remat 'some' is not one of none, dots, full"):
    dit_config("DiT-S/2", remat="some")
