"""Stage-2 fine-tuning: loss terms, schedule, EMA, LoRA, teacher loss, sharded vs one device, resume, NaN guard;
the trainers' loop runs a bounded number of steps ahead of the device."""
from __future__ import annotations

import importlib.util
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P

from graft_jax.data.arrays import ArrayIterator
from graft_jax.models import DiT, dit_config
from graft_jax.operators.init import LinearWeights
from graft_jax.train import finetune, metrics, partition, state as train_state
from graft_jax.train.checkpoint import Checkpointer
from graft_jax.train.metrics import NonFiniteError

BATCH = 8


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
  """Every run_finetune traces its own step function, so identical programs would compile again and again (seconds
  each on CPU); a persistent cache keyed by the program text compiles each distinct one once."""
  saved = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                    "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def tiny_dit(**overrides):
  return dit_config("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=10, **overrides)


def perturbed(params, seed, scale=0.02):
  """Host copy of params plus noise, so the zero-initialised adaLN and output layers do something."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (np.asarray(p) + scale * rng.standard_normal(p.shape)).astype(np.float32), params)


def random_params(config, seed=0):
  """Host parameters of the right shapes drawn with NumPy: no init program to compile, and the zero-initialised
  adaLN and output layers are live from the start."""
  x, i = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: DiT(config).init(jax.random.key(0), x, i, i))["params"]
  rng = np.random.default_rng(seed)

  def draw(leaf):
    std = 0.5 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.02
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree.map(draw, shapes)


@pytest.fixture(scope="module")
def dit():
  config = tiny_dit()
  return DiT(config), random_params(config)


@pytest.fixture(scope="module")
def arrays():
  """16 latents: one smooth pattern per class plus a little noise."""
  rng = np.random.default_rng(1)
  patterns = np.tanh(rng.standard_normal((10, 8, 8, 4)).cumsum(axis=1)).astype(np.float32)
  y = np.arange(16) % 10
  return {"x": patterns[y] + 0.05 * rng.standard_normal((16, 8, 8, 4)).astype(np.float32), "y": y}


def config(**overrides):
  """Settings shared by most runs: equal settings give equal programs, which compile once."""
  cfg = finetune.default_config()
  cfg.update(steps=4, batch_size=BATCH, lr=1e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.5,
             compute_dtype="float32", log_every=1, checkpoint_every=2, fsdp_min_size=256)
  cfg.update(**overrides)
  return cfg


def one_device():
  return partition.make_mesh({"data": 1}, devices=jax.devices()[:1])


def eight_devices():
  return partition.make_mesh({"data": 2, "fsdp": 4})


def read_metrics(workdir):
  lines = (workdir / "finetune" / "metrics" / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def host(tree):
  return jax.tree.map(np.asarray, tree)


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def build_step(cfg, model, params, mesh, teacher_model=None, teacher_shardings=None):
  """A fresh state and the step exactly as run_finetune builds it (same settings: the same compiled program)."""
  optimizer = train_state.make_optimizer(cfg)
  state, shardings = train_state.create_state(cfg, params, mesh, optimizer)
  step = finetune.make_train_step(cfg, model, finetune.diffusion_for(model), optimizer, teacher_model)
  extra = () if teacher_shardings is None else (teacher_shardings,)
  return state, partition.jit_step(step, shardings, mesh, extra_shardings=extra)


def test_lr_schedule_warmup_and_halving():
  cfg = config(lr=2.0, warmup_steps=4, lr_milestones=(6, 8))
  lrs = jax.jit(jax.vmap(train_state.lr_schedule(cfg)))(jnp.arange(10))
  np.testing.assert_allclose(np.asarray(lrs), [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5], rtol=1e-6)


def test_loss_terms_against_direct_formulas():
  """The teacher term is the MSE of all 2C channels on the student's own x_t; the diffusion term is training_losses."""
  diffusion = finetune.diffusion_for(DiT(tiny_dit()))
  cfg = config(loss="diffusion+teacher", teacher_weight=0.5)
  teacher_only = config(loss="teacher", teacher_weight=0.5)
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-1, 1, (4, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 10, 500, 999], np.int32)
  student = lambda x, s: jnp.concatenate([0.3 * x, jnp.tanh(x)], -1)
  teacher = lambda x, s: jnp.concatenate([0.5 * x, -0.2 * x], -1)

  def both(x0, t, noise):
    return (finetune.finetune_losses(cfg, diffusion, student, teacher, x0, t, noise),
            finetune.finetune_losses(teacher_only, diffusion, student, teacher, x0, t, noise),
            diffusion.training_losses(student, x0, t, noise))
  terms, only, direct = jax.jit(both)(x0, t, noise)

  abar = np.asarray(diffusion.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  teacher_mse = np.mean((np.concatenate([0.3 * x_t, np.tanh(x_t)], -1) -
                         np.concatenate([0.5 * x_t, -0.2 * x_t], -1)) ** 2)
  np.testing.assert_allclose(float(terms["teacher_mse"]), teacher_mse, rtol=1e-5)
  np.testing.assert_allclose(float(terms["mse"]), np.mean(direct["mse"]), rtol=1e-6)
  np.testing.assert_allclose(float(terms["vb"]), np.mean(direct["vb"]), rtol=1e-6)
  np.testing.assert_allclose(float(terms["loss"]), np.mean(direct["loss"]) + 0.5 * teacher_mse, rtol=1e-5)
  assert float(terms["vb"]) > 0
  assert set(only) == {"loss", "teacher_mse"}
  np.testing.assert_allclose(float(only["loss"]), 0.5 * teacher_mse, rtol=1e-5)


def test_loss_decreases_and_metrics_are_written(dit, arrays, tmp_path):
  model, params = dit
  result = finetune.run_finetune(config(steps=30, checkpoint_every=30), model, params,
                                 ArrayIterator(arrays, BATCH), tmp_path, mesh=one_device())
  rows = read_metrics(tmp_path)
  assert [row["step"] for row in rows] == list(range(1, 31))
  assert {"loss", "mse", "vb", "grad_norm", "param_norm", "lr", "steps_per_sec", "eta_seconds"} <= set(rows[0])
  losses = [row["loss"] for row in rows]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  assert rows[0]["lr"] == pytest.approx(5e-4) and rows[-1]["lr"] == pytest.approx(1e-3)
  assert rows[-1]["eta_seconds"] == 0
  assert result["step"] == 30
  # Logged from the state after the step, outside the step (train_loop's state_metrics).
  norm = np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(result["params"])))
  assert rows[-1]["param_norm"] == pytest.approx(norm, rel=1e-6)
  assert max_abs_diff(result["ema"], result["params"]) > 0
  events = list((tmp_path / "finetune" / "metrics").glob("events.out.tfevents.*"))
  assert bool(events) == (importlib.util.find_spec("tensorboard") is not None)


