"""Mamba-2: chunked SSD against the sequential scan, the module against a naive PyTorch Mamba2, init and size."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graft_jax import operators
from graft_jax.operators import ssm


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)  # dA is exactly 0 at n = 1 (no earlier state)


def ssd_inputs(n, seed=0, heads=4, headdim=3, d_state=5, dt_range=(1e-3, 0.5)):
  """Random SSD inputs whose decays span slow (long memory across chunks) to fast; numpy's RNG avoids compiling."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, n, heads, headdim))
  dt = rng.uniform(*dt_range, size=(2, n, heads))
  A = -np.exp(rng.uniform(math.log(0.05), math.log(16.0), size=heads))
  B, C = rng.normal(size=(2, 2, n, d_state))
  return tuple(jnp.asarray(t, jnp.float32) for t in (x, dt, A, B, C))


@functools.cache
def _jitted_vjp(chunk, kernel="xla"):
  """One compilation per chunk size (None: the sequential reference), reused by every test with the same shapes."""
  fn = ssm.ssd_reference if chunk is None else functools.partial(ssm.ssd_chunked, chunk_size=chunk, kernel=kernel)

  def value_and_pullback(inputs, probe):
    y, pullback = jax.vjp(fn, *inputs)
    return y, pullback(probe)
  return jax.jit(value_and_pullback)


def value_and_grads(inputs, chunk=None, kernel="xla"):
  """The SSD output and the gradients of <output, random cotangent> w.r.t. x, dt, A, B, C."""
  probe = jnp.asarray(np.random.default_rng(1).normal(size=inputs[0].shape), jnp.float32)
  return _jitted_vjp(chunk, kernel)(inputs, probe)


@pytest.mark.parametrize("n", [1, 7, 64, 100])
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_ssd_matches_sequential_scan(chunk, n):
  inputs = ssd_inputs(n)
  y, grads = value_and_grads(inputs, chunk)
  y_ref, grads_ref = value_and_grads(inputs)
  assert rel_err(y, y_ref) < 1e-5
  for name, g, g_ref in zip("x dt A B C".split(), grads, grads_ref):
    assert rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("n,dt_range", [(7, (1e-3, 0.5)), (40, (1e-3, 0.5)), (32, (1.0, 5.0))])
def test_pallas_within_chunk_kernel_matches_sequential_scan(n, dt_range):
  # The fused kernel (Pallas interpret mode here) at the smallest shapes it tiles: chunk, state and head width 16;
  # 4 heads make one head block. (1.0, 5.0): decays whose unmasked upper triangle would overflow.
  inputs = ssd_inputs(n, heads=4, headdim=16, d_state=16, dt_range=dt_range)
  y, grads = value_and_grads(inputs, 16, kernel="pallas")
  y_ref, grads_ref = value_and_grads(inputs)
  assert rel_err(y, y_ref) < 1e-5
  for name, g, g_ref in zip("x dt A B C".split(), grads, grads_ref):
    assert np.isfinite(np.asarray(g)).all(), name
    assert rel_err(g, g_ref) < 1e-5, name  # measured: at most 6e-6 (dA under strong decay), as the XLA path


def test_unknown_ssd_kernel_is_one_sentence():
  with pytest.raises(ValueError, match="SSD kernel 'triton' is not one of xla, pallas, auto."):
    ssm.ssd_chunked(*ssd_inputs(8), chunk_size=4, kernel="triton")


def test_chunked_ssd_gradients_finite_under_strong_decay():
  # dt * A down to -80 per step: the unmasked upper triangle of the decay matrix would overflow to inf.
  inputs = ssd_inputs(64, dt_range=(1.0, 5.0))
  _, grads = value_and_grads(inputs, 64)
  _, grads_ref = value_and_grads(inputs)
  for g, g_ref in zip(grads, grads_ref):
    assert np.isfinite(np.asarray(g)).all()
    assert rel_err(g, g_ref) < 1e-4  # measured 9e-6: within-chunk cumulative sums reach -300 here


def test_bfloat16_inputs_multiply_in_bfloat16_and_stay_close():
  """bf16 operands with float32 accumulation: within bf16 rounding of the float32 oracle, and a float32 result."""
  x, dt, A, B, C = ssd_inputs(40, seed=3)
  expected = ssm.ssd_reference(x, dt, A, B, C)
  got = jax.jit(functools.partial(ssm.ssd_chunked, chunk_size=16))(x.astype(jnp.bfloat16), dt, A, B, C)
  assert got.dtype == jnp.float32
  assert 1e-4 < rel_err(got, expected) < 3e-2  # above: the matmuls really ran in bf16


def test_bidirectional_ssd_is_two_causal_scans_minus_diagonal():
  x, dt, A, B, C = ssd_inputs(37)
  flip = lambda t: jnp.flip(t, 1)
  reference = jax.jit(ssm.ssd_reference)
  forward = reference(x, dt, A, B, C)
  backward = flip(reference(flip(x), flip(dt), A, flip(B), flip(C)))
  diagonal = jnp.einsum("bns,bns->bn", C, B)[..., None, None] * dt[..., None] * x
  y = jax.jit(ssm.ssd_bidirectional, static_argnames="chunk_size")(x, dt, A, B, C, chunk_size=16)
  assert rel_err(y, forward + backward - diagonal) < 1e-5


