"""Checkpoint round trips: resuming mid-run matches an uninterrupted run, and any mesh restores any other's save."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

from graft_jax.train import partition
from graft_jax.train.checkpoint import Checkpointer
# The tiny MLP + adamw setup is shared with the partition tests so both exercise the same state tree.
from test_partition import MIN_SIZE, init_on, init_state, single_device_mesh, train

EXTRA = {"stage": "stage1", "data_position": {"epoch": 1, "index": 4096}, "lr": 1e-4,
         "layers": [0, 3, 7], "ema": True, "teacher": None}


@pytest.fixture(scope="module")
def mesh():
  return partition.make_mesh({"data": 2, "fsdp": 4})


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_matches_uninterrupted_run(mesh, tmp_path):
  straight, straight_losses = train(mesh, *init_on(mesh), steps=range(4))

  first_half, _ = train(mesh, *init_on(mesh), steps=range(2))
  with Checkpointer(tmp_path) as checkpointer:
    assert checkpointer.save(2, first_half, EXTRA)
  del first_half

  # A restart: new manager, new state objects from another seed, which the restore must overwrite entirely.
  fresh, shardings = init_on(mesh, seed=1)
  with Checkpointer(tmp_path) as checkpointer:
    assert checkpointer.latest_step() == 2
    restored, extra = checkpointer.restore(target_state=fresh, target_shardings=shardings)
  assert extra == EXTRA
  assert int(restored["step"]) == 2
  assert restored["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
  resumed, resumed_losses = train(mesh, restored, shardings, steps=range(2, 4))

  assert resumed_losses == straight_losses[2:]
  assert_trees_equal(resumed, straight)


def test_restore_onto_other_meshes(mesh, tmp_path):
  state, _ = init_on(mesh)
  state, _ = train(mesh, state, partition.param_shardings(mesh, state, min_size=MIN_SIZE), steps=range(1))
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, state)
    abstract = jax.eval_shape(init_state, jax.random.key(0))

    one_device = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
    on_one, extra = checkpointer.restore(1, target_state=abstract, target_shardings=one_device)
    assert extra == {}
    assert_trees_equal(on_one, state)
    assert on_one["params"]["Dense_0"]["kernel"].devices() == {jax.devices()[0]}

    single = single_device_mesh()
    on_mesh, _ = checkpointer.restore(1, target_state=abstract,
                                      target_shardings=partition.param_shardings(single, abstract))
    assert_trees_equal(on_mesh, state)

    all_fsdp = partition.make_mesh({"fsdp": -1})
    on_fsdp, _ = checkpointer.restore(target_state=abstract,
                                      target_shardings=partition.param_shardings(all_fsdp, abstract,
                                                                                 min_size=MIN_SIZE))
    assert_trees_equal(on_fsdp, state)
    kernel = on_fsdp["params"]["Dense_0"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 8)


def test_step_bookkeeping(tmp_path):
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as checkpointer:
    assert checkpointer.latest_step() is None
    saved = [checkpointer.save(step, state, {"step": step}) for step in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    assert checkpointer.all_steps() == [4, 6]
    # The last step of a run is saved even off the interval.
    assert checkpointer.save(7, state, {"step": 7}, force=True)
    assert checkpointer.all_steps() == [6, 7]
    target = {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}
    sharding = {"w": SingleDeviceSharding(jax.devices()[0])}
    restored, extra = checkpointer.restore(6, target_state=target, target_shardings=sharding)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert extra == {"step": 6}


def test_missing_checkpoint_errors(tmp_path):
  target = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=SingleDeviceSharding(jax.devices()[0]))}
  with Checkpointer(tmp_path) as checkpointer:
    with pytest.raises(FileNotFoundError, match="no checkpoint of any step in"):
      checkpointer.restore(target_state=target)
    checkpointer.save(1, {"w": np.ones(2, np.float32)})
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .*\[1\]"):
      checkpointer.restore(5, target_state=target)
    # Another architecture's checkpoint: orbax names the mismatched leaf.
    with pytest.raises(ValueError, match="stored shape"):
      wrong_shape = jax.ShapeDtypeStruct((3,), np.float32, sharding=target["w"].sharding)
      checkpointer.restore(1, target_state={"w": wrong_shape})
    with pytest.raises(ValueError, match="MISSING"):
      checkpointer.restore(1, target_state={"v": target["w"]})


def test_interrupted_save_is_not_a_checkpoint(tmp_path):
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, {"w": np.ones(2, np.float32)})
  # A complete save leaves only the renamed step directory behind.
  assert os.listdir(tmp_path) == ["1"]
  # What a crash mid-save leaves: a temporary directory that must never be taken for step 2.
  os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1700000000" / "state")
  with Checkpointer(tmp_path) as checkpointer:
    assert checkpointer.all_steps() == [1]
    assert checkpointer.latest_step() == 1
