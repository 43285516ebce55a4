"""Hyena family: the causal conv against two independent convolutions, each operator against a torch module written
from the paper's definition (weights through the importer), identity init, and the paper's parameter counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from graft_jax import operators as ops
from graft_jax.operators.hyena import CausalConv, causal_depthwise_conv

KERNEL_SIZES = [1, 3, 4, 7]


def _conv_case(k, n=11, c=5, seed=0):
  rng = np.random.default_rng(seed + k)
  return (rng.standard_normal((2, n, c), np.float32), rng.standard_normal((k, c), np.float32),
          rng.standard_normal((c,), np.float32))


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_causal_conv_matches_grouped_conv_general_dilated(k):
  x, w, b = _conv_case(k)
  want = jax.lax.conv_general_dilated(x, w[:, None, :], window_strides=(1,), padding=[(k - 1, 0)],
                                      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=x.shape[-1]) + b
  np.testing.assert_allclose(causal_depthwise_conv(x, w, b), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_causal_conv_matches_torch_conv1d_truncated(k):
  x, w, b = _conv_case(k)
  weight = torch.from_numpy(np.ascontiguousarray(w.T[:, None, :]))  # torch (C, 1, K): same tap order, no flip
  want = torch.nn.functional.conv1d(torch.from_numpy(x).transpose(1, 2), weight, torch.from_numpy(b), padding=k - 1,
                                    groups=x.shape[-1])[..., :x.shape[1]].transpose(1, 2)
  np.testing.assert_allclose(causal_depthwise_conv(x, w, b), want.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_feature_axis_conv_matches_torch_conv1d_with_tokens_as_channels(k):
  x, _, _ = _conv_case(k, n=6, c=9)
  rng = np.random.default_rng(1)
  w, b = rng.standard_normal((k, 6), np.float32), rng.standard_normal((6,), np.float32)
  weight = torch.from_numpy(np.ascontiguousarray(w.T[:, None, :]))
  # (B, N, F) is torch's (batch, channels, length) as it stands: one filter per token, run along the features.
  want = torch.nn.functional.conv1d(torch.from_numpy(x), weight, torch.from_numpy(b), padding=k - 1, groups=6)
  np.testing.assert_allclose(causal_depthwise_conv(x, w, b, axis=2), want[..., :x.shape[2]].numpy(), atol=1e-5)


def test_causal_conv_is_causal():
  x, w, b = _conv_case(4)
  changed = x.copy()
  changed[:, 6:] += 100.0
  np.testing.assert_array_equal(causal_depthwise_conv(changed, w, b)[:, :6], causal_depthwise_conv(x, w, b)[:, :6])


def test_conv_module_of_parts_equals_the_conv_of_their_concatenation():
  x, _, _ = _conv_case(4, c=7)
  conv = CausalConv(4, name="conv1d")
  params = conv.init(jax.random.key(0), jnp.asarray(x))
  whole = conv.apply(params, x)
  parts = conv.apply(params, x[..., :5], x[..., 5:])
  assert isinstance(parts, tuple) and len(parts) == 2
  np.testing.assert_array_equal(jnp.concatenate(parts, -1), whole)


def _depthwise(channels, k):
  return torch.nn.Conv1d(channels, channels, k, groups=channels, padding=k - 1)


class TorchHyena(torch.nn.Module):
  """Hyena-X / Y / SE written from the definition, with the official checkpoint's submodule names."""

  def __init__(self, dim, k, short, inner):
    super().__init__()
    self.dim = dim
    self.in_proj = torch.nn.Linear(dim, 3 * dim)
    self.short_filter = _depthwise(3 * dim, k) if short else None
    self.inner_filter = _depthwise(dim, k) if inner else None
    self.out_proj = torch.nn.Linear(dim, dim)

  def forward(self, x):
    n = x.shape[1]
    u = self.in_proj(x).transpose(1, 2)
    if self.short_filter is not None:
      u = self.short_filter(u)[..., :n]
    q, k, v = u.split(self.dim, dim=1)
    u = k * v
    if self.inner_filter is not None:
      u = self.inner_filter(u)[..., :n]
    return self.out_proj((q * u).transpose(1, 2))


class TorchMLPHyenaX(torch.nn.Module):
  """MLP Hyena-X from the definition: conv along the features, one filter per token, before the split."""

  def __init__(self, dim, tokens, ratio, k):
    super().__init__()
    self.hidden = dim * ratio
    self.in_proj = torch.nn.Linear(dim, 3 * self.hidden)
    self.short_filter = _depthwise(tokens, k)
    self.out_proj = torch.nn.Linear(self.hidden, dim)

  def forward(self, x):
    u = self.short_filter(self.in_proj(x))[..., :3 * self.hidden]
    q, k, v = u.split(self.hidden, dim=-1)
    return self.out_proj(q * (k * v))


