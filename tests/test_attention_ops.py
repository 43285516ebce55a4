"""Sliding-window attention: both banded formulations against a dense masked oracle, the module against torch."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from graft_jax import operators as ops
from graft_jax.operators.attention import (dense_attention_reference, key_masked_attention, neighbourhood_attention,
                                          real_keys_first, tiled_band_attention)

FORMULATIONS = {
    "shift": lambda q, k, v, window: neighbourhood_attention(q, k, v, window),
    "tiled": tiled_band_attention,
}


def _band_mask(n, window):
  i = np.arange(n)
  return np.abs(i[:, None] - i[None]) <= window


def _grid_mask(grid, window):
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  return (np.abs(rows[:, None] - rows[None]) <= window) & (np.abs(cols[:, None] - cols[None]) <= window)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, q, k, v, cotangent):
  """fn's output and the gradients of <fn(q, k, v), cotangent> w.r.t. q, k and v (jitted: one compile per case)."""
  out, pull = jax.vjp(fn, q, k, v)
  return (out, *pull(cotangent))


def _assert_matches_dense(fn, mask, n, heads=3, head_dim=8, seed=0):
  q, k, v, cot = jax.random.normal(jax.random.key(seed), (4, 2, n, heads, head_dim))
  got = _value_and_grads(fn, q, k, v, cot)
  want = _value_and_grads(lambda q, k, v: dense_attention_reference(q, k, v, mask), q, k, v, cot)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
@pytest.mark.parametrize("n,window", [(37, 1), (37, 4), (37, 7), (6, 8), (256, 4)])
def test_band_attention_matches_dense_masked_reference(formulation, n, window):
  fn = FORMULATIONS[formulation]
  _assert_matches_dense(lambda q, k, v: fn(q, k, v, window), _band_mask(n, window), n)


@pytest.mark.parametrize("grid,window", [((6, 7), 1), ((3, 2), 4)])
def test_grid_attention_matches_dense_chebyshev_reference(grid, window):
  n = grid[0] * grid[1]
  _assert_matches_dense(lambda q, k, v: neighbourhood_attention(q, k, v, window, grid), _grid_mask(grid, window), n)


# Caption padding: scattered real keys in row 0, none at all in row 1 (it then attends over every key).
KEY_MASK = np.array([[1, 0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0]], bool)


def _key_masked_reference(q, k, v):
  rows = [dense_attention_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], m if m.any() else None)
          for b, m in enumerate(KEY_MASK)]
  return jnp.concatenate(rows)


def _cross_inputs():
  q, cot = jax.random.normal(jax.random.key(1), (2, 2, 9, 3, 8))
  k, v = jax.random.normal(jax.random.key(2), (2, 2, 7, 3, 8))
  return q, k, v, cot


def test_key_masked_attention_matches_dense_reference():
  q, k, v, cot = _cross_inputs()
  got = _value_and_grads(lambda q, k, v: key_masked_attention(q, k, v, KEY_MASK, backend="xla"), q, k, v, cot)
  want = _value_and_grads(_key_masked_reference, q, k, v, cot)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_real_keys_first_with_key_counts_is_the_masked_attention():
  # What the cuDNN path runs (real keys packed first, per-row counts), here through XLA's key_value_seq_lengths.
  q, k, v, cot = _cross_inputs()
  mask = KEY_MASK | ~KEY_MASK.any(-1, keepdims=True)
  np.testing.assert_array_equal(real_keys_first(k, v, mask)[2], [4, 7])

  def packed(q, k, v):
    kp, vp, lengths = real_keys_first(k, v, mask)
    return jax.nn.dot_product_attention(q, kp, vp, key_value_seq_lengths=lengths, implementation="xla")

  got = _value_and_grads(packed, q, k, v, cot)
  want = _value_and_grads(_key_masked_reference, q, k, v, cot)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_grid_must_hold_the_sequence():
  q = jnp.zeros((1, 20, 2, 4))
  with pytest.raises(ValueError, match="does not hold"):
    neighbourhood_attention(q, q, q, 1, (3, 7))


class TorchSWA(torch.nn.Module):
  """flash-attn's MHA layout (fused Wqkv, out_proj) with a dense boolean neighbourhood mask: the oracle."""

  def __init__(self, dim, heads, mask):
    super().__init__()
    self.heads, self.mask = heads, torch.from_numpy(mask)
    self.Wqkv = torch.nn.Linear(dim, 3 * dim)
    self.out_proj = torch.nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.Wqkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
    probs = torch.softmax(scores.masked_fill(~self.mask, float("-inf")), dim=-1)
    return self.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))


@functools.partial(jax.jit, static_argnums=0)
def _module_value_and_grads(module, params, x, cotangent):
  out, pull = jax.vjp(lambda params, x: module.apply({"params": params}, x), params, x)
  return out, *pull(cotangent)


def _torch_parity(module_cfg, mask, n, dim=24, heads=3):
  torch.manual_seed(0)
  ref = TorchSWA(dim, heads, mask)
  x = torch.randn(2, n, dim, requires_grad=True)
  want = ref(x)
  cot = torch.randn_like(want)
  (want * cot).sum().backward()

  op = ops.get("swa")
  config, params = op.from_torch({k: t.detach().numpy() for k, t in ref.state_dict().items()}, dim, heads)
  module = ops.build("swa", dim, **{**config, **module_cfg})
  got, grad_params, grad_x = _module_value_and_grads(module, params, jnp.asarray(x.detach().numpy()),
                                                     jnp.asarray(cot.numpy()))
  np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(grad_x, x.grad.numpy(), atol=1e-5, rtol=1e-5)
  # Parameter gradients too: k's bias (cancelled by softmax) and v's (folded into out_proj's bias) are not applied
  # where PyTorch applies them, and must still get PyTorch's gradients (zero for k's, up to rounding).
  _, want_grads = op.from_torch({k: t.grad.numpy() for k, t in ref.named_parameters()}, dim, heads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grad_params, want_grads)
  return config


@pytest.mark.parametrize("backend", ["auto", "tiled", "shift"])
def test_swa_module_matches_torch_reference(backend):
  config = _torch_parity({"backend": backend}, _band_mask(29, 4), 29)
  assert config == {"num_heads": 3}  # the window comes from the operator's default (4)


def test_swa_grid_module_matches_torch_reference():
  _torch_parity({"grid": (5, 6), "window": 1}, _grid_mask((5, 6), 1), 30)


def test_swa_registration():
  op = ops.get("swa")
  assert op.site == "attn" and "swa" in ops.names("attn")
  assert op.defaults["window"] == 4 and op.defaults["num_heads"] == 16
  assert ops.match_torch_modules("attn", frozenset({"Wqkv", "out_proj"})) is op


@pytest.mark.parametrize("cfg,match", [({"backend": "cudnn"}, "backend"),
                                       ({"backend": "tiled", "grid": (2, 4)}, "1-D")])
def test_swa_rejects_unsupported_backends(cfg, match):
  module = ops.build("swa", 8, num_heads=2, **cfg)
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
