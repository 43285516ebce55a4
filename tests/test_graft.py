"""Graft plans, tree surgery, the per-layer summary, activation capture and stage-1 distillation on a tiny teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import dot_dtypes

from graft_jax import graft
from graft_jax.data.arrays import ArrayIterator
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.dit import capture
from graft_jax.train import distill, partition

DEPTH = 4


def tiny_teacher(seed=0):
  config = dit_config("DiT-S/2", depth=DEPTH, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
  rng = np.random.default_rng(seed)  # adaLN-Zero starts as the identity: a teacher needs non-zero modulation
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32),
                        init_params(config, jax.random.key(seed)))
  return config, params


def test_layer_patterns():
  assert graft.parse_layers("odd", 28) == tuple(range(1, 28, 2))
  assert graft.parse_layers("three_of_four", 28) == tuple(i for i in range(28) if i % 4)
  assert len(graft.parse_layers("three_of_four", 28)) == 21
  assert graft.parse_layers("last:3", 28) == (25, 26, 27)
  assert graft.parse_layers("first:2", 28) == (0, 1)
  assert graft.parse_layers([3, 1], 28) == (1, 3)


@pytest.mark.parametrize("entry,message", [
    (dict(site="attn", layers=[28], operator="swa"), "out of range"),
    (dict(site="attn", layers="odd", operator="flash"), "unknown operator"),
    (dict(site="mlp", layers="odd", operator="swa"), "is a attn operator"),
    (dict(site="attn", layers="odd", operator="swa", config=dict(widow=3)), "no option"),
    (dict(site="attn", layers="odd", operator="mha", config=dict(num_heads=7)), "cannot be built"),
    (dict(site="attn", layers="middle", operator="swa"), "layer pattern"),
    (dict(site="attn", layers="odd", operator="swa", init="teacher"), "init 'teacher'"),
    (dict(site="attn", layers="odd", operator="swa", init="/no/such/folder"), "init must be"),
])
def test_invalid_plans_fail_with_one_sentence(entry, message):
  with pytest.raises(graft.PlanError, match=message) as e:
    graft.parse_plan([entry], dit_config("DiT-XL/2"))
  assert "\n" not in str(e.value)


def test_overlapping_edits_rejected():
  plan = [dict(site="attn", layers="odd", operator="swa"), dict(site="attn", layers=[3], operator="hyena_x")]
  with pytest.raises(graft.PlanError, match="already edited"):
    graft.parse_plan(plan, dit_config("DiT-XL/2"))


def test_summary_matches_parameter_counts():
  teacher = dit_config("DiT-XL/2")
  edits = graft.parse_plan([dict(site="attn", layers="odd", operator="hyena_x")], teacher)
  s = graft.summary(teacher, graft.student_config(teacher, edits))
  assert len(s["rows"]) == 14 and all(r["params_before"] == 5_313_024 and r["params_after"] == 5_330_304
                                      for r in s["rows"])
  assert s["params_teacher"] == 674_834_720
  assert s["params_student"] - s["params_teacher"] == 14 * (5_330_304 - 5_313_024)
  assert s["flops_student"] < s["flops_teacher"]
  assert abs(s["flops_teacher"] / 1e9 - 237.2) < 0.5  # DiT-XL/2: 118.6 GMACs per image


def test_surgery_replaces_only_planned_subtrees():
  teacher, params = tiny_teacher()
  edits = graft.parse_plan([dict(site="attn", layers="odd", operator="swa", config=dict(num_heads=2, window=1)),
                            dict(site="mlp", layers=[0], operator="mlp", config=dict(ratio=2), init="fresh")],
                           teacher)
  student, new = graft.graft(teacher, params, edits, jax.random.key(7))
  assert [l.attn.name for l in student.layers] == ["mha", "swa", "mha", "swa"]
  assert new["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (32, 64)
  for i in range(DEPTH):
    block = f"blocks_{i}"
    same = jax.tree.map(np.array_equal, new[block]["adaLN_modulation"], params[block]["adaLN_modulation"])
    assert all(jax.tree.leaves(same))
  assert new["blocks_2"]["attn"] is params["blocks_2"]["attn"]
  assert not np.array_equal(new["blocks_1"]["attn"]["q"]["kernel"], params["blocks_1"]["attn"]["q"]["kernel"])
  x = jnp.zeros((2, 8, 8, 4))
  assert DiT(student).apply({"params": new}, x, jnp.array([1, 2]), jnp.array([1, 2])).shape == (2, 8, 8, 8)


def test_capture_returns_operator_input_output_and_gate():
  teacher, params = tiny_teacher()
  model = DiT(teacher)
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  t, y = np.array([3, 500]), np.array([1, 10])
  out, acts = jax.jit(lambda p: capture(model, p, x, t, y, [(1, "attn"), (2, "mlp")]))(params)
  np.testing.assert_allclose(out, model.apply({"params": params}, x, t, y), atol=1e-6)
  inp, target, gate = (np.asarray(a) for a in acts[1, "attn"])
  assert inp.shape == target.shape == (2, 16, 32) and gate.shape == (2, 1, 32)
  op = teacher.layers[1].attn.build(32)
  np.testing.assert_allclose(op.apply({"params": params["blocks_1"]["attn"]}, inp), target, atol=1e-5)


def distill_config(steps, **overrides):
  c = distill.default_config()
  c.update(dict(steps=steps, batch_size=16, lr=1e-2, log_every=100, checkpoint_every=50, mesh=dict(data=-1, fsdp=1)))
  c.update(overrides)
  return c


def run_stage1(tmp, steps, self_graft=True, **overrides):
  teacher, params = tiny_teacher()
  plan = [dict(site="attn", layers="odd", operator="mha", config=dict(num_heads=2)),
          dict(site="mlp", layers=[2], operator="mlp", config=dict(ratio=4))]
  edits = graft.parse_plan(plan, teacher)
  student, student_params = graft.graft(teacher, params, edits, jax.random.key(3))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 8, 8, 4)).astype(np.float32)
  y = rng.integers(0, 10, 256).astype(np.int32)
  data = ArrayIterator({"x": x[:192], "y": y[:192]}, 16, seed=0)
  heldout = [{"x": x[192 + 32 * i: 224 + 32 * i], "y": y[192 + 32 * i: 224 + 32 * i]} for i in range(2)]
  # One device: what this test is about is convergence and resumption, not sharding (tests/test_partition.py).
  mesh = partition.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return distill.run_distill(distill_config(steps, **overrides), DiT(teacher), params, student, student_params,
                             graft.sites(edits), data, heldout, tmp, mesh=mesh)


def test_self_grafting_mha_distils_under_5_percent(tmp_path):
  scions, errors = run_stage1(tmp_path, 1200, lr_milestones=(600, 800, 1000), checkpoint_every=1200)
  assert set(errors) == {"blocks_1/attn", "blocks_3/attn", "blocks_2/mlp"}
  # The target is self-grafted MHA; the MLP site rides along (L2 converges slower at this size).
  assert errors["blocks_1/attn"] < 0.05 and errors["blocks_3/attn"] < 0.05 and errors["blocks_2/mlp"] < 0.1, errors
  assert (tmp_path / "metrics" / "metrics.jsonl").exists()
  out = distill.save_scions(tmp_path / "stage1", scions, errors)
  loaded = distill.load_scions(out)
  np.testing.assert_array_equal(loaded["blocks_1"]["attn"]["q"]["kernel"], scions["blocks_1"]["attn"]["q"]["kernel"])


def test_resumed_run_equals_uninterrupted(tmp_path):
  straight, _ = run_stage1(tmp_path / "a", 100)
  run_stage1(tmp_path / "b", 50)
  resumed, _ = run_stage1(tmp_path / "b", 100)
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_losses():
  p, q = jnp.array([0.0, 2.0]), jnp.array([1.0, -1.0])
  assert float(distill.site_loss(p, q, "l1")) == 2.0
  assert float(distill.site_loss(p, q, "l2")) == 5.0
  assert float(distill.site_loss(p, q, "huber", 1.0)) == pytest.approx((0.5 + 2.5) / 2)


def test_bf16_stage1_runs_teacher_and_scions_in_bf16():
  """The noised batch comes back in the compute dtype: float32 diffusion coefficients once promoted z_t, and with it
  the teacher's forward and every scion, to float32 (half speed on a GPU)."""
  teacher, params = tiny_teacher()
  edits = graft.parse_plan([dict(site="attn", layers="odd", operator="mha", config=dict(num_heads=2))], teacher)
  student, student_params = graft.graft(teacher, params, edits, jax.random.key(3))
  config = distill_config(1, compute_dtype="bfloat16")
  sites = graft.sites(edits)
  loss_fn = distill.make_loss_fn(DiT(teacher), student, sites, config)
  bf16 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), tree)
  batch = {"x": jnp.zeros((2, 8, 8, 4), jnp.bfloat16), "y": jnp.zeros((2,), jnp.int32)}
  # The forward pass: the backward of XLA's attention keeps its probabilities in float32 on purpose.
  loss = lambda p: loss_fn(bf16(p), bf16(params), batch, jax.random.key(0))[0]
  dots = dot_dtypes(jax.make_jaxpr(loss)(distill.scion_params(student_params, sites)))
  token_dots = {dtype for ndim, dtype in dots if ndim >= 3}  # (B, N, D) operands; the (B, D) embedders may differ
  assert len(dots) > 20 and token_dots == {"bfloat16"}, token_dots
