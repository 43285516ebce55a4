"""The fused fc1 + GELU Hopper kernel (operators/kernels/dense_gelu.py): it cannot run on a CPU, so these check what
can be checked here. It lowers to Mosaic GPU for the shapes DiT uses; a differentiated MLP that asks for it takes
the XLA forward rule (same gradients, same saved residuals); "auto" stays on XLA off a Hopper GPU. Its numbers on
the H200 are in benchmarks/results (dense_gelu.json)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.config import OpSpec
from graft_jax.operators import build
from graft_jax.operators.kernels import dense_gelu

jax.config.update("jax_default_matmul_precision", "highest")


def test_kernel_lowers_to_mosaic_gpu():
  x = jax.ShapeDtypeStruct((2, 256, 128), jnp.bfloat16)
  w, b = jax.ShapeDtypeStruct((128, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512,), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda x, w, b: dense_gelu.dense_gelu(x, w, b, num_sms=4)), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in ("mosaic_gpu", "mosaic_gpu_v2")],
  )(x, w, b)
  assert "mosaic_gpu" in exported.mlir_module()
  assert exported.out_avals[0].shape == (2, 256, 512)


def _tiny_dit(gelu_kernel: str):
  # Shapes and dtype the kernel takes (tracing it checks them): 2 x 64 tokens, width 64 -> 256, bf16.
  cfg = dit_config("DiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=16, remat="elementwise")
  layers = [layer.__class__(layer.attn, OpSpec.make("mlp", gelu_kernel=gelu_kernel)) for layer in cfg.layers]
  return cfg.replace(layers=tuple(layers))


def test_differentiated_mlp_takes_the_xla_rule():
  cfg = _tiny_dit("xla")
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0)))
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4), jnp.bfloat16)
  t, y = jnp.array([3, 500]), jnp.array([1, 2])
  loss = lambda config: lambda p: jnp.sum(DiT(config).apply({"params": p}, x, t, y).astype(jnp.float32) ** 2)
  xla, fused = (jax.vjp(loss(c), params) for c in (cfg, _tiny_dit("mosaic")))
  assert xla[0] == fused[0]
  # The same residuals, up to the kernel's flattening of tokens (remat "elementwise" keeps the GELU output through
  # `kept`), and the same gradients.
  sizes = lambda vjp: sorted(r.size for r in jax.tree.leaves(vjp))
  assert sizes(xla[1]) == sizes(fused[1])
  for a, b in zip(jax.tree.leaves(xla[1](1.0)), jax.tree.leaves(fused[1](1.0))):
    np.testing.assert_array_equal(a, b)
  # A jitted train step holds no kernel call (it could not compile on this CPU if it did).
  jax.jit(jax.grad(loss(_tiny_dit("mosaic"))))(params)


def test_auto_stays_on_xla_off_a_hopper_gpu():
  assert dense_gelu.fits(65536, 1152, 4608, jnp.bfloat16) and not dense_gelu.fits(65536, 1152, 4608, jnp.float32)
  assert not dense_gelu.fits(128 * 3, 1152, 4608, jnp.bfloat16)  # rows of tiles come in cluster pairs
  assert not dense_gelu.supported(65536, 1152, 4608, jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  mlp = build("mlp", 32, gelu_kernel="auto")
  params = mlp.init(jax.random.key(1), x)
  p = params["params"]["fc1"]
  fc2 = params["params"]["fc2"]
  h = dense_gelu.reference(x, p["kernel"], p["bias"]) @ fc2["kernel"] + fc2["bias"]
  np.testing.assert_allclose(mlp.apply(params, x), h, rtol=1e-6, atol=1e-6)


def test_unknown_gelu_kernel_is_one_sentence():
  mlp = build("mlp", 32, gelu_kernel="triton")
  with pytest.raises(ValueError, match=r"^GELU kernel 'triton' is not one of auto, xla, mosaic\."):
    mlp.init(jax.random.key(0), jnp.zeros((1, 4, 32)))


def test_benchmarks_switch_every_mlp_or_attention():
  from benchmarks.common import with_options  # the benchmarks' --gelu-kernel and --attention
  cfg = with_options(dit_config("DiT-S/2", depth=3), "mlp", "mlp", gelu_kernel="xla")
  assert {layer.mlp.config["gelu_kernel"] for layer in cfg.layers} == {"xla"}
  assert {layer.attn for layer in cfg.layers} == {dit_config("DiT-S/2").layers[0].attn}
  cfg = with_options(cfg, "attn", "mha", backend="cudnn")
  assert {(layer.attn.config["backend"], layer.mlp.config["gelu_kernel"]) for layer in cfg.layers} == {("cudnn", "xla")}


def test_sharded_call_runs_on_each_devices_rows(monkeypatch):
  """Under a sharded jit the kernel call sees one device's rows (here the XLA composition stands in for it, since
  the kernel cannot run on a CPU); a shard whose rows do not fill whole tiles takes the composition itself."""
  from jax.sharding import NamedSharding, PartitionSpec
  from graft_jax.train.partition import BATCH_AXES, make_mesh
  seen = []

  def kernel_call(x, kernel, bias, tiles, num_sms):
    seen.append(x.shape)
    return dense_gelu.reference(x, kernel, bias)
  monkeypatch.setattr(dense_gelu, "_kernel_call", kernel_call)
  mesh = make_mesh({"data": 4, "fsdp": 2})
  rows, whole = NamedSharding(mesh, PartitionSpec(BATCH_AXES)), NamedSharding(mesh, PartitionSpec())
  w = jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (256,), jnp.bfloat16)
  for tokens, calls in ((8 * 256, [(256, 64)]), (8 * 128, [])):  # whole tiles in cluster pairs, or not
    seen.clear()
    x = jax.random.normal(jax.random.key(0), (tokens, 64), jnp.bfloat16)
    fn = jax.jit(lambda x, w, b: dense_gelu.dense_gelu(x, w, b, num_sms=4), in_shardings=(rows, whole, whole))
    assert "all-gather" not in fn.lower(x, w, b).compile().as_text()
    np.testing.assert_array_equal(fn(x, w, b), jax.jit(dense_gelu.reference)(x, w, b))
    # (The whole batch is also traced once, for the op's output shapes.)
    assert [shape for shape in seen if shape[0] < tokens] == calls
