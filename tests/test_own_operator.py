"""An operator of one's own (configs/demo_own_operator.py): registered from a config, exact against its quadratic
form, counted in the graft summary, grafted by the real command line, and loadable once registered again."""
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli import ROOT, load_config, run_main
from graft_jax import checkpoints, graft, operators
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.config import OpSpec


@pytest.fixture(scope="module")
def own():
  """The example config's module namespace, its operator registered."""
  load_config("demo_own_operator")
  return operators.get("linear_attention")


def quadratic_form(params, x, heads):
  """out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), phi = elu + 1, in float64 (N x N weights)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, n, d = x.shape
  q, k, v = np.split(x @ p["qkv"]["kernel"] + p["qkv"]["bias"], 3, axis=-1)
  phi = lambda a: np.where(a > 0, a + 1, np.exp(a))
  q, k, v = (a.reshape(b, n, heads, d // heads) for a in (q, k, v))
  weights = np.einsum("bihd,bjhd->bhij", phi(q), phi(k))
  out = np.einsum("bhij,bjhd->bihd", weights / weights.sum(-1, keepdims=True), v).reshape(b, n, d)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_linear_attention_equals_its_quadratic_form(own):
  module = operators.build("linear_attention", 16, num_heads=4)
  x = jax.random.normal(jax.random.key(0), (2, 11, 16))
  params = module.init(jax.random.key(1), x)["params"]
  np.testing.assert_allclose(module.apply({"params": params}, x), quadratic_form(params, x, 4), rtol=1e-5, atol=1e-6)
  assert own.site == "attn" and own.defaults == {"num_heads": 4}


def test_registering_again(own):
  load_config("demo_own_operator")  # the same definition, loaded again (a rerun cell or config): replaces it
  assert operators.get("linear_attention").module is not own.module

  class Impostor(nn.Module):
    dim: int

  for name in ("linear_attention", "mha"):
    with pytest.raises(ValueError, match="already registered by .*; pick another name"):
      operators.register(name, "attn", defaults={}, flops=lambda c, d, n: 0)(Impostor)
  assert operators.get("mha").module.__name__ == "MultiHeadAttention"


def test_graft_summary_counts_its_flops(own):
  teacher = dit_config("DiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=16, num_classes=10)
  plan = graft.parse_plan([dict(site="attn", layers=[1], operator="linear_attention", config={"num_heads": 4})],
                          teacher)
  student = graft.student_config(teacher, plan)
  row, = graft.summary(teacher, student)["rows"]
  n, d = teacher.num_tokens, 64
  assert (row["before"], row["after"]) == ("mha", "linear_attention")
  assert row["flops_after"] == 2 * n * d * 3 * d + 2 * 2 * n * d * 16 + 2 * n * d * d
  assert row["flops_after"] == OpSpec.make("linear_attention", num_heads=4).flops(d, n)
  assert row["params_after"] == row["params_before"]


def test_the_command_line_grafts_it_and_a_fresh_process_says_what_to_import(own, tmp_path):
  proc = run_main(f"--config={ROOT}/configs/demo_own_operator.py:shrink=1", f"--workdir={tmp_path}/own", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| mha | linear_attention |" in (tmp_path / "own" / "graft_summary.md").read_text()
  student = tmp_path / "own" / "variants" / "graft" / "student"
  model, params = checkpoints.load(student)  # registered in this process by the fixture
  assert model.config.layers[1].attn.name == "linear_attention"
  load = f"from graft_jax import checkpoints; checkpoints.load({str(student)!r})"
  fresh = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
  assert fresh.returncode != 0
  assert "unknown operator 'linear_attention'" in fresh.stderr and "module that registers it" in fresh.stderr


def test_a_module_that_cannot_be_built_from_its_options_is_refused_when_registered():
  class NoWidth(nn.Module):
    num_heads: int

  class Unfilled(nn.Module):
    dim: int
    num_heads: int
    window: int

  cases = [(NoWidth, {"num_heads": 4}, "it has no field 'dim'"),
           (Unfilled, {"num_heads": 4, "heads": 2}, r"its defaults name \['heads'\], which are not its fields; "
                                                     r"its fields \['window'\] have no default")]
  for cls, defaults, says in cases:
    with pytest.raises(ValueError, match=f"cannot be built as Module\\(dim=D, \\*\\*options\\): {says}\\.$"):
      operators.register("not_registered", "attn", defaults=defaults, flops=lambda c, d, n: 0)(cls)
  assert "not_registered" not in operators.names()


def test_the_config_takes_shrink_only(own):
  with pytest.raises(ValueError, match="takes shrink=1 only"):
    load_config("demo_own_operator", "operator=swa")


class SwiGLU(nn.Module):
  """A channel mixer of one's own: W_out(silu(W_a x) * W_b x)."""
  dim: int
  ratio: float

  @nn.compact
  def __call__(self, x):
    hidden = int(self.ratio * self.dim)
    a, b = jnp.split(nn.Dense(2 * hidden, name="fc1")(x), 2, axis=-1)
    return nn.Dense(self.dim, name="fc2")(nn.silu(a) * b)


def test_a_channel_mixer_of_ones_own_grafts_into_the_mlp_site():
  hidden = lambda c, d: int(c["ratio"] * d)
  operators.register("swiglu_test", "mlp", defaults={"ratio": 2.0},
                     flops=lambda c, d, n: 2 * n * d * 2 * hidden(c, d) + 2 * n * hidden(c, d) * d)(SwiGLU)
  teacher = dit_config("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=16, num_classes=10)
  plan = graft.parse_plan([dict(site="mlp", layers=[0], operator="swiglu_test")], teacher)
  student, params = graft.graft(teacher, init_params(teacher, jax.random.key(0)), plan, jax.random.key(1))
  assert jax.tree.map(jnp.shape, params["blocks_0"]["mlp"]) == {
      "fc1": {"kernel": (32, 128), "bias": (128,)}, "fc2": {"kernel": (64, 32), "bias": (32,)}}
  out = DiT(student).apply({"params": params}, jnp.ones((2, 16, 16, 4)), jnp.array([3, 500]), jnp.array([1, 2]))
  assert out.shape == (2, 16, 16, 8) and bool(jnp.isfinite(out).all())
  row, = graft.summary(teacher, student)["rows"]
  assert (row["before"], row["after"], row["site"]) == ("mlp", "swiglu_test", "mlp")
  assert row["flops_after"] == 2 * teacher.num_tokens * 32 * 128 + 2 * teacher.num_tokens * 64 * 32
