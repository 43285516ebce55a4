"""The LayerNorm + adaLN modulation kernels (kernels/norm_modulate.py) in Pallas interpret mode against the XLA
composition (models.dit.norm_modulate): forward and backward within 1e-5 in float32; the forward equal in bfloat16
to the composition run op by op (which rounds each op, as the kernel does; compiled, XLA may keep intermediates in
float32), the backward within bfloat16 rounding of float32 gradients; remat keeps the same residuals; they run on
batch shards; they lower for CUDA at DiT-XL/2's shape; and DiT's blocks take them for both norms (undifferentiated,
the attention's norm stays on XLA), when the dtypes agree. Their speed is the H200's to measure
(benchmarks/dit.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from jaxprs import export_for_cuda
from test_kernels import TOL, _grads, _normal, _sharded_matches_one_device

from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.dit import fused_norm_modulate, norm_modulate
from graft_jax.operators.kernels import norm_modulate as norm_kernel
from graft_jax.operators.remat import policy


def _kernel(x, shift, scale):
  return norm_kernel.norm_modulate(x, shift, scale, norm_modulate, interpret=True)[0]


def _with_residual(norm):
  """A block's use: the normalised rows go on (sin weighs them), and so does x, to the residual stream (cos)."""
  def fn(x, shift, scale):
    y, x = norm(x, shift, scale)
    return jnp.sin(y) + jnp.cos(3 * x)
  return fn


def _composition_with_residual(x, shift, scale):
  return norm_modulate(x, shift, scale), x


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


def test_backward_matches_the_compositions_gradients_in_float32():
  # 3 x 8 rows a sample: the backward walks 1 block of rows a program (gcd(3, BACKWARD_STEPS)); 16 x 8: 8 blocks.
  for seed, tokens in ((2, 3 * norm_kernel.BLOCK_T), (7, 16 * norm_kernel.BLOCK_T)):
    args = _operands(seed, 2, tokens, 2 * norm_kernel.CHUNK)
    for got, want in zip(_grads(_kernel, *args), _grads(norm_modulate, *args)):
      np.testing.assert_allclose(got, want, **TOL)


def test_the_residual_streams_gradient_joins_in_the_backward_kernel():
  """x's gradient from the residual stream (through the x that comes back) is added inside the backward kernel."""
  kernel = _with_residual(lambda *a: norm_kernel.norm_modulate(*a, norm_modulate, interpret=True))
  args = _operands(11, 2, 4 * norm_kernel.BLOCK_T, 2 * norm_kernel.CHUNK)
  for got, want in zip(_grads(kernel, *args), _grads(_with_residual(_composition_with_residual), *args)):
    np.testing.assert_allclose(got, want, **TOL)
  # In bf16 the kernel adds the two in float32 and rounds once: within the composition's bf16 error.
  exact = _grads(_with_residual(_composition_with_residual), *args)
  args = [a.astype(jnp.bfloat16) for a in args]
  for g, c, e in zip(_grads(kernel, *args), _grads(_with_residual(_composition_with_residual), *args), exact):
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
    assert err(g) <= err(c) + 2 ** -8


def test_backward_in_bfloat16_is_within_its_rounding():
  args = _operands(8, 2, 4 * norm_kernel.BLOCK_T, 2 * norm_kernel.CHUNK)
  exact = _grads(norm_modulate, *args)
  got = _grads(_kernel, *[a.astype(jnp.bfloat16) for a in args])
  composed = _grads(norm_modulate, *[a.astype(jnp.bfloat16) for a in args])
  for g, c, e in zip(got, composed, exact):
    assert g.dtype == jnp.bfloat16
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
    # Against float32 gradients the kernel errs no more than the composition run in bf16 (x's gradient: 5% of its
    # largest for both, from the inputs' rounding; the kernel sums shift's and scale's gradients in float32).
    assert err(g) <= err(c) + 2 ** -8


def test_remat_saves_what_it_saves_for_the_composition():
  """Under the elementwise policy both paths keep the same residuals: the inputs, the next matmul's operands and
  each row's two statistics (`kept`); the kernel's normalised output is recomputed, as the composition's is."""
  x, shift, scale, w = *_operands(9, 2, norm_kernel.BLOCK_T, norm_kernel.CHUNK), _normal(10, (norm_kernel.CHUNK, 8))[0]
  saved = lambda norm: sorted(r.size for r in jax.tree.leaves(jax.vjp(
      jax.checkpoint(lambda *a: norm(*a[:3]) @ a[3], policy=policy("elementwise")), x, shift, scale, w)[1]))
  assert saved(_kernel) == saved(norm_modulate)
  assert saved(norm_modulate).count(2 * norm_kernel.BLOCK_T) == 2  # mean and 1 / deviation, a token each


