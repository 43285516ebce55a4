"""Depth to width: parallel pairs in the config, the forward, the graft plan, stage 1 and the main job."""
import json

import jax
import numpy as np
import pytest

from cli import ROOT, load_config, run_main
from graft_jax import graft
from graft_jax.data.arrays import ArrayIterator
from graft_jax.models import DiT, DiTConfig, dit_config, init_params
from graft_jax.models.config import ParallelPairSpec
from graft_jax.models.dit import DiTBlock, ParallelPair, capture
from graft_jax.train import distill

D = 32
ALL_PAIRS = [dict(kind="parallel_pairs", layers="all")]


def tiny_teacher(scale=0.09, seed=0):
  """Depth 4, width 32. adaLN-Zero starts every block as the identity, so every weight is perturbed; at this scale
  the parallel pair starts about 14% away from the sequential one (0.05 would leave under 4%: nothing to learn)."""
  config = dit_config("DiT-S/2", depth=4, hidden_size=D, num_heads=2, input_size=8, num_classes=10)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32),
                        init_params(config, jax.random.key(seed)))
  return config, params


def test_pair_starts_as_the_sum_of_its_blocks_updates():
  teacher, params = tiny_teacher()
  student, new = graft.graft(teacher, params, graft.parse_plan(ALL_PAIRS, teacher), jax.random.key(0))
  assert student.depth == 2 and len(student.blocks) == 4
  assert student.layers[1] == ParallelPairSpec(teacher.layers[2], teacher.layers[3])
  assert new["blocks_1"]["block_0"] is params["blocks_2"] and new["blocks_1"]["block_1"] is params["blocks_3"]
  np.testing.assert_array_equal(new["blocks_0"]["merge"]["kernel"], np.concatenate([np.eye(D), np.eye(D)]))
  np.testing.assert_array_equal(new["blocks_0"]["merge"]["bias"], np.zeros(D))
  # On the device, not host numpy arrays, which every jitted call taking them would copy in again.
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(new["blocks_0"]["merge"]))
  rng = np.random.default_rng(1)
  x, c = rng.standard_normal((2, 16, D)).astype(np.float32), rng.standard_normal((2, D)).astype(np.float32)
  spec = student.layers[0]

  @jax.jit
  def run(pair_params, first, second):
    out = ParallelPair(D, spec).apply({"params": pair_params}, x, c)
    update, inter = ParallelPair(D, spec, update_only=True).apply({"params": pair_params}, x, c,
                                                                  mutable=["intermediates"])
    branches = [inter["intermediates"][f"block_{k}"]["block_update"][0] for k in range(2)]
    pairs = list(zip(spec.blocks, (first, second)))
    blocks = [DiTBlock(D, s).apply({"params": p}, x, c) for s, p in pairs]
    updates = [DiTBlock(D, s, update_only=True).apply({"params": p}, x, c) for s, p in pairs]
    return out, update, branches, blocks, updates

  out, update, branches, blocks, updates = jax.tree.map(np.asarray, run(new["blocks_0"], params["blocks_0"],
                                                                        params["blocks_1"]))
  np.testing.assert_array_equal(update, branches[0] + branches[1])  # [I; I], b = 0 adds the branches exactly
  np.testing.assert_allclose(update, updates[0] + updates[1], atol=1e-6)
  # Independently: each block's own output minus its input (the residual stream of the sequential model).
  np.testing.assert_allclose(out, x + (blocks[0] - x) + (blocks[1] - x), atol=1e-5)
  assert np.abs(update).max() > 0.1


def test_student_forward_wires_pairs_in_order():
  """With the second block of each pair silenced (its gates zero), a pair is exactly its first block: the student
  then equals the teacher with the same blocks silenced."""
  teacher, params = tiny_teacher()
  silent = dict(params)
  for i in (1, 3):
    silent[f"blocks_{i}"] = {**params[f"blocks_{i}"], "adaLN_modulation": jax.tree.map(
        np.zeros_like, params[f"blocks_{i}"]["adaLN_modulation"])}
  student, new = graft.graft(teacher, silent, graft.parse_plan(ALL_PAIRS, teacher), jax.random.key(0))
  rng = np.random.default_rng(2)
  x, t, y = rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([5, 900]), np.array([3, 10])
  forward = jax.jit(lambda p, q: (DiT(teacher).apply({"params": p}, x, t, y),
                                  DiT(student).apply({"params": q}, x, t, y)))
  want, got = (np.asarray(a) for a in forward(silent, new))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(want).max() > 0.1


