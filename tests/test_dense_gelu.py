"""The MLP's GELU kernels (operators/kernels/dense_gelu.py): they cannot run on a CPU, so these check what can be
checked here. They lower to Mosaic GPU for the shapes DiT uses; the MLP's custom VJP, on XLA's compositions, gives
autodiff's gradients; a differentiated DiT takes the train kernels and keeps the residuals XLA's path keeps; "auto"
stays on XLA off a Hopper GPU. Their numbers on the H200 are in benchmarks/results (dense_gelu.json)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import export_for_cuda

from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.config import OpSpec
from graft_jax.operators import build
from graft_jax.operators.kernels import dense_gelu

jax.config.update("jax_default_matmul_precision", "highest")


def test_kernels_lower_to_mosaic_gpu():
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  x, w1, b1, w2, b2 = bf16(2, 256, 128), bf16(128, 512), bf16(512), bf16(512, 128), bf16(128)
  mlp = lambda *a: dense_gelu.mlp(*a, num_sms=4)
  forward = export_for_cuda(mlp, x, w1, b1, w2, b2)
  assert forward.mlir_module().count("mosaic_gpu") >= 1 and forward.out_avals[0].shape == (2, 256, 128)
  # A train step's MLP: the forward kernel that also writes the GELU's derivative, and the product kernel.
  loss = lambda *a: jnp.sum(mlp(*a).astype(jnp.float32))
  train = export_for_cuda(jax.grad(loss, argnums=range(5)), x, w1, b1, w2, b2)
  assert [a.shape for a in train.out_avals] == [(2, 256, 128), (128, 512), (512,), (512, 128), (128,)]
  assert train.mlir_module().count("mosaic_gpu") >= 2


def _record_kernel_calls(monkeypatch):
  """The kernels cannot run on a CPU: their calls take the XLA composition, named for the epilogue (the name stays
  in compiled HLO's metadata), and the calls traced are listed."""
  calls = []

  def kernel_call(lhs, rhs, side, tiles, num_sms, epilogue):
    calls.append((epilogue, lhs.shape))
    with jax.named_scope(f"kernel_{epilogue}"):
      return dense_gelu._reference_call(lhs, rhs, side, epilogue)
  monkeypatch.setattr(dense_gelu, "_kernel_call", kernel_call)
  return calls


def test_custom_vjp_matches_autodiff():
  """float32 (no kernel fits; the same custom VJP with its XLA composition): values and every gradient."""
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (2, 8, 16))
  weights = [jax.random.normal(k, shape) * 0.5 for k, shape in zip(ks[1:], ((16, 64), (64,), (64, 16), (16,)))]
  dy = jax.random.normal(ks[5], (2, 8, 16))
  composition = lambda x, w1, b1, w2, b2: jax.nn.gelu(x @ w1 + b1, approximate=True) @ w2 + b2
  want, want_vjp = jax.vjp(composition, x, *weights)
  got, got_vjp = jax.vjp(dense_gelu.mlp, x, *weights)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for g, w in zip(got_vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_product_and_its_column_sums():
  """The backward's product reads the weight as stored, (n, k), and sums each tile's rows of the float32 product
  (before rounding: the bias gradient is their sum); 300 rows end in a part tile, padded."""
  ks = jax.random.split(jax.random.key(0), 3)
  dy = jax.random.normal(ks[0], (300, 32))
  w = jax.random.normal(ks[1], (48, 32))
  derivative = jax.random.normal(ks[2], (300, 48))
  product, sums = dense_gelu.matmul_epilogue(dy, w, derivative, "times_derivative")
  want = (dy @ w.T) * derivative
  np.testing.assert_allclose(product, want, rtol=1e-6, atol=1e-6)
  assert sums.shape == (3, 48)
  for tile, rows in enumerate((slice(0, 128), slice(128, 256), slice(256, 300))):
    np.testing.assert_allclose(sums[tile], want[rows].sum(axis=0), rtol=1e-5, atol=1e-5)


def test_gelu_and_its_derivative():
  u = jnp.linspace(-6, 6, 97)
  gelu, derivative = dense_gelu.gelu_and_derivative(u)
  np.testing.assert_allclose(gelu, jax.nn.gelu(u, approximate=True), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(derivative, jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(u),
                             rtol=1e-6, atol=1e-6)  # the tails: 1 + tanh cancels in float32


def _tiny_dit(gelu_kernel: str):
  # Shapes and dtype the kernels take (tracing them checks that): 4 x 64 tokens, width 64 -> 256, bf16.
  cfg = dit_config("DiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=16, remat="elementwise")
  layers = [layer.__class__(layer.attn, OpSpec.make("mlp", gelu_kernel=gelu_kernel)) for layer in cfg.layers]
  return cfg.replace(layers=tuple(layers))


def test_differentiated_mlp_takes_the_kernels_and_keeps_what_xla_keeps(monkeypatch):
  calls = _record_kernel_calls(monkeypatch)
  cfg = _tiny_dit("xla")
  params = init_params(cfg, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts every gate at zero: perturb every weight
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [(p + 0.1 * jax.random.normal(k, p.shape)).astype(jnp.bfloat16)
                                     for p, k in zip(leaves, keys)])
  x = jax.random.normal(jax.random.key(2), (4, 16, 16, 4), jnp.bfloat16)
  t, y = jnp.array([3, 500, 20, 999]), jnp.array([1, 2, 3, 4])
  loss = lambda config: lambda p: jnp.sum(DiT(config).apply({"params": p}, x, t, y).astype(jnp.float32) ** 2)
  xla, fused = (jax.vjp(loss(c), params) for c in (cfg, _tiny_dit("mosaic")))
  np.testing.assert_allclose(fused[0], xla[0], rtol=1e-2)
  # remat "elementwise" keeps the same residuals (up to the kernels' flattening of tokens: the GELU's derivative
  # for fc1's matmul output, the GELU, fc2's matmul output), less fc1's bias (256 wide, one a layer), which XLA's
  # rule holds.
  sizes = lambda vjp: sorted(r.size for r in jax.tree.leaves(vjp))
  assert sizes(xla[1]) == sorted(sizes(fused[1]) + [256] * 2)
  (grads,) = fused[1](1.0)
  assert {("gelu_and_derivative", (256, 64)), ("times_derivative", (256, 64))} <= set(calls)
  # What runs: a train step's compiled program holds the forward that also writes the derivative and the product
  # kernel, a forward's only the GELU kernel.
  def ran(fn, *args):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return {epilogue for epilogue in dense_gelu.EPILOGUES if f"kernel_{epilogue}/" in hlo}
  assert ran(jax.grad(loss(_tiny_dit("mosaic"))), params) == {"gelu_and_derivative", "times_derivative"}
  assert ran(lambda p: DiT(_tiny_dit("mosaic")).apply({"params": p}, x, t, y), params) == {"gelu"}
  # The gradients agree within bf16 rounding (the product is taken before rounding fc2's input gradient), and the
  # MLPs' are not zero: the gates are live.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(xla[1](1.0))):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()  # 1.4% at most here: a few bf16 ulps
    assert "mlp" not in jax.tree_util.keystr(path) or np.abs(b).max() > 0


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
  """Under a sharded jit the kernel calls see one device's rows (here the XLA composition stands in for the kernels,
  since they cannot run on a CPU); a shard whose rows do not fill whole tiles takes the composition itself."""
  from jax.sharding import NamedSharding, PartitionSpec
  from graft_jax.train.partition import BATCH_AXES, make_mesh
  seen = _record_kernel_calls(monkeypatch)
  reference = jax.jit(dense_gelu._reference_call, static_argnums=3)
  mesh = make_mesh({"data": 4, "fsdp": 2})
  rows, whole = NamedSharding(mesh, PartitionSpec(BATCH_AXES)), NamedSharding(mesh, PartitionSpec())
  w = jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (256,), jnp.bfloat16)
  for tokens, calls in ((8 * 256, [(256, 64)]), (8 * 128, [])):  # whole tiles in cluster pairs, or not
    x = jax.random.normal(jax.random.key(0), (tokens, 64), jnp.bfloat16)
    u = jax.random.normal(jax.random.key(3), (tokens, 256), jnp.bfloat16)
    # The product's weight comes as stored, (n, k).
    for epilogue, weight, side, side_sharding in (("gelu", w, b, whole), ("times_derivative", w.T, u, rows)):
      seen.clear()
      fn = jax.jit(lambda x, w, side: dense_gelu.matmul_epilogue(x, w, side, epilogue, num_sms=4),
                   in_shardings=(rows, whole, side_sharding))
      assert "all-gather" not in fn.lower(x, weight, side).compile().as_text()
      # Every result, the product's column sums of each tile's rows included, is each device's rows' own.
      for got, want in zip(fn(x, weight, side), reference(x, weight, side, epilogue)):
        np.testing.assert_array_equal(got, want)
      # (The whole batch is also traced once, for the op's output shapes.)
      assert [shape for _, shape in seen if shape[0] < tokens] == calls
  # One row of column sums a tile of 128 rows: 8 x 64 rows do not make 8 devices' whole tiles, so every device
  # runs the whole batch (correct, not fast).
  x = jax.random.normal(jax.random.key(0), (8 * 64, 64), jnp.bfloat16)
  u = jax.random.normal(jax.random.key(3), (8 * 64, 256), jnp.bfloat16)
  fn = jax.jit(lambda x, w, u: dense_gelu.matmul_epilogue(x, w, u, "times_derivative"), in_shardings=(rows, whole, rows))
  for got, want in zip(fn(x, w.T, u), reference(x, w.T, u, "times_derivative")):
    np.testing.assert_array_equal(got, want)
