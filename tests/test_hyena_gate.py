"""Hyena-X's fused conv + gate kernel (kernels/hyena_gate.py): its values in Pallas interpret mode against the XLA
composition (1e-5 in float32), that a differentiated call takes the composition's gradients, that it runs on batch
shards under a sharded jit, that it lowers for CUDA at PixArt's 2048 px shape, and that Hyena-X's backend picks it.
Its speed is the H200's to measure (benchmarks/hyena_gate.py, operators.py and pixart.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import export_for_cuda
from test_kernels import _grads, _normal, _sharded_matches_one_device

from graft_jax import operators as ops
from graft_jax.operators.hyena import conv_backend, gated_conv_xla
from graft_jax.operators.kernels import hyena_gate

TOL = dict(atol=1e-5, rtol=1e-5)


def _kernel(u, w, b):
  return hyena_gate.gated_conv(u, w, b, gated_conv_xla, interpret=True)


@pytest.mark.parametrize("taps", [4, 1, 17])
def test_kernel_matches_the_xla_composition(taps):
  # Three tiles of tokens (the first from XLA), two of channels a part; 17 taps reach back half a tile.
  u, w, b = _normal(taps, (2, 96, 3 * 256), (taps, 3 * 256), (3 * 256,))
  w = w / np.sqrt(taps)  # conv outputs of unit scale, as a trained filter's are
  np.testing.assert_allclose(_kernel(u, w, b), gated_conv_xla(u, w, b), **TOL)


def test_differentiated_call_takes_the_xla_composition():
  u, w, b = _normal(1, (1, 64, 3 * 128), (4, 3 * 128), (3 * 128,))
  for got, want in zip(_grads(_kernel, u, w, b), _grads(gated_conv_xla, u, w, b)):
    np.testing.assert_array_equal(got, want)


def test_kernel_runs_on_batch_shards():
  u, w, b = _normal(2, (8, 64, 3 * 128), (4, 3 * 128), (3 * 128,))
  _sharded_matches_one_device(_kernel, [u], [w, b])


def test_kernel_lowers_for_cuda_at_pixarts_2048px_shape():
  u = jax.ShapeDtypeStruct((2, 16384, 3 * 1152), jnp.bfloat16)
  w, b = jax.ShapeDtypeStruct((4, 3 * 1152), jnp.bfloat16), jax.ShapeDtypeStruct((3 * 1152,), jnp.bfloat16)
  exported = export_for_cuda(lambda u, w, b: hyena_gate.gated_conv(u, w, b, gated_conv_xla, interpret=False), u, w, b)
  assert "triton" in exported.mlir_module()
  assert exported.out_avals[0].shape == (2, 16384, 1152)


def test_tiles_that_do_not_fit_are_refused():
  assert hyena_gate.fits(16384, 3 * 1152, 4) and hyena_gate.fits(256, 3 * 1152, 4)
  assert not hyena_gate.fits(32, 3 * 128, 4)  # one tile of tokens: all of it would be XLA's
  assert not hyena_gate.fits(100, 3 * 128, 4) and not hyena_gate.fits(64, 3 * 96, 4)
  assert not hyena_gate.supported(16384, 3 * 1152, 4)  # not on a GPU


def test_hyena_x_backends():
  x, = _normal(3, (2, 64, 128))
  xla = ops.build("hyena_x", 128, backend="xla")
  params = xla.init(jax.random.key(0), x)
  triton = ops.build("hyena_x", 128, backend="triton")  # off GPU: interpret mode
  np.testing.assert_allclose(triton.apply(params, x), xla.apply(params, x), **TOL)
  # Shapes the kernel does not take run the composition under any backend.
  np.testing.assert_allclose(triton.apply(params, x[:, :20]), xla.apply(params, x[:, :20]), **TOL)
  pallas = ops.build("hyena_x", 128, backend="pallas")  # TPU's conv kernel, then the gate
  np.testing.assert_allclose(pallas.apply(params, x), xla.apply(params, x), **TOL)


def test_auto_picks_the_kernel_on_gpu_for_hyena_x_only(monkeypatch):
  assert conv_backend("auto", 1, gated=True) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert (conv_backend("auto", 1, gated=True), conv_backend("auto", 1), conv_backend("auto", 2)) == (
      "triton", "xla", "xla")
  with pytest.raises(ValueError, match="no gate"):
    conv_backend("triton", 1)
  with pytest.raises(ValueError, match="no gate"):
    ops.build("hyena_y", 8, backend="triton").init(jax.random.key(0), jnp.zeros((1, 8, 8)))