def test_kernel_runs_on_batch_shards():
  _sharded_matches_one_device(_kernel, list(_operands(3, 8, norm_kernel.BLOCK_T, norm_kernel.CHUNK)))


def test_kernels_lower_for_cuda_at_dit_xl2s_shape():
  rows, sample = jax.ShapeDtypeStruct((256, 256, 1152), jnp.bfloat16), jax.ShapeDtypeStruct((256, 1152), jnp.bfloat16)
  fused = lambda *a: norm_kernel.norm_modulate(*a, norm_modulate, interpret=False)[0]
  export = lambda fn: export_for_cuda(fn, rows, sample, sample)
  forward = export(fused)
  assert "triton" in forward.mlir_module()
  assert forward.out_avals[0].shape == (256, 256, 1152)
  backward = export(lambda *a: jax.grad(lambda *b: jnp.sum(fused(*b).astype(jnp.float32)), argnums=(0, 1, 2))(*a))
  assert backward.mlir_module().count("__gpu$xla.gpu.triton") == 2  # the forward with statistics, the backward
  assert [a.shape for a in backward.out_avals] == [(256, 256, 1152), (256, 1152), (256, 1152)]


def test_rows_that_do_not_fit_are_refused():
  assert norm_kernel.fits(256, 1152) and norm_kernel.fits(16384, 1152)
  assert not norm_kernel.fits(250, 1152) and not norm_kernel.fits(256, 1000)
  assert not norm_kernel.supported(256, 1152)  # not on a GPU


def test_dit_takes_the_kernels_for_both_norms(monkeypatch):
  """Undifferentiated, only the MLP's norm runs the kernel (the attention's asks for the kernels but keeps XLA's
  forward); a differentiated call runs them for both. Outputs, sown activations and gradients match XLA's path."""
  config = dit_config("DiT-S/2", depth=2, hidden_size=norm_kernel.CHUNK, num_heads=2, input_size=8, num_classes=10)
  params = init_params(config, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts every gate at zero: randomise everything
  params = jax.tree.unflatten(tree, [0.1 * v for v in _normal(4, *[leaf.shape for leaf in leaves])])
  x, = _normal(5, (2, 8, 8, 4))
  t, y = jnp.array([3, 900]), jnp.array([1, 7])
  apply = lambda p: DiT(config).apply({"params": p}, x, t, y, mutable=["intermediates"])
  loss = lambda p: jnp.sum(jnp.sin(apply(p)[0]))
  want, want_sown = apply(params)
  want_grads = jax.grad(loss)(params)
  calls, forwards = [], []
  monkeypatch.setattr(norm_kernel, "supported", lambda *shape: calls.append(shape) or norm_kernel.fits(*shape))
  forward = norm_kernel._forward
  monkeypatch.setattr(norm_kernel, "_forward", lambda *a, **k: forwards.append(k.get("stats", False)) or forward(*a, **k))
  got, got_sown = apply(params)  # off GPU: interpret mode
  assert calls == [(16, norm_kernel.CHUNK)] * 4 and forwards == [False] * 2  # two norms a block, one kernel forward
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(jax.tree.leaves(got_sown), jax.tree.leaves(want_sown)):
    np.testing.assert_allclose(g, w, **TOL)
  forwards.clear()
  for g, w in zip(jax.tree.leaves(jax.grad(loss)(params)), jax.tree.leaves(want_grads)):
    # Sums over tokens in another order: 1e-5 of each gradient's largest.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
  assert forwards == [True] * 4


def test_mixed_dtypes_stay_on_the_composition(monkeypatch):
  monkeypatch.setattr(norm_kernel, "supported", norm_kernel.fits)
  x, shift, scale = _operands(6, 1, norm_kernel.BLOCK_T, norm_kernel.CHUNK)
  got, _ = fused_norm_modulate(x.astype(jnp.bfloat16), shift, scale, stored=True)  # float32 modulation promotes
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, norm_modulate(x.astype(jnp.bfloat16), shift, scale))