def test_capture_pair_site_is_the_sequential_pairs_update():
  teacher, params = tiny_teacher()
  rng = np.random.default_rng(3)
  x, t, y = rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([5, 900]), np.array([3, 7])

  @jax.jit
  def run(p):
    _, acts = capture(DiT(teacher), p, x, t, y, [(2, "pair")])
    inp, target, c = acts[2, "pair"]
    h = DiTBlock(D, teacher.layers[2]).apply({"params": p["blocks_2"]}, inp, c)
    return inp, target, c, DiTBlock(D, teacher.layers[3]).apply({"params": p["blocks_3"]}, h, c)

  inp, target, c, out = (np.asarray(a) for a in run(params))
  assert inp.shape == target.shape == (2, 16, D) and c.shape == (2, D)
  np.testing.assert_allclose(target, out - inp, atol=1e-5)
  assert np.abs(target).max() > 0.1


def test_parallel_pairs_distil_under_10_percent(tmp_path):
  teacher, params = tiny_teacher()
  edits = graft.parse_plan(ALL_PAIRS, teacher)
  student, student_params = graft.graft(teacher, params, edits, jax.random.key(0))
  sites = graft.sites(edits)
  assert sites == [(0, "pair"), (1, "pair")]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 8, 8, 4)).astype(np.float32)
  y = rng.integers(0, 10, 256).astype(np.int32)
  data = ArrayIterator({"x": x[:192], "y": y[:192]}, 16, seed=0)
  heldout = [{"x": x[192 + 32 * i: 224 + 32 * i], "y": y[192 + 32 * i: 224 + 32 * i]} for i in range(2)]
  evaluate = jax.jit(lambda s, b, k: distill.relative_errors(DiT(teacher), student, params, s, b, k, sites, False))
  start = distill.scion_params(student_params, sites)
  before = {k: np.mean([float(evaluate(start, b, jax.random.key(1000 + n))[k]) for n, b in enumerate(heldout)])
            for k in ("blocks_0/pair", "blocks_1/pair")}
  config = distill.default_config()
  config.update(dict(steps=120, batch_size=16, lr=3e-3, lr_milestones=(60, 90), log_every=1000,
                     checkpoint_every=1000, mesh=dict(data=-1, fsdp=1)))
  assert config.loss.pair == "l1"
  scions, errors = distill.run_distill(config, DiT(teacher), params, student, student_params, sites, data, heldout,
                                       tmp_path / "run")
  assert set(errors) == set(before)
  for k in errors:  # a non-trivial start (the pair is not the sequential pair), then at least halved
    assert before[k] > 0.1 and errors[k] < 0.1 and errors[k] < 0.5 * before[k], (before, errors)
  assert set(scions["blocks_0"]) == {"block_0", "block_1", "merge"}
  # Stage 2 starts from the stage-1 export: the plan with init = that folder puts the trained pairs in place.
  folder = distill.save_scions(tmp_path / "stage1", scions, errors)
  again = graft.parse_plan([dict(kind="parallel_pairs", layers="all", init=str(folder))], teacher)
  _, loaded = graft.graft(teacher, params, again, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, loaded["blocks_1"], scions["blocks_1"])
  assert loaded["final_layer"] is params["final_layer"]


def test_dit_xl2_depth_to_width_adds_a_merge_per_pair():
  teacher = dit_config("DiT-XL/2")
  student = graft.student_config(teacher, graft.parse_plan(ALL_PAIRS, teacher))
  s = graft.summary(teacher, student)
  d, n = 1152, 256
  assert student.depth == 14 and len(s["rows"]) == 14
  assert s["params_teacher"] == 674_834_720
  assert s["params_student"] - s["params_teacher"] == 14 * (2 * d * d + d) == 37_175_040
  assert s["params_student"] == 712_009_760
  assert s["flops_student"] - s["flops_teacher"] == 14 * 2 * n * 2 * d * d
  row = s["rows"][3]
  assert row["layer"] == "6+7" and row["params_after"] - row["params_before"] == 2 * d * d + d


