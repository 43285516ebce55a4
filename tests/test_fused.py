"""Hand-written backward passes (operators/fused.py) against autodiff of the plain formulas, and remat policies
against no remat: same values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graft_jax.models import DiT, dit_config, init_params
from graft_jax.operators import init
from graft_jax.operators.fused import gelu_tanh, norm_modulate

jax.config.update("jax_default_matmul_precision", "highest")


def plain_norm_modulate(x, shift, scale):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]


def relative(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("fn, plain, arity", [(norm_modulate, plain_norm_modulate, 3),
                                              (gelu_tanh, lambda x: nn.gelu(x, approximate=True), 1)])
def test_values_and_gradients_match_autodiff(fn, plain, arity):
  keys = jax.random.split(jax.random.key(0), 4)
  args = [3 * jax.random.normal(keys[0], (2, 7, 24)) + 1,
          jax.random.normal(keys[1], (2, 24)), jax.random.normal(keys[2], (2, 24))][:arity]
  out, vjp = jax.vjp(fn, *args)
  want, plain_vjp = jax.vjp(plain, *args)
  assert relative(out, want) < 1e-6
  g = jax.random.normal(keys[3], out.shape)
  for got, exp in zip(vjp(g), plain_vjp(g)):
    assert got.shape == exp.shape and relative(got, exp) < 1e-5


def test_bf16_in_bf16_out():
  x = jnp.ones((1, 3, 8), jnp.bfloat16)
  s = jnp.zeros((1, 8), jnp.bfloat16)
  out, vjp = jax.vjp(norm_modulate, x, s, s)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in vjp(out))
  assert gelu_tanh(x).dtype == jnp.bfloat16


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