class TorchMamba2(torch.nn.Module):
  """Naive mamba_ssm-style Mamba2 (ngroups 1) with a per-step recurrence; key names as the official module."""

  def __init__(self, dim, d_state, d_conv, expand, headdim, bidirectional=False):
    super().__init__()
    self.d_inner, self.d_state, self.headdim = expand * dim, d_state, headdim
    self.nheads, self.bidirectional = self.d_inner // headdim, bidirectional
    conv_dim = self.d_inner + 2 * d_state
    self.in_proj = torch.nn.Linear(dim, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
    self.conv1d = torch.nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
    self.dt_bias = torch.nn.Parameter(torch.randn(self.nheads))
    self.A_log = torch.nn.Parameter(torch.rand(self.nheads) * 2.5)
    self.D = torch.nn.Parameter(torch.randn(self.nheads))
    self.norm = torch.nn.Module()
    self.norm.weight = torch.nn.Parameter(1 + 0.5 * torch.randn(self.d_inner))
    self.out_proj = torch.nn.Linear(self.d_inner, dim, bias=False)

  def scan(self, x, dt, A, B, C):
    state = x.new_zeros(x.shape[0], self.nheads, self.headdim, self.d_state)
    ys = []
    for t in range(x.shape[1]):
      state = (torch.exp(dt[:, t] * A)[..., None, None] * state
               + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :])
      ys.append((state * C[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, 1)

  def forward(self, u):
    b, n, _ = u.shape
    z, xbc, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.d_state, self.nheads], -1)
    xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :n].transpose(1, 2))
    x, B, C = torch.split(xbc, [self.d_inner, self.d_state, self.d_state], -1)
    x = x.reshape(b, n, self.nheads, self.headdim)
    dt, A = F.softplus(dt + self.dt_bias), -torch.exp(self.A_log)
    y = self.scan(x, dt, A, B, C)
    if self.bidirectional:
      y = y + self.scan(*(t.flip(1) for t in (x, dt)), A, B.flip(1), C.flip(1)).flip(1)
      y = y - (C * B).sum(-1)[..., None, None] * dt[..., None] * x
    y = (y + self.D[:, None] * x).reshape(b, n, self.d_inner) * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm.weight
    return self.out_proj(y)


def import_torch(model, dim):
  op = operators.get("mamba2")
  assert op.torch_modules == {name.split(".")[0] for name in model.state_dict()}
  tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  return op.from_torch(tensors, dim, 16)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_module_matches_torch_mamba2(bidirectional):
  torch.manual_seed(0)
  dim, n = 24, 37
  model = TorchMamba2(dim, d_state=8, d_conv=4, expand=2, headdim=8, bidirectional=bidirectional).double()
  config, params = import_torch(model, dim)
  assert config == {"d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8}
  module = operators.build("mamba2", dim, chunk_size=16, bidirectional=bidirectional, **config)
  u = np.random.default_rng(0).normal(size=(2, n, dim))
  got = jax.jit(module.apply)({"params": params}, jnp.asarray(u, jnp.float32))
  with torch.no_grad():
    expected = model(torch.tensor(u)).numpy()
  assert rel_err(got, expected) < 1e-5
  if not bidirectional:  # the mixed-precision path: bf16 projections, float32 SSD and norm
    bf16 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), tree)
    got16 = jax.jit(module.apply)({"params": bf16(params)}, bf16(u))
    assert got16.dtype == jnp.bfloat16 and rel_err(got16, expected) < 3e-2


def test_torch_import_refuses_projection_bias():
  model = TorchMamba2(24, d_state=8, d_conv=4, expand=2, headdim=8)
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  tensors["in_proj.bias"] = np.zeros(tensors["in_proj.weight"].shape[0], np.float32)
  with pytest.raises(ValueError, match="biases"):
    operators.get("mamba2").from_torch(tensors, 24, 16)


def test_torch_modules_identify_mamba2():
  names = frozenset({"in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj"})
  assert operators.match_torch_modules("attn", names).name == "mamba2"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_param_count_at_dit_xl_width(bidirectional):
  module = operators.build("mamba2", 1152, bidirectional=bidirectional)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8, 1152), jnp.float32))
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == 8_290_864
  assert jax.tree.map(lambda leaf: leaf.shape, shapes["params"]) == {
      "in_proj": {"kernel": (1152, 4880)}, "conv1d": {"kernel": (4, 2432), "bias": (2432,)},
      "dt_bias": (144,), "A_log": (144,), "D": (144,), "norm": {"weight": (2304,)},
      "out_proj": {"kernel": (2304, 1152)}}


def test_init_ranges():
  module = operators.build("mamba2", 256, headdim=4)  # 128 heads
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 256)))["params"]
  A = -np.exp(np.asarray(params["A_log"]))
  dt = np.asarray(jax.nn.softplus(params["dt_bias"]))
  assert A.min() >= -16 and A.max() <= -1 and A.min() < -12 and A.max() > -4
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
  assert dt.min() < 3e-3 and dt.max() > 3e-2  # log-uniform spread, not a constant
  np.testing.assert_array_equal(params["D"], 1.0)
  np.testing.assert_array_equal(params["norm"]["weight"], 1.0)
  assert np.abs(params["conv1d"]["kernel"]).max() <= 0.5 and np.abs(params["conv1d"]["bias"]).max() <= 0.5