def test_config_json_round_trip():
  teacher = dit_config("DiT-S/2", depth=6, hidden_size=D, num_heads=2)
  student = graft.student_config(teacher, graft.parse_plan([dict(kind="parallel_pairs", layers=[[0, 2], [4, 6]])],
                                                           teacher))
  assert [type(l).__name__ for l in student.layers] == ["ParallelPairSpec", "LayerSpec", "LayerSpec",
                                                        "ParallelPairSpec"]
  assert student.first_block(3) == 4 and student.num_pairs == 2
  d = json.loads(student.dumps())
  assert d["layers"][0]["kind"] == "parallel_pair" and set(d["layers"][1]) == {"attn", "mlp"}  # plain JSON as before
  assert DiTConfig.from_json(d) == student
  assert DiTConfig.from_json(json.loads(teacher.dumps())) == teacher
  with pytest.raises(ValueError, match="unknown layer kind"):
    DiTConfig.from_json({**d, "layers": [{"kind": "triple"}]})


def test_pair_layers_and_site_numbering():
  assert graft.parse_pairs("all", 28) == tuple(range(0, 28, 2))
  assert graft.parse_pairs([[0, 4], [10, 12]], 28) == (0, 2, 10)
  assert graft.parse_pairs([6, 2], 28) == (2, 6)
  teacher = dit_config("DiT-XL/2")
  edits = graft.parse_plan([dict(kind="parallel_pairs", layers=[[0, 4], [10, 12]])], teacher)
  assert graft.sites(edits) == [(0, "pair"), (1, "pair"), (8, "pair")]  # student layers: each pair saves one
  student = graft.student_config(teacher, edits)
  assert student.depth == 25 and student.first_block(8) == 10 and student.layers[9] == teacher.layers[12]


@pytest.mark.parametrize("entry,message", [
    (dict(kind="parallel_pairs", layers=[[0, 3]]), "even, positive"),
    (dict(kind="parallel_pairs", layers=[27]), "do not fit"),
    (dict(kind="parallel_pairs", layers=[2, 3]), "overlaps"),
    (dict(kind="parallel_pairs", layers="odd"), "pair layers must be"),
    (dict(kind="parallel_pairs", layers="all", init="fresh"), "init of parallel pairs"),
    (dict(kind="parallel_pairs", operator="mha"), "unknown field"),
    (dict(kind="triples"), "kind must be one of"),
])
def test_invalid_pair_plans_fail_with_one_sentence(entry, message):
  with pytest.raises(graft.PlanError, match=message) as e:
    graft.parse_plan([entry], dit_config("DiT-XL/2"))
  assert "\n" not in str(e.value)


def test_pairs_do_not_mix_with_operator_edits():
  teacher = dit_config("DiT-XL/2")
  with pytest.raises(graft.PlanError, match="cannot also swap operators"):
    graft.parse_plan([dict(kind="parallel_pairs", layers=[0]), dict(site="attn", layers=[5], operator="swa")], teacher)
  with pytest.raises(graft.PlanError, match="already edited"):
    graft.parse_plan([dict(kind="parallel_pairs", layers=[0]), dict(site="attn", layers=[1], operator="swa")], teacher)
  with pytest.raises(graft.PlanError, match="already edited"):
    graft.parse_plan([dict(kind="parallel_pairs", layers=[0]), dict(kind="parallel_pairs", layers=[[0, 4]])], teacher)
  student = graft.student_config(teacher, graft.parse_plan(ALL_PAIRS, teacher))
  with pytest.raises(graft.PlanError, match="already has parallel pairs"):
    graft.parse_plan(ALL_PAIRS, student)
  with pytest.raises(graft.PlanError, match="is a parallel pair"):
    graft.parse_plan([dict(site="attn", layers=[1], operator="swa")], student)


def test_paper_config_and_shrunk_run_end_to_end(tmp_path):
  c = load_config("dit_xl2_parallel")
  assert tuple(c.finetune.lr_milestones) == (75_000, 150_000) and c.distill.loss.pair == "l1"
  assert graft.sites(graft.parse_plan(c.graft, dit_config("DiT-XL/2")))[-1] == (13, "pair")
  args = [f"--config={ROOT}/configs/dit_xl2_parallel.py:shrink=1", f"--workdir={tmp_path}/run"]
  proc = run_main(*args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  for name in ("graft_summary.md", "stage1/results.json", "student/config.json", "samples.png", "samples.npz"):
    assert (run / name).exists(), name
  errors = json.loads((run / "stages" / "distill.json").read_text())["heldout_relative_error"]
  assert set(errors) == {"blocks_0/pair", "blocks_1/pair"}
  student = json.loads((run / "student" / "config.json").read_text())
  assert [layer["kind"] for layer in student["layers"]] == ["parallel_pair", "parallel_pair"]