DIM, TOKENS = 12, 9
TORCH_MODULES = {
    "hyena_x": lambda k: TorchHyena(DIM, k, short=True, inner=False),
    "hyena_y": lambda k: TorchHyena(DIM, k, short=False, inner=True),
    "hyena_se": lambda k: TorchHyena(DIM, k, short=True, inner=True),
    "mlp_hyena_x": lambda k: TorchMLPHyenaX(DIM, TOKENS, 2, k),
}


def _torch_tensors(module):
  return {name: t.detach().numpy() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("name,k", [("hyena_x", 4), ("hyena_y", 4), ("hyena_se", 4), ("hyena_se", 3),
                                    ("mlp_hyena_x", 4)])
def test_operator_matches_torch_reference(name, k):
  torch.manual_seed(0)
  ref = TORCH_MODULES[name](k)
  with torch.no_grad():  # random inner filters too, so the test sees every tap (the identity init would hide them)
    for p in ref.parameters():
      p.normal_(0.0, 0.3)
  x = torch.randn(2, TOKENS, DIM, requires_grad=True)
  want = ref(x)
  cot = torch.randn_like(want)
  (want * cot).sum().backward()

  op = ops.get(name)
  assert op.torch_modules == {n for n, _ in ref.named_children()}
  config, params = op.from_torch(_torch_tensors(ref), DIM, 16)
  assert config["kernel_size"] == k
  module = ops.build(name, DIM, **config)
  got, pull = jax.vjp(lambda x: module.apply({"params": params}, x), jnp.asarray(x.detach().numpy()))
  np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(pull(jnp.asarray(cot.numpy()))[0], x.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_mlp_hyena_x_import_reads_the_ratio():
  config, _ = ops.get("mlp_hyena_x").from_torch(_torch_tensors(TorchMLPHyenaX(DIM, TOKENS, 3, 4)), DIM, 16)
  assert config == {"ratio": 3, "kernel_size": 4}


def test_importer_rejects_filters_of_different_widths():
  tensors = _torch_tensors(TorchHyena(DIM, 4, short=True, inner=True))
  tensors.update({f"inner_filter.{p}": t for p, t in _torch_tensors(_depthwise(DIM, 3)).items()})
  with pytest.raises(ValueError, match="different widths"):
    ops.get("hyena_se").from_torch(tensors, DIM, 16)


@pytest.mark.parametrize("name", ["hyena_y", "hyena_se"])
def test_inner_filter_starts_as_identity(name):
  x = jax.random.normal(jax.random.key(0), (2, TOKENS, DIM))
  params = ops.build(name, DIM).init(jax.random.key(1), x)["params"]
  inner = params["inner_filter"]
  current_token_only = np.zeros((4, DIM), np.float32)
  current_token_only[-1] = 1.0
  np.testing.assert_array_equal(inner["kernel"], current_token_only)
  np.testing.assert_array_equal(inner["bias"], np.zeros(DIM))
  # With the identity inner filter, Hyena-SE is Hyena-X with the same weights (and Hyena-Y is q * k * v).
  if name == "hyena_se":
    without_inner = {k: v for k, v in params.items() if k != "inner_filter"}
    np.testing.assert_allclose(ops.build(name, DIM).apply({"params": params}, x),
                               ops.build("hyena_x", DIM).apply({"params": without_inner}, x), atol=1e-6)


def test_short_filters_get_torch_conv1d_default_init():
  params = ops.build("hyena_x", DIM).init(jax.random.key(0), jnp.zeros((1, TOKENS, DIM)))["params"]["short_filter"]
  assert params["kernel"].shape == (4, 3 * DIM) and params["bias"].shape == (3 * DIM,)
  for p in params.values():  # U(-1/sqrt(K), 1/sqrt(K)), K = 4
    assert 0.3 < float(jnp.max(jnp.abs(p))) <= 0.5


PARAM_COUNTS = [("mha", {}, 5_313_024), ("swa", {}, 5_313_024), ("hyena_x", {}, 5_330_304),
                ("hyena_y", {}, 5_318_784), ("hyena_se", {}, 5_336_064), ("mlp", {"ratio": 3}, 7_967_232),
                ("mlp", {"ratio": 6}, 15_933_312), ("mlp_hyena_x", {}, 10_626_176)]


@pytest.mark.parametrize("name,config,count", PARAM_COUNTS)
def test_parameter_counts_match_the_paper_at_dit_xl_width(name, config, count):
  module = ops.build(name, 1152, **config)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 256, 1152), jnp.float32))
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes)) == count


def test_registry_lists_the_family():
  assert {"hyena_x", "hyena_y", "hyena_se"} <= set(ops.names("attn"))
  assert "mlp_hyena_x" in ops.names("mlp")
  assert ops.match_torch_modules("attn", frozenset({"in_proj", "short_filter", "out_proj"})).name == "hyena_x"
  assert ops.match_torch_modules("attn", frozenset({"in_proj", "inner_filter", "out_proj"})).name == "hyena_y"
  assert ops.match_torch_modules("mlp", frozenset({"in_proj", "short_filter", "out_proj"})).name == "mlp_hyena_x"
  assert ops.build("mlp_hyena_x", 8).ratio == 2 and ops.build("hyena_se", 8, kernel_size=3).kernel_size == 3
