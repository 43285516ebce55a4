"""The Hopper self-attention kernel (operators/kernels/hopper_attention.py) and its backward kernels
(hopper_attention_grad.py) behind MHA's backend "mosaic": they cannot run on a CPU, so these check what can be
checked here. MHA lowers to the forward at DiT's head width, and a differentiated "mosaic" MHA to the forward with
its log-sum-exp and the two backward kernels, with remat keeping what they read; the kernel's windows (16-channel-
aligned boxes over heads of 72 laid back to back, the neighbour's channels zeroed) hold each head and its q bias at
its offset; its persistent programs take every work item once; where MHA does not train on the backward kernels,
differentiated calls take the cuDNN/XLA composition's values and gradients exactly; where the kernel does not take
the shapes, the reference runs, also on batch shards under a sharded jit; "auto" picks the forward kernel only
where it beat cuDNN on the H200, and trains on the backward kernels where they did. Their numerics and speed are
the H200's to measure (benchmarks/hopper_attention.py, benchmarks/hopper_attention_grad.py: errors against a
float32 evaluation, time against cuDNN)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import export_for_cuda
from test_kernels import _sharded_matches_one_device

from graft_jax import operators as ops
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.config import OpSpec
from graft_jax.operators import attention
from graft_jax.operators.attention import project_heads, project_packed, softmax_attention
from graft_jax.operators.kernels import hopper_attention, hopper_attention_grad

HEADS, HEAD_DIM = 2, 72


def _mha(backend: str, tokens: int, dtype=jnp.bfloat16):
  x = jax.random.normal(jax.random.key(0), (2, tokens, HEADS * HEAD_DIM), dtype)
  module = ops.build("mha", HEADS * HEAD_DIM, num_heads=HEADS, backend=backend)
  params = jax.tree.map(lambda a: a.astype(dtype), module.init(jax.random.key(1), x))
  params["params"]["v"]["bias"] = jnp.ones_like(params["params"]["v"]["bias"])  # folded into proj's bias
  params["params"]["q"]["bias"] = jnp.full_like(params["params"]["q"]["bias"], 0.5)
  return module, params, x


@pytest.mark.parametrize("tokens", [512, 256])
def test_mha_lowers_to_the_kernel(tokens):
  # 512 tokens: items of two 256-key steps; 256 tokens: of two 128-key steps (three stages); two items of 128
  # queries per (batch, head), on persistent programs.
  module, params, x = _mha("mosaic", tokens)
  exported = export_for_cuda(module.apply, params, x)
  assert "mosaic_gpu" in exported.mlir_module()
  assert exported.out_avals[0].shape == x.shape


def test_differentiated_mha_on_cudnn_takes_the_plain_composition(monkeypatch):
  # Where MHA does not train on the backward kernels ("auto" past the lengths they were measured at), a
  # differentiated call on the forward kernel runs the composition: its values and gradients exactly.
  monkeypatch.setattr(attention, "trains_on_kernel", lambda *args: False)
  module, params, x = _mha("mosaic", 512)
  xla, fused = (jax.vjp(ops.build("mha", x.shape[-1], num_heads=HEADS, backend=b).apply, params, x)
                for b in ("xla", "mosaic"))
  np.testing.assert_array_equal(xla[0], fused[0])
  cotangent = jax.random.normal(jax.random.key(2), x.shape, x.dtype)
  for a, b in zip(jax.tree.leaves(xla[1](cotangent)), jax.tree.leaves(fused[1](cotangent))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tokens", [256, 512])
def test_differentiated_mosaic_mha_lowers_to_the_backward_kernels(tokens):
  # "mosaic" trains on the kernels: the forward writing its log-sum-exp, then the dq and the dk/dv kernels; no
  # cuDNN anywhere, and gradients for every parameter and the input.
  module, params, x = _mha("mosaic", tokens)
  loss = lambda params, x: module.apply(params, x).astype(jnp.float32).sum()
  exported = export_for_cuda(jax.grad(loss, argnums=(0, 1)), params, x)
  module_text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", module_text)) == 3
  assert "cudnn" not in module_text
  # The dk/dv kernel writes into the dq kernel's output, in place: XLA neither copies dq in nor keeps two buffers.
  assert len(re.findall(r"output_operand_aliases", module_text)) == 1
  assert "dynamic_update_slice" not in module_text
  assert [a.shape for a in exported.out_avals] == [a.shape for a in jax.tree.leaves((params, x))]


@pytest.mark.parametrize("tokens", [256, 512])
def test_kernels_fit_in_shared_memory_at_the_models_heads(tokens):
  # Mosaic checks a kernel's shared memory as it lowers (against Hopper's 232,448 bytes a block), and it grows with
  # the number of heads (q's bias) and with the tiles (256 keys x 2 stages from 512 tokens on). So the forward, with
  # and without its log-sum-exp, and the backward lower here at DiT-XL/2's and PixArt's 16 heads of 72.
  heads_shape = (2, tokens, 16, HEAD_DIM)
  qkv = jax.ShapeDtypeStruct((2, tokens, 3, 16, HEAD_DIM), jnp.bfloat16)
  q_bias, do = jax.ShapeDtypeStruct((16, HEAD_DIM), jnp.bfloat16), jax.ShapeDtypeStruct(heads_shape, jnp.bfloat16)
  assert hopper_attention_grad.fits_train(heads_shape, jnp.bfloat16)
  forward = lambda qkv, q_bias: hopper_attention.attention(qkv, q_bias, softmax_attention)
  gradients = lambda qkv, q_bias, do: jax.vjp(hopper_attention_grad.attention, qkv, q_bias)[1](do)
  calls = {"forward": (forward, (qkv, q_bias)), "forward and backward": (gradients, (qkv, q_bias, do))}
  for name, (fn, args) in calls.items():
    module_text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert module_text.count("custom_call @mosaic_gpu") == (1 if name == "forward" else 3), name


@pytest.mark.parametrize("remat, kernel_calls", [("elementwise", 3), ("dots", 4)])
def test_remat_keeps_what_the_backward_kernels_read(remat, kernel_calls):
  # A DiT train step on the kernels: under remat's elementwise policy the forward's output and log-sum-exp are
  # kept (`kept`), so the backward runs the dq and dk/dv kernels without running the forward again; the dots policy
  # keeps neither, and the forward kernel runs a second time in the backward pass.
  cfg = dit_config("DiT-S/2", depth=1, hidden_size=HEADS * HEAD_DIM, num_heads=HEADS, num_classes=10, remat=remat)
  cfg = cfg.replace(layers=tuple(layer.__class__(OpSpec.make("mha", num_heads=HEADS, backend="mosaic"), layer.mlp)
                                 for layer in cfg.layers))
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0)))
  x, labels = jnp.zeros((2, 32, 32, 4), jnp.bfloat16), jnp.zeros((2,), jnp.int32)  # 256 tokens
  loss = lambda params: DiT(cfg).apply({"params": params}, x, labels, labels).astype(jnp.float32).sum()
  exported = export_for_cuda(jax.grad(loss), params)
  assert len(re.findall(r"custom_call @mosaic_gpu", exported.mlir_module())) == kernel_calls


def test_auto_trains_on_the_kernels_where_they_were_measured_faster():
  dit = (256, 256, 16, 72)
  assert attention.trains_on_kernel("auto", dit, jnp.bfloat16)
  assert attention.trains_on_kernel("auto", (2, 4096, 16, 72), jnp.bfloat16)
  assert not attention.trains_on_kernel("auto", (2, 16384, 16, 72), jnp.bfloat16)  # backward not measured there
  assert not attention.trains_on_kernel("auto", (256, 256, 16, 64), jnp.bfloat16)  # cuDNN's own head width
  assert attention.trains_on_kernel("mosaic", dit, jnp.bfloat16)
  assert attention.trains_on_kernel("mosaic", (2, 16384, 16, 72), jnp.bfloat16)
  assert not attention.trains_on_kernel("mosaic", (2, 192, 16, 72), jnp.bfloat16)  # not whole tiles of 128
  assert not attention.trains_on_kernel("mosaic", dit, jnp.float32)


@pytest.mark.parametrize("heads", [16, 2])
def test_bias_rows_hold_each_head_at_its_window_offset(heads):
  # What the backward kernels add to a window: the head's bias at its offset, zeros on the neighbour's channels;
  # rows come in fours (whole 128-byte lines for the copy).
  windows = hopper_attention.Windows(heads, HEAD_DIM)
  bias = jax.random.normal(jax.random.key(5), (heads, HEAD_DIM))
  rows = np.asarray(windows.bias_rows(bias, jnp.float32))
  assert rows.shape == (-(-heads // 4) * 4, windows.width)
  for h, offset in enumerate(windows.offsets):
    np.testing.assert_array_equal(rows[h, offset:offset + HEAD_DIM], bias[h])
    assert not rows[h, :offset].any() and not rows[h, offset + HEAD_DIM:].any()
  assert not rows[heads:].any()


def test_windows_hold_each_head_at_its_offset():
  # What the kernel does with indices, written with numpy: head h's window is the box at starts[h] (a multiple of
  # 16 channels, inside its group); its own channels sit at offsets[h] (a multiple of 8: the epilogue slices
  # them out of 8-column register tiles), and with the neighbour's channels zeroed in q the window's logits are the
  # head's own.
  heads, head_dim = 16, 72
  windows = hopper_attention.Windows(heads, head_dim)
  assert (windows.width, windows.offsets[:3], windows.starts[:3]) == (80, (0, 8, 0), (0, 64, 144))
  assert windows.fit() and not windows.exact and hopper_attention.Windows(16, 64).exact
  assert not hopper_attention.Windows(3, 72).fit()  # heads of 72 come in pairs (144 channels, 9 x 16)
  assert not hopper_attention.Windows(16, 30).fit()  # a group's last 48-channel box would reach past it
  assert not hopper_attention.Windows(16, 36).fit()  # offsets of 4: not whole register tiles
  rng = np.random.default_rng(0)
  q, k = (rng.normal(size=(5, heads * head_dim)) for _ in range(2))
  span = windows.group * head_dim
  for h, (start, offset) in enumerate(zip(windows.starts, windows.offsets)):
    assert start % 16 == 0 and offset % 8 == 0 and start % span + windows.width <= span
    own = slice(h * head_dim, (h + 1) * head_dim)
    q_box, k_box = q[:, start:start + windows.width], k[:, start:start + windows.width]
    np.testing.assert_array_equal(q_box[:, offset:offset + head_dim], q[:, own])
    mine = (np.arange(windows.width) >= offset) & (np.arange(windows.width) < offset + head_dim)
    np.testing.assert_allclose(np.where(mine, q_box, 0) @ k_box.T, q[:, own] @ k[:, own].T, rtol=1e-12)


@pytest.mark.parametrize("batch,heads,q_tiles,programs", [(2, 16, 128, 132), (256, 16, 2, 132), (3, 2, 5, 7),
                                                          (1, 2, 1, 132)])
def test_persistent_programs_take_every_item_once(batch, heads, q_tiles, programs):
  # The kernel's schedule, evaluated for every program at once: strided items, counts that cover them all exactly
  # once, and the items that run side by side (the same j on neighbouring programs) are neighbouring query tiles of
  # one head.
  items = batch * heads * q_tiles
  programs = min(programs, items)  # the kernel's grid
  program, j = (a.astype(jnp.int32) for a in jnp.meshgrid(jnp.arange(programs), jnp.arange(-(-items // programs)),
                                                          indexing="ij"))
  taken = j < hopper_attention.items_of(program, programs, items)
  index = np.stack([np.asarray(a) for a in hopper_attention.work_item(program, programs, j, heads, q_tiles)], -1)
  taken_items = sorted(map(tuple, index[np.asarray(taken)].tolist()))
  assert taken_items == [(b, h, t) for b in range(batch) for h in range(heads) for t in range(q_tiles)]
  if q_tiles > 1 and programs > 1:
    assert index[1, 0].tolist() == [*index[0, 0, :2], index[0, 0, 2] + 1]


@pytest.mark.parametrize("tokens", [512, 96])
def test_fallback_equals_the_plain_composition(tokens):
  # float32 is no kernel dtype (and 96 tokens no whole tile): the reference runs instead of the kernel.
  module, params, x = _mha("mosaic", tokens, jnp.float32)
  xla = ops.build("mha", x.shape[-1], num_heads=HEADS, backend="xla")
  np.testing.assert_allclose(module.apply(params, x), xla.apply(params, x), atol=1e-5, rtol=1e-5)


def test_kernel_call_runs_on_batch_shards():
  # float32 takes the reference inside the partitioned call, standing in for the kernel a CPU cannot run; q's bias
  # stays whole on every device.
  qkv = jax.random.normal(jax.random.key(3), (8, 64, 3, HEADS, HEAD_DIM))
  q_bias = jax.random.normal(jax.random.key(4), (HEADS, HEAD_DIM))
  _sharded_matches_one_device(lambda *a: hopper_attention.attention(*a, softmax_attention), [qkv], [q_bias])


def test_packed_operand_is_the_three_projections():
  # The kernel's operand: one matmul's q, k and v side by side, q's bias left out (the kernel adds it); through
  # the reference (float32 on a CPU) the packed call is the unpacked attention.
  _, params, x = _mha("xla", 96, jnp.float32)
  weights = {name: (params["params"][name]["kernel"], params["params"][name]["bias"]) for name in "qkv"}
  q_bias = weights["q"][1].reshape(HEADS, -1)
  qkv = project_packed(x, weights, HEADS)
  q, k, v = project_heads(x, weights, HEADS)
  np.testing.assert_allclose(qkv[:, :, 0] + q_bias, q, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(qkv[:, :, 1:], jnp.stack([k, v], 2), rtol=1e-6, atol=1e-6)
  packed = hopper_attention.attention(qkv, q_bias, softmax_attention)
  np.testing.assert_allclose(packed, softmax_attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_auto_takes_the_kernel_only_where_it_paid_off():
  shape = (2, 16384, 16, 72)
  assert not hopper_attention.supported(shape, jnp.bfloat16)  # no GPU here
  assert hopper_attention.fits(shape, jnp.bfloat16) and not hopper_attention.fits(shape, jnp.float32)
  assert hopper_attention.pays_off(shape) and hopper_attention.pays_off((64, 1024, 16, 72))
  assert hopper_attention.pays_off((256, 256, 16, 72)) and not hopper_attention.pays_off((64, 128, 16, 72))
  assert not hopper_attention.pays_off((2, 16384, 16, 64))  # cuDNN does not round a head of 64 up
  assert not hopper_attention.fits((2, 16384, 16, 96), jnp.bfloat16)  # windows of 96


def test_unknown_backend_is_one_sentence():
  module = ops.build("mha", HEADS * HEAD_DIM, num_heads=HEADS, backend="flash")
  backends = r"\('auto', 'cudnn', 'xla', 'mosaic', 'splash'\)"
  with pytest.raises(ValueError, match=rf"^attention backend must be one of {backends}"):
    module.init(jax.random.key(0), jnp.zeros((1, 256, HEADS * HEAD_DIM)))
