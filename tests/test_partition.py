"""Mesh construction, FSDP sharding rules, and a sharded train step against the same step on one device."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from graft_jax.train import partition

DIM, HIDDEN, BATCH = 16, 64, 16
# Kernels (16*64 elements) are large enough to shard; biases are not.
MIN_SIZE = 512


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    hidden = nn.gelu(nn.Dense(HIDDEN)(x))
    return nn.Dense(DIM)(hidden)


MODEL = MLP()
OPTIMIZER = optax.adamw(1e-2, weight_decay=0.1)


def init_state(rng):
  params = MODEL.init(rng, jnp.zeros((1, DIM)))["params"]
  return {"params": params, "opt_state": OPTIMIZER.init(params), "step": jnp.zeros((), jnp.int32)}


def train_step(state, batch):
  def loss_fn(params):
    return jnp.mean((MODEL.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": loss}


def batch(index):
  rng = np.random.default_rng(index)
  x = rng.standard_normal((BATCH, DIM), dtype=np.float32)
  return {"x": x, "y": np.sin(x[:, ::-1]).copy()}


def init_on(mesh, seed=0):
  return partition.sharded_init(init_state, mesh, jax.random.key(seed), min_size=MIN_SIZE)


def train(mesh, state, shardings, steps):
  """Runs the given batch indices; returns the final state and the losses."""
  step_fn = partition.jit_step(train_step, shardings, mesh)
  losses = []
  for index in steps:
    state, metrics = step_fn(state, batch(index))
    losses.append(float(metrics["loss"]))
  return state, losses


def single_device_mesh():
  return partition.make_mesh({"data": -1}, devices=jax.devices()[:1])


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


def test_fsdp_step_matches_single_device():
  mesh = partition.make_mesh({"data": 2, "fsdp": 4})
  sharded, losses = train(mesh, *init_on(mesh), steps=range(3))
  one = single_device_mesh()
  reference, reference_losses = train(one, *init_on(one), steps=range(3))
  np.testing.assert_allclose(losses, reference_losses, atol=1e-5, rtol=0)
  assert max_abs_diff(sharded["params"], reference["params"]) < 1e-5
  assert losses[-1] < losses[0]
  assert int(sharded["step"]) == 3
  # The state stays in its FSDP layout across steps: largest axis split four ways, small leaves whole.
  kernel = sharded["params"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (DIM, HIDDEN // 4)
  assert sharded["params"]["Dense_1"]["kernel"].sharding.spec == P("fsdp")
  assert sharded["opt_state"][0].mu["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
  assert sharded["params"]["Dense_0"]["bias"].sharding.spec == P()
  assert sharded["opt_state"][0].count.sharding.spec == P()


def test_batch_and_metrics_shardings():
  mesh = partition.make_mesh({"data": 2, "fsdp": 4})
  assert partition.batch_sharding(mesh).spec == P(("data", "fsdp"))
  state, shardings = init_on(mesh)
  _, metrics = partition.jit_step(train_step, shardings, mesh)(state, batch(0))
  assert metrics["loss"].sharding.is_fully_replicated
  # Donation consumed the input state, which is what lets XLA update it in place.
  assert state["params"]["Dense_0"]["kernel"].is_deleted()


def test_jit_step_extra_arguments_without_donation():
  mesh = partition.make_mesh({"data": 2, "fsdp": 4})
  state, shardings = init_on(mesh)

  def scale_step(params, batch, factor):
    return jax.tree.map(lambda leaf: leaf * factor, params), {"total": jnp.sum(batch["x"])}

  step_fn = partition.jit_step(scale_step, shardings["params"], mesh, donate=False,
                               extra_shardings=(partition.replicated(mesh),))
  scaled, metrics = step_fn(state["params"], batch(0), jnp.float32(2.0))
  kernel = state["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(scaled["Dense_0"]["kernel"]), 2 * np.asarray(kernel))
  np.testing.assert_allclose(float(metrics["total"]), batch(0)["x"].sum(), rtol=1e-6)
  assert not kernel.is_deleted()


def test_shard_batch():
  mesh = partition.make_mesh({"data": 2, "fsdp": 4})
  rows = batch(0)
  sharded = partition.shard_batch(mesh, rows)
  assert sharded["x"].sharding == partition.batch_sharding(mesh)
  assert sharded["x"].addressable_shards[0].data.shape == (BATCH // 8, DIM)
  np.testing.assert_array_equal(np.asarray(sharded["y"]), rows["y"])


def test_regex_rules_take_precedence_and_cover_optimizer_state():
  mesh = partition.make_mesh({"data": 2, "fsdp": 4})
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  rules = [("Dense_1/kernel$", P(None, "fsdp")), ("bias$", P("fsdp"))]
  shardings = partition.param_shardings(mesh, abstract, rules, min_size=MIN_SIZE)
  assert shardings["params"]["Dense_1"]["kernel"].spec == P(None, "fsdp")
  assert shardings["opt_state"][0].nu["Dense_1"]["kernel"].spec == P(None, "fsdp")
  assert shardings["params"]["Dense_0"]["bias"].spec == P("fsdp")
  assert shardings["params"]["Dense_0"]["kernel"].spec == P(None, "fsdp")
  assert shardings["step"].spec == P()
  assert "opt_state/0/mu/Dense_1/kernel" in partition.tree_paths(abstract)
  with pytest.raises(ValueError, match="more axes than the leaf step"):
    partition.param_shardings(mesh, abstract, [("^step$", P("fsdp"))])


@pytest.mark.parametrize("shape, fsdp, expected", [
    ((64, 256), 4, P(None, "fsdp")),
    ((256, 64), 4, P("fsdp")),
    ((3, 5001), 4, P()),  # no axis divisible by 4
    ((6, 5000), 2, P(None, "fsdp")),
    ((5001, 8), 4, P(None, "fsdp")),  # the largest axis is not divisible, the next one is
    ((64, 64), 1, P()),
    ((100,), 4, P()),  # below min_size
    ((), 4, P()),
])
def test_fsdp_spec(shape, fsdp, expected):
  assert partition.fsdp_spec(shape, fsdp, min_size=2**12) == expected


def test_make_mesh_shapes():
  mesh = partition.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2}))
  assert mesh.axis_names == ("data", "fsdp")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert dict(partition.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8}
  assert sorted(d.id for d in partition.make_mesh({"data": 8}).devices.flat) == list(range(8))


@pytest.mark.parametrize("config, message", [
    ({"data": 3}, "do not multiply to the 8 devices"),
    ({"data": -1, "fsdp": 3}, "do not multiply to the 8 devices"),
    ({"data": 4, "fsdp": 4}, "do not multiply to the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 0, "fsdp": -1}, "must be positive"),
    ({"data": 2, "model": 4}, r"mesh axes \['model'\] are unknown"),
])
def test_make_mesh_errors(config, message):
  with pytest.raises(ValueError, match=message):
    partition.make_mesh(config)


def test_check_batch():
  mesh = partition.make_mesh({"data": 2, "fsdp": 4})
  partition.check_batch(mesh, 16)
  with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices of the mesh"):
    partition.check_batch(mesh, 12)


@pytest.fixture
def fake_distributed(monkeypatch):
  """Records jax.distributed.initialize calls: the real one cannot run once the test backend is up."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_distributed_not_requested(fake_distributed):
  assert not partition.maybe_initialize_distributed({})
  assert not partition.maybe_initialize_distributed(None)
  assert not partition.maybe_initialize_distributed({"auto": False, "num_processes": 2})
  assert fake_distributed == []


def test_distributed_from_config_is_idempotent(fake_distributed):
  config = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
  assert partition.maybe_initialize_distributed(config)
  assert not partition.maybe_initialize_distributed(config)
  assert fake_distributed == [config]


def test_distributed_from_environment(fake_distributed, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert partition.maybe_initialize_distributed({})
  assert fake_distributed == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


def test_distributed_auto_detect(fake_distributed):
  assert partition.maybe_initialize_distributed({"auto": True})
  assert fake_distributed == [{"coordinator_address": None, "num_processes": None, "process_id": None}]
