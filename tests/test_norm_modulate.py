"""The LayerNorm + adaLN modulation kernel (kernels/norm_modulate.py) in Pallas interpret mode against the XLA
composition (models.dit.norm_modulate): 1e-5 in float32, equal in bfloat16 to the composition run op by op (which
rounds each op, as the kernel does; compiled, XLA may keep intermediates in float32); a differentiated call takes
the composition's gradients; it runs on batch shards; it lowers for CUDA at DiT-XL/2's shape; and DiT's blocks take
it for the MLP's norm alone, when its dtypes agree. Its speed is the H200's to measure (benchmarks/dit.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from test_kernels import TOL, _grads, _normal, _sharded_matches_one_device

from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.dit import norm_modulate, stored_norm_modulate
from graft_jax.operators.kernels import norm_modulate as norm_kernel


def _kernel(x, shift, scale):
  return norm_kernel.norm_modulate(x, shift, scale, norm_modulate, interpret=True)


def _operands(seed, batch, tokens, width):
  x, shift, scale = _normal(seed, (batch, tokens, width), (batch, width), (batch, width))
  return x + 0.5, shift, scale  # rows with a mean, as a residual stream's are


def test_kernel_matches_the_composition_in_float32():
  args = _operands(0, 2, 3 * norm_kernel.BLOCK_T, 2 * norm_kernel.CHUNK)  # three programs a sample, two chunks
  np.testing.assert_allclose(_kernel(*args), norm_modulate(*args), **TOL)


def test_kernel_rounds_as_the_composition_in_bfloat16():
  args = [a.astype(jnp.bfloat16) for a in _operands(1, 2, 2 * norm_kernel.BLOCK_T, norm_kernel.CHUNK)]
  got = _kernel(*args)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(norm_modulate(*args), np.float32))


def test_differentiated_call_takes_the_compositions_gradients():
  args = _operands(2, 1, norm_kernel.BLOCK_T, norm_kernel.CHUNK)
  for got, want in zip(_grads(_kernel, *args), _grads(norm_modulate, *args)):
    np.testing.assert_array_equal(got, want)


def test_kernel_runs_on_batch_shards():
  _sharded_matches_one_device(_kernel, list(_operands(3, 8, norm_kernel.BLOCK_T, norm_kernel.CHUNK)))


def test_kernel_lowers_for_cuda_at_dit_xl2s_shape():
  rows, sample = jax.ShapeDtypeStruct((256, 256, 1152), jnp.bfloat16), jax.ShapeDtypeStruct((256, 1152), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda *a: norm_kernel.norm_modulate(*a, norm_modulate, interpret=False)), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(rows, sample, sample)
  assert "triton" in exported.mlir_module()
  assert exported.out_avals[0].shape == (256, 256, 1152)


def test_rows_that_do_not_fit_are_refused():
  assert norm_kernel.fits(256, 1152) and norm_kernel.fits(16384, 1152)
  assert not norm_kernel.fits(250, 1152) and not norm_kernel.fits(256, 1000)
  assert not norm_kernel.supported(256, 1152)  # not on a GPU


def test_dit_takes_the_kernel_for_the_mlps_norm_only(monkeypatch):
  config = dit_config("DiT-S/2", depth=2, hidden_size=norm_kernel.CHUNK, num_heads=2, input_size=8, num_classes=10)
  params = init_params(config, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts every gate at zero: randomise everything
  params = jax.tree.unflatten(tree, [0.1 * v for v in _normal(4, *[leaf.shape for leaf in leaves])])
  x, = _normal(5, (2, 8, 8, 4))
  t, y = jnp.array([3, 900]), jnp.array([1, 7])
  apply = lambda: DiT(config).apply({"params": params}, x, t, y, mutable=["intermediates"])
  want, want_sown = apply()
  calls = []
  monkeypatch.setattr(norm_kernel, "supported", lambda *shape: calls.append(shape) or norm_kernel.fits(*shape))
  got, got_sown = apply()  # off GPU: interpret mode
  assert calls == [(16, norm_kernel.CHUNK)] * 2  # one a block: the MLP's norm
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(jax.tree.leaves(got_sown), jax.tree.leaves(want_sown)):
    np.testing.assert_allclose(g, w, **TOL)


def test_mixed_dtypes_stay_on_the_composition(monkeypatch):
  monkeypatch.setattr(norm_kernel, "supported", norm_kernel.fits)
  x, shift, scale = _operands(6, 1, norm_kernel.BLOCK_T, norm_kernel.CHUNK)
  got = stored_norm_modulate(x.astype(jnp.bfloat16), shift, scale)  # float32 modulation promotes
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, norm_modulate(x.astype(jnp.bfloat16), shift, scale))