@pytest.fixture(scope="module")
def straight_runs(dit, arrays, tmp_path_factory):
  """Four uninterrupted steps on one device and on a (data 2, fsdp 4) mesh, checkpointed at steps 2 and 4."""
  model, params = dit
  runs = {}
  for name, mesh in (("one", one_device()), ("eight", eight_devices())):
    workdir = tmp_path_factory.mktemp(f"straight_{name}")
    result = finetune.run_finetune(config(), model, params, ArrayIterator(arrays, BATCH), workdir, mesh=mesh)
    runs[name] = (workdir, result, [row["loss"] for row in read_metrics(workdir)])
  return runs


def test_eight_devices_match_one(straight_runs, dit):
  _, one, one_losses = straight_runs["one"]
  _, eight, eight_losses = straight_runs["eight"]
  np.testing.assert_allclose(eight_losses, one_losses, atol=1e-5, rtol=0)
  assert max_abs_diff(eight["params"], one["params"]) < 1e-5
  assert max_abs_diff(eight["ema"], one["ema"]) < 1e-5
  assert max_abs_diff(eight["params"], dit[1]) > 1e-4
  # Weights and Adam moments stay in their FSDP layout through the donated steps.
  kernel = eight["state"]["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, 128 // 4)
  mu = eight["state"]["opt_state"][1][0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == P(None, "fsdp")


def resume_from(source_workdir, step, workdir):
  """A workdir holding only `source_workdir`'s checkpoint of `step`: a run that was stopped there."""
  checkpoints = workdir / "finetune" / "checkpoints"
  shutil.copytree(source_workdir / "finetune" / "checkpoints" / str(step), checkpoints / str(step))
  return workdir


def test_resume_equals_uninterrupted_run(straight_runs, dit, arrays, tmp_path):
  workdir, straight, straight_losses = straight_runs["one"]
  model, params = dit
  other_start = perturbed(params, seed=5)  # a resumed run must not depend on the params it is handed
  resumed = finetune.run_finetune(config(), model, other_start, ArrayIterator(arrays, BATCH),
                                  resume_from(workdir, 2, tmp_path), mesh=one_device())
  assert [row["loss"] for row in read_metrics(tmp_path)] == straight_losses[2:]
  assert_trees_equal(host(resumed["state"]), host(straight["state"]))


def test_restore_eight_devices_onto_one(straight_runs, dit, arrays, tmp_path):
  workdir, _, eight_losses = straight_runs["eight"]
  _, one, _ = straight_runs["one"]
  model, params = dit
  resumed = finetune.run_finetune(config(), model, params, ArrayIterator(arrays, BATCH),
                                  resume_from(workdir, 2, tmp_path), mesh=one_device())
  np.testing.assert_allclose([row["loss"] for row in read_metrics(tmp_path)], eight_losses[2:], atol=1e-5, rtol=0)
  assert max_abs_diff(resumed["params"], one["params"]) < 1e-5
  assert resumed["state"]["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].devices() == {jax.devices()[0]}


def test_ema_follows_dit_update(dit, arrays):
  model, params = dit
  mesh = one_device()
  state, step = build_step(config(), model, params, mesh)
  data = ArrayIterator(arrays, BATCH)
  weights, emas = [host(state["params"])], [host(state["ema"])]
  for _ in range(2):
    state, _ = step(state, partition.shard_batch(mesh, next(data)))
    weights.append(host(state["params"]))
    emas.append(host(state["ema"]))
  assert_trees_equal(emas[0], weights[0])
  assert max_abs_diff(weights[1], weights[0]) > 1e-4
  d = 0.5
  p0, p1, p2 = (jax.tree.map(lambda w: w.astype(np.float64), w) for w in weights)
  expected1 = jax.tree.map(lambda a, b: d * a + (1 - d) * b, p0, p1)
  expected2 = jax.tree.map(lambda a, b, c: d * d * a + d * (1 - d) * b + (1 - d) * c, p0, p1, p2)
  assert max_abs_diff(emas[1], expected1) < 1e-6
  assert max_abs_diff(emas[2], expected2) < 1e-6


LORA_TARGETS = {(f"blocks_{i}", site, name, "kernel") for i in (0, 1)
                for site, name in (("attn", "q"), ("attn", "k"), ("attn", "v"), ("mlp", "fc1"))}


@pytest.fixture(scope="module")
def lora_run(dit, arrays, tmp_path_factory):
  """Three LoRA steps in bfloat16 with both loss terms, the teacher being the starting model. One run (one compiled
  program) serves the LoRA and the bfloat16/teacher tests. Label dropout is 0.5: the teacher term can only vanish
  when the teacher drops the same labels as the student."""
  _, params = dit
  model = DiT(tiny_dit(class_dropout_prob=0.5))
  cfg = config(steps=3, checkpoint_every=3, compute_dtype="bfloat16", loss="diffusion+teacher", teacher_weight=0.5,
               lora_rank=2, lora_alpha=4.0, lora_targets=(r"attn/(q|k|v)/", r"mlp/fc1"))
  workdir = tmp_path_factory.mktemp("lora")
  result = finetune.run_finetune(cfg, model, params, ArrayIterator(arrays, BATCH), workdir, teacher=(model, params),
                                 mesh=one_device())
  return model, result, read_metrics(workdir)


def test_bfloat16_compute_and_teacher_loss(lora_run):
  _, result, rows = lora_run
  for row in rows:
    assert all(np.isfinite(value) for value in row.values())
    assert 0.1 < row["mse"] < 10 and row["vb"] > 0
    np.testing.assert_allclose(row["loss"], row["mse"] + row["vb"] + 0.5 * row["teacher_mse"], rtol=1e-6)
  # The first step's student is the teacher (LoRA's b starts at 0); after it they differ.
  assert rows[0]["teacher_mse"] == 0
  assert rows[1]["teacher_mse"] > 0 and rows[2]["teacher_mse"] > 0
  state = result["state"]
  assert {leaf.dtype for leaf in jax.tree.leaves((state["params"], state["lora"]))} == {jnp.dtype(jnp.float32)}
  teacher, _ = finetune.place_teacher(config(compute_dtype="bfloat16"), {"w": np.ones((4, 4), np.float32),
                                                                         "i": np.arange(3)}, one_device())
  assert teacher["w"].dtype == jnp.bfloat16 and teacher["i"].dtype == jnp.int32


def lora_interceptor(factors, scale):
  """Adds scale * (x a) b to the output of each adapted Dense (to the kernel attention applies itself): LoRA as a
  layer, independent of merge_lora."""
  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    key = tuple(context.module.path) + ("kernel",)
    if context.method_name == "__call__" and key + ("a",) in factors:
      a, b = factors[key + ("a",)], factors[key + ("b",)]
      if isinstance(context.module, LinearWeights):  # attention's and the MLP's Linears return their weights
        return out[0] + scale * a @ b, out[1]
      assert isinstance(context.module, nn.Dense)
      out = out + scale * (args[0] @ a) @ b
    return out
  return intercept


def test_lora_trains_only_factors_and_merges_on_export(lora_run, dit):
  model, result, _ = lora_run
  _, params = dit
  state = result["state"]
  assert_trees_equal(host(state["params"]), params)
  factors = traverse_util.flatten_dict(host(state["lora"]))
  assert {key[:-1] for key in factors} == LORA_TARGETS
  assert factors[("blocks_0", "attn", "q", "kernel", "a")].shape == (32, 2)
  assert all(np.abs(value).max() > 0 for key, value in factors.items() if key[-1] == "b")
  assert jax.tree.structure(state["opt_state"][1][0].mu) == jax.tree.structure(state["lora"])

  scale = 4.0 / 2
  for export, trained in ((result["params"], factors), (result["ema"], traverse_util.flatten_dict(host(state["ema"])))):
    exported = traverse_util.flatten_dict(host(export))
    for path, weight in traverse_util.flatten_dict(params).items():
      if path in LORA_TARGETS:
        expected = weight + scale * trained[path + ("a",)].astype(np.float64) @ trained[path + ("b",)]
        np.testing.assert_allclose(exported[path], expected, atol=1e-6, rtol=0)
      else:
        np.testing.assert_array_equal(exported[path], weight)

  x = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
  t, y = np.array([10, 700], np.int32), np.array([1, 7], np.int32)

  @jax.jit
  def outputs(base, merged, factors):
    with nn.intercept_methods(lora_interceptor(factors, scale)):
      adapted = model.apply({"params": base}, x, t, y)
    return adapted, model.apply({"params": merged}, x, t, y), model.apply({"params": base}, x, t, y)
  adapted, merged, plain = outputs(params, result["params"], factors)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-5, rtol=0)
  assert max_abs_diff(merged, plain) > 1e-4


class PoisonedBatches:
  """Batches of an ArrayIterator, the `bad`-th of which (1-based) holds a NaN."""

  def __init__(self, inner, bad):
    self.inner, self.bad, self.count = inner, bad, 0

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count == self.bad:
      batch["x"][0, 0, 0, 0] = np.nan
    return batch

  def state(self):
    return self.inner.state()

  def restore(self, position):
    self.inner.restore(position)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(straight_runs, dit, arrays, tmp_path):
  model, params = dit
  with pytest.raises(NonFiniteError, match=r"^finetune stopped at step 3 because loss is nan; the last good "
                                           r"checkpoint, step 2 in .*, is kept"):
    finetune.run_finetune(config(), model, params, PoisonedBatches(ArrayIterator(arrays, BATCH), bad=3), tmp_path,
                          mesh=one_device())
  with Checkpointer(tmp_path / "finetune" / "checkpoints") as checkpointer:
    assert checkpointer.all_steps() == [2]
  # The kept checkpoint is the uninterrupted run's step 2: resuming from it with clean data reproduces that run.
  resumed = finetune.run_finetune(config(), model, params, ArrayIterator(arrays, BATCH), tmp_path, mesh=one_device())
  assert_trees_equal(host(resumed["state"]), host(straight_runs["one"][1]["state"]))


def test_array_iterator_order_and_position():
  arrays = {"x": np.arange(20).reshape(10, 2), "y": np.arange(10)}
  data = ArrayIterator(arrays, 3, seed=7)
  epoch0 = np.concatenate([next(data)["y"] for _ in range(3)])
  assert len(set(epoch0)) == 9
  assert data.state() == {"epoch": 0, "index": 3}
  saved = data.state()
  ahead = [next(data) for _ in range(4)]
  np.testing.assert_array_equal(ahead[0]["x"], arrays["x"][ahead[0]["y"]])
  epoch1 = np.concatenate([batch["y"] for batch in ahead[:3]])
  assert not np.array_equal(epoch0, epoch1)
  again = ArrayIterator(arrays, 3, seed=7)
  np.testing.assert_array_equal(np.concatenate([next(again)["y"] for _ in range(3)]), epoch0)
  again.restore(saved)
  for batch in ahead:
    np.testing.assert_array_equal(next(again)["y"], batch["y"])
  with pytest.raises(ValueError, match="same number of rows"):
    ArrayIterator({"x": np.zeros(4), "y": np.zeros(5)}, 2)
  with pytest.raises(ValueError, match="batch size 11 must be between 1 and the 10 rows"):
    ArrayIterator(arrays, 11)


def test_errors_a_user_can_act_on(dit, arrays, tmp_path):
  model, params = dit
  with pytest.raises(ValueError, match="finetune loss 'l1' is unknown"):
    finetune.check_config(config(loss="l1"))
  with pytest.raises(ValueError, match="compute_dtype 'float16' is unknown"):
    finetune.check_config(config(compute_dtype="float16"))
  with pytest.raises(ValueError, match=r"^log_every must be a positive integer, got 0\.$"):
    finetune.check_config(config(log_every=0))  # would divide by zero at the first step
  with pytest.raises(ValueError, match=r"^lr must be 0 or more, got -0\.001\.$"):
    finetune.check_config(config(lr=-1e-3))
  with pytest.raises(ValueError, match="needs the teacher"):
    finetune.run_finetune(config(loss="diffusion+teacher"), model, params, ArrayIterator(arrays, BATCH), tmp_path)
  with pytest.raises(ValueError, match=r"lora_targets \['attn/nothing'\] match no Dense kernel"):
    train_state.lora_targets(params, ["attn/nothing"])
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the 8 devices"):
    finetune.run_finetune(config(batch_size=6), model, params, ArrayIterator(arrays, 6), tmp_path,
                          mesh=eight_devices())


class NoCheckpoints:
  """A checkpointer that writes nothing; with `events`, it records each save's step there."""

  def __init__(self, events: list | None = None):
    self.events = events

  def save(self, step, *args, **kwargs):
    if self.events is not None:
      self.events.append(("save", step))

  def latest_step(self):
    return None


def test_state_metrics_are_taken_at_the_log_steps_only(tmp_path):
  """train_loop evaluates state_metrics only on the steps the reporter writes; each written row has the value of
  the state after its own step, while the step metrics are means over the steps since the last row."""
  taken = []

  def state_metrics(state):
    taken.append(int(state["step"]))
    return {"double": 2.0 * state["step"]}

  def step_fn(state, batch):
    step = state["step"] + 1
    return {"step": step}, {"loss": jnp.float32(step)}

  data = ArrayIterator({"x": np.zeros((8, 1), np.float32)}, 8)
  with metrics.Reporter(tmp_path, 7, 3, "loop") as reporter:
    metrics.train_loop(step_fn, {"step": 0}, data, mesh=one_device(), reporter=reporter,
                       checkpointer=NoCheckpoints(), total_steps=7, checkpoint_every=100, stage="loop",
                       state_metrics=state_metrics)
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert taken == [3, 6, 7]
  assert [(row["step"], row["loss"], row["double"]) for row in rows] == [(3, 2.0, 6.0), (6, 5.0, 12.0),
                                                                         (7, 7.0, 14.0)]


def test_the_loop_runs_at_most_in_flight_steps_ahead(tmp_path):
  """Once IN_FLIGHT later steps are dispatched, the loop waits for a step's metrics: XLA's CPU client deadlocks on a
  long queue of multi-device steps (metrics.IN_FLIGHT), and one step queued keeps an accelerator busy."""
  events = []

  class Loss(float):  # a step's metric that records when the loop waits for it
    def block_until_ready(self):
      events.append(("wait", int(self)))
      return self

  def step_fn(state, batch):
    step = state["step"] + 1
    events.append(("run", step))
    return {"step": step}, {"loss": Loss(step)}

  data = ArrayIterator({"x": np.zeros((8, 1), np.float32)}, 8)
  checkpointer = NoCheckpoints(events)
  with metrics.Reporter(tmp_path, 6, 100, "loop", checkpointer) as reporter:
    metrics.train_loop(step_fn, {"step": 0}, data, mesh=one_device(), reporter=reporter, checkpointer=checkpointer,
                       total_steps=6, checkpoint_every=100, stage="loop")
  ahead = metrics.IN_FLIGHT
  want = [("run", 1)]
  for step in range(2, 7):
    want += [("run", step)] + ([("wait", step - ahead)] if step > ahead else [])
  assert events == want + [("save", 6)]
