"""Pallas kernels (TPU splash attention for SWA and MHA, the Hyena causal conv) in Pallas interpret mode on CPU,
against the XLA paths the operators use elsewhere: forward and gradients within 1e-5 in float32; which backend
"auto" picks; and that under a sharded jit the causal conv, SSD and splash kernels run on each device's batch
shard.

Interpret mode runs the kernels op by op in Python: the shapes here are the smallest that still cover several blocks,
padding and the halo between tiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jaxprs import export_for_cuda

from graft_jax import operators as ops
from graft_jax.operators.attention import SPLASH_FROM_TOKENS, mha_backend, swa_backend, tiled_band_attention
from graft_jax.operators.hyena import causal_depthwise_conv, conv_backend
from graft_jax.operators.kernels.causal_conv import causal_conv_pallas
from graft_jax.operators.kernels.ssd import ssd_diagonal_pallas
from graft_jax.operators.kernels.splash import splash_attention
from graft_jax.train.partition import BATCH_AXES, make_mesh

TOL = dict(atol=1e-5, rtol=1e-5)


def _normal(seed, *shapes):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


def _grads(fn, *args):
  """Gradients of a scalar that weighs every output element differently (sin keeps them non-uniform)."""
  return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)


def test_splash_matches_tiled_forward_and_gradients():
  # 200 tokens: two 128-blocks, the second half padding, so the padding segment and block skipping both run.
  q, k, v = _normal(0, *[(1, 200, 2, 8)] * 3)
  splash = lambda q, k, v: splash_attention(q, k, v, 4, interpret=True)
  tiled = lambda q, k, v: tiled_band_attention(q, k, v, 4)
  np.testing.assert_allclose(splash(q, k, v), tiled(q, k, v), **TOL)
  for got, want in zip(_grads(splash, q, k, v), _grads(tiled, q, k, v)):
    np.testing.assert_allclose(got, want, **TOL)


def test_swa_module_splash_backend_matches_tiled():
  x, = _normal(1, (2, 130, 16))
  tiled = ops.build("swa", 16, num_heads=2, window=3, backend="tiled")
  params = tiled.init(jax.random.key(0), x)
  splash = ops.build("swa", 16, num_heads=2, window=3, backend="splash")  # off TPU: interpret mode
  np.testing.assert_allclose(splash.apply(params, x), tiled.apply(params, x), **TOL)


def test_mha_module_splash_backend_matches_xla_forward_and_gradients():
  # 200 tokens: two 128-blocks, the second partly padding (a segment of its own, so no query sees it).
  x, = _normal(4, (2, 200, 16))
  xla = ops.build("mha", 16, num_heads=2, backend="xla")
  params = xla.init(jax.random.key(0), x)
  splash = ops.build("mha", 16, num_heads=2, backend="splash")  # off TPU: interpret mode
  np.testing.assert_allclose(splash.apply(params, x), xla.apply(params, x), **TOL)
  grads = [jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(params, x) for m in (splash, xla)]
  for got, want in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("shape,taps,tile", [((2, 37, 6), 4, 16), ((1, 30, 3), 11, 16)])
def test_causal_conv_kernel_matches_xla(shape, taps, tile):
  """Several token tiles (the halo carries K-1 rows across) and a halo wider than 8 rows."""
  x, w, b = _normal(2, shape, (taps, shape[-1]), (shape[-1],))
  pallas = lambda x, w, b: causal_conv_pallas(x, w, b, interpret=True, token_tile=tile)
  np.testing.assert_allclose(pallas(x, w, b), causal_depthwise_conv(x, w, b), **TOL)
  for got, want in zip(_grads(pallas, x, w, b), _grads(causal_depthwise_conv, x, w, b)):
    np.testing.assert_allclose(got, want, **TOL)


def test_hyena_pallas_backend_matches_xla():
  """Hyena-Y's inner filter through the kernel; K=1 leaves the kernel without a halo."""
  x, = _normal(3, (1, 16, 8))
  xla = ops.build("hyena_y", 8, kernel_size=1, backend="xla")
  params = xla.init(jax.random.key(0), x)
  pallas = ops.build("hyena_y", 8, kernel_size=1, backend="pallas")
  np.testing.assert_allclose(pallas.apply(params, x), xla.apply(params, x), **TOL)


