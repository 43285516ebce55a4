"""Choices made for memory, layout and precision, not maths: a fused Linear applied part by part equals one Dense,
attention's separate q, k, v Linears start as PyTorch's fused one, remat policies give the gradients of no remat,
and bf16 operators keep their backward matmuls in bf16."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import dot_dtypes

from graft_jax import operators
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.operators import init
from graft_jax.operators.matmul import einsum_f32

jax.config.update("jax_default_matmul_precision", "highest")


def test_fused_dense_equals_one_dense():
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  fused = init.FusedDense((8, 8, 8), name="qkv")
  params = fused.init(jax.random.key(1), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, params, init.dense(24, "qkv").init(jax.random.key(1), x)))
  whole = init.dense(24, "qkv").apply(params, x)
  np.testing.assert_allclose(jnp.concatenate(fused.apply(params, x), -1), whole, atol=1e-6)


def test_fused_dense_of_unequal_parts_without_bias_equals_one_dense():
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  fused = init.FusedDense((5, 8, 3), use_bias=False, name="in_proj")
  params = fused.init(jax.random.key(1), x)
  one = init.dense(16, "in_proj", use_bias=False)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, params, one.init(jax.random.key(1), x)))
  parts = fused.apply(params, x)
  assert [p.shape[-1] for p in parts] == [5, 8, 3]
  np.testing.assert_allclose(jnp.concatenate(parts, -1), one.apply(params, x), atol=1e-6)


def test_attention_projections_start_as_one_fused_xavier_matrix():
  """PyTorch initialises DiT's (3D, D) qkv Linear xavier-uniform as one matrix, bound sqrt(6 / (D + 3D)); each of
  the separately stored q, k, v kernels is drawn with that bound (not its own, sqrt(6 / 2D)), biases zero."""
  d = 256
  params = operators.build("mha", d, num_heads=4).init(jax.random.key(0), jnp.zeros((1, 2, d)))["params"]
  bound = np.sqrt(6 / (4 * d))
  for name in "qkv":
    kernel = np.asarray(params[name]["kernel"])
    assert kernel.shape == (d, d) and not params[name]["bias"].any()
    assert bound * 0.99 < np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.01)


def _tiny_dit_loss():
  cfg = dit_config("DiT-S/2", depth=2, hidden_size=32, num_heads=4, input_size=8)
  params = init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), params)
  x, t, y = jax.random.normal(jax.random.key(2), (2, 8, 8, 4)), jnp.array([3, 500]), jnp.array([1, 2])
  return cfg, params, lambda config, p: jnp.sum(DiT(config).apply({"params": p}, x, t, y) ** 2)


@pytest.mark.parametrize("remat", ["elementwise", "elementwise+mlp_in", "elementwise+attn_in+mlp_in", "dots", "full"])
def test_remat_keeps_gradients(remat):
  cfg, params, loss = _tiny_dit_loss()
  grads = lambda config: jax.grad(lambda p: loss(config, p))(params)
  for a, b in zip(jax.tree.leaves(grads(cfg.replace(remat=remat))), jax.tree.leaves(grads(cfg))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_elementwise_remat_saves_between_dots_and_none():
  cfg, params, loss = _tiny_dit_loss()
  # jax.vjp's backward function is a pytree whose leaves are the residuals saved for it.
  saved = {remat: sum(r.size for r in jax.tree.leaves(jax.vjp(lambda p: loss(cfg.replace(remat=remat), p), params)[1]))
           for remat in ("none", "elementwise", "dots")}
  tokens, width = 2 * 16, 32  # batch 2 of a 4 x 4 patch grid
  # Beyond the matmul outputs: each layer's attention output (width), the attention's residual sum (width), GELU
  # output (4 x width) and its two LayerNorms' statistics (mean and reciprocal deviation a token each). q is kept
  # with its bias in place of its matmul's output, so elementwise does not hold q's bias (width) to add it again, as
  # dots does.
  assert saved["elementwise"] - saved["dots"] == cfg.depth * (tokens * (6 * width + 2 * 2) - width)
  assert saved["none"] > 1.5 * saved["elementwise"]


@pytest.mark.parametrize("inputs", [("mlp_in",), ("attn_in",), ("attn_in", "mlp_in")])
def test_elementwise_keeps_the_site_inputs_it_is_given(inputs):
  cfg, params, loss = _tiny_dit_loss()
  saved = lambda remat: sum(r.size for r in jax.tree.leaves(jax.vjp(lambda p: loss(cfg.replace(remat=remat), p),
                                                                    params)[1]))
  tokens, width = 2 * 16, 32
  # Each named site's input (a token's normalised, modulated row) a layer, besides what elementwise keeps.
  assert saved("+".join(("elementwise",) + inputs)) - saved("elementwise") == cfg.depth * len(inputs) * tokens * width


@pytest.mark.parametrize("remat, message", [
    ("some", "model remat 'some' is not one of none, elementwise, dots, full."),
    ("dots+mlp_in", "model remat 'dots+mlp_in': only elementwise takes additions, each once, from attn_in, mlp_in "
                    "(e.g. elementwise+mlp_in)."),
    ("elementwise+mlp", "model remat 'elementwise+mlp': only elementwise takes additions"),
    ("elementwise+mlp_in+mlp_in", "model remat 'elementwise+mlp_in+mlp_in': only elementwise takes additions"),
])
def test_unknown_remat_is_one_sentence(remat, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    dit_config("DiT-S/2", remat=remat)


@pytest.mark.parametrize("name", sorted(set(operators.names()) - {"mha", "mha_kv_compress"}))
def test_bf16_operators_run_every_matmul_in_bf16(name):
  """Forward and backward: float32 cotangents must not push the backward's matmuls to float32 (MHA is left out:
  off GPU it is XLA's attention, whose backward keeps float32 probabilities; on GPU it is cuDNN's)."""
  options = {"num_heads": 4} if "num_heads" in operators.get(name).config() else {}
  module = operators.build(name, 64, **options)
  x = jnp.ones((2, 16, 64), jnp.bfloat16)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), module.init(jax.random.key(0), x.astype(jnp.float32)))
  grad = lambda p, x: jax.grad(lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32)), (0, 1))(p, x)
  assert {dtype for _, dtype in dot_dtypes(jax.make_jaxpr(grad)(params, x))} == {"bfloat16"}


def test_einsum_f32_gradients_match_in_float32():
  a, b = jax.random.normal(jax.random.key(0), (3, 4, 5)), jax.random.normal(jax.random.key(1), (3, 5, 6))
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  ours = jax.grad(loss(lambda a, b: einsum_f32("bij,bjk->bik", a, b)), (0, 1))(a, b)
  plain = jax.grad(loss(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)), (0, 1))(a, b)
  for got, want in zip(ours, plain):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