def test_auto_backends(monkeypatch):
  assert (swa_backend("auto", None), swa_backend("auto", (4, 4)), conv_backend("auto", 1)) == ("tiled", "shift", "xla")
  long, short = (2, SPLASH_FROM_TOKENS, 16, 72), (256, 256, 16, 72)
  assert mha_backend("auto", long, jnp.bfloat16) == "xla"  # CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert (swa_backend("auto", None), swa_backend("auto", (4, 4))) == ("splash", "shift")
  assert (mha_backend("auto", long, jnp.bfloat16), mha_backend("auto", short, jnp.bfloat16)) == ("splash", "xla")
  assert (conv_backend("auto", 1), conv_backend("auto", 2), conv_backend("xla", 1)) == ("pallas", "xla", "xla")


def test_backend_errors():
  with pytest.raises(ValueError, match="tokens"):
    conv_backend("pallas", 2)
  with pytest.raises(ValueError, match="must be one of"):
    conv_backend("cuda", 1)
  x = jnp.zeros((1, 16, 8))
  with pytest.raises(ValueError, match="1-D"):
    ops.build("swa", 8, num_heads=2, grid=(4, 4), backend="splash").init(jax.random.key(0), x)


def _sharded_matches_one_device(fn, batched, weights=()):
  """fn's value and gradients with `batched` split over 8 devices (mesh 4 x 2) against one jit without shardings;
  the per-device program must hold no gather and no whole-batch copy of the first operand."""
  mesh = make_mesh({"data": 4, "fsdp": 2})
  split, whole = NamedSharding(mesh, PartitionSpec(BATCH_AXES)), NamedSharding(mesh, PartitionSpec())
  args = (*batched, *weights)
  value_and_grads = lambda *a: (fn(*a), _grads(fn, *a))
  sharded = jax.jit(value_and_grads, in_shardings=(split,) * len(batched) + (whole,) * len(weights))
  hlo = sharded.lower(*args).compile().as_text()
  assert "all-gather" not in hlo
  assert f"f32[{','.join(map(str, batched[0].shape))}]" not in hlo
  for got, want in zip(jax.tree.leaves(sharded(*args)), jax.tree.leaves(jax.jit(value_and_grads)(*args))):
    np.testing.assert_allclose(got, want, **TOL)


def test_causal_conv_kernel_runs_on_batch_shards():
  x, w, b = _normal(5, (8, 24, 16), (4, 16), (16,))
  _sharded_matches_one_device(lambda x, w, b: causal_conv_pallas(x, w, b, interpret=True, token_tile=8), [x], [w, b])


def test_ssd_kernel_runs_on_batch_shards():
  C, B, xdt = _normal(6, (8, 2, 16, 16), (8, 2, 16, 16), (8, 2, 16, 4, 16))
  a = jnp.cumsum(-0.1 * jnp.abs(_normal(7, (8, 2, 16, 4))[0]), axis=2)
  _sharded_matches_one_device(lambda *args: ssd_diagonal_pallas(*args, interpret=True), [C, B, a, xdt])


def test_ssd_kernel_lowers_for_cuda_at_dit_mamba2s_shape():
  # Pallas lowers both kernels to Triton's IR here (an op without a Triton rule fails; Triton itself compiles on a
  # GPU): DiT-XL/2's Mamba-2 at 256 tokens is 4 chunks of 64, state 64 and 144 heads of 16, in head blocks of 16.
  chunk, a = jax.ShapeDtypeStruct((2, 4, 64, 64), jnp.bfloat16), jax.ShapeDtypeStruct((2, 4, 64, 144), jnp.float32)
  xdt = jax.ShapeDtypeStruct((2, 4, 64, 144, 16), jnp.bfloat16)
  fused = lambda *args: ssd_diagonal_pallas(*args, interpret=False)
  value_and_grads = jax.value_and_grad(lambda *b: jnp.sum(fused(*b)), argnums=(0, 1, 2, 3))
  exported = export_for_cuda(value_and_grads, chunk, chunk, a, xdt)
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2  # the forward, the backward
  assert [x.shape for x in exported.out_avals[1:]] == [(2, 4, 64, 64)] * 2 + [(2, 4, 64, 144), (2, 4, 64, 144, 16)]


def test_splash_runs_on_batch_shards():
  # 130 tokens: a padded second block, so the padding segment ids travel with each shard too.
  q, k, v = _normal(8, *[(8, 130, 2, 8)] * 3)
  _sharded_matches_one_device(lambda q, k, v: splash_attention(q, k, v, 3, interpret=True), [q, k, v])
