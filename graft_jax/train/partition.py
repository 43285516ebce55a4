"""Device mesh, FSDP sharding rules and sharded jit helpers shared by every trainer.

The mesh always has the axes ("data", "fsdp"). Batches are split over both axes; weights (and optimizer states,
which mirror their shapes) are split over "fsdp" only, so a run with fsdp=1 is plain data parallelism.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES

Rules = Sequence[tuple[str, PartitionSpec]]


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: all); one size may be -1, meaning the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(mesh_config.keys()) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh axes {unknown} are unknown; the mesh axes are {list(MESH_AXES)}.")
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at most one -1.")
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes and len(devices) % known == 0:
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh sizes {dict(mesh_config)} do not multiply to the {len(devices)} devices available.")
  # create_device_mesh orders devices along the physical interconnect (TPU torus, NVLink islands).
  device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  # Auto axes let XLA propagate shardings through the step, as big_vision relies on.
  return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def maybe_initialize_distributed(config: Mapping[str, Any] | None = None) -> bool:
  """Starts jax.distributed when the config (a run's `config.distributed`) or the JAX_* environment asks for it;
  True if it was started now.

  A coordinator address (config.coordinator_address or JAX_COORDINATOR_ADDRESS) asks for it, with num_processes and
  process_id from the config or JAX_NUM_PROCESSES / JAX_PROCESS_ID; so does config.auto=True, which leaves them to
  JAX's cluster auto-detection (Cloud TPU pods, SLURM, Open MPI). Must run before anything touches a device. On CPU
  the processes exchange data through gloo, JAX's default CPU collectives.
  """
  config = {} if config is None else config
  if jax.distributed.is_initialized():
    return False
  settings = {
      "coordinator_address": _setting(config, "coordinator_address", "JAX_COORDINATOR_ADDRESS"),
      "num_processes": _setting(config, "num_processes", "JAX_NUM_PROCESSES"),
      "process_id": _setting(config, "process_id", "JAX_PROCESS_ID"),
  }
  if not (config.get("auto") or settings["coordinator_address"]):
    return False
  # Environment values are strings; jax.distributed insists on ints.
  for key in ("num_processes", "process_id"):
    if settings[key] is not None:
      settings[key] = int(settings[key])
  jax.distributed.initialize(**settings)
  return True


def _setting(config: Mapping[str, Any], key: str, env_var: str) -> Any:
  value = config.get(key)
  return os.environ.get(env_var) if value is None else value


def tree_paths(tree: Any) -> list[str]:
  """The "/"-joined key path of every leaf, in tree_flatten order (what sharding rules match against)."""
  return ["/".join(_key_name(key) for key in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**14) -> PartitionSpec:
  """Shards the largest dimension that fsdp_size divides, for leaves of at least min_size elements."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  # Largest first; among equal sizes the later axis, which is the output axis of a Dense kernel.
  for axis in sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True):
    if shape[axis] % fsdp_size == 0:
      return PartitionSpec(*([None] * axis + ["fsdp"]))
  return PartitionSpec()


def param_shardings(mesh: Mesh, abstract_tree: Any, rules: Rules = (), min_size: int = 2**14) -> Any:
  """A NamedSharding for every leaf of any pytree (params, optimizer state, EMA, ...).

  `rules` are (regex, PartitionSpec) pairs searched in order against each leaf's "/"-joined path; the first match
  wins over the FSDP default. Optimizer moments carry their parameter's path inside theirs, so one rule covers both.
  """
  leaves, treedef = jax.tree_util.tree_flatten(abstract_tree)
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
  fsdp_size = mesh.shape["fsdp"]
  specs = []
  for path, leaf in zip(tree_paths(abstract_tree), leaves):
    shape = np.shape(leaf)
    spec = next((spec for pattern, spec in compiled if pattern.search(path)), None)
    if spec is None:
      spec = fsdp_spec(shape, fsdp_size, min_size)
    elif len(spec) > len(shape):
      raise ValueError(f"sharding rule {spec} has more axes than the leaf {path} of shape {tuple(shape)}.")
    specs.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(treedef, specs)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh; applies to every leaf of a batch."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch(mesh: Mesh, batch_size: int) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh "
                     f"{dict(mesh.shape)}.")


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """This process's part of a batch (numpy leaves) -> global arrays split over the mesh.

  Each process feeds only the rows its own devices hold; on one host this is a device_put.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, rows), batch)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args: Any, rules: Rules = (),
                 min_size: int = 2**14) -> tuple[Any, Any]:
  """Runs init_fn(*args) so that every output leaf is created directly in its shard; returns (state, shardings).

  The shardings come from the shapes alone (jax.eval_shape), so no weight is ever materialised whole on one device.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(mesh, abstract, rules, min_size)
  # Inputs (rng keys, dummy batches) may be committed to another device; replicating them puts them on the mesh.
  args = jax.device_put(args, replicated(mesh))
  state = jax.jit(init_fn, out_shardings=shardings)(*args)
  return state, shardings


def jit_step(step_fn: Callable[..., tuple[Any, Any]], state_shardings: Any, mesh: Mesh, donate: bool = True,
             extra_shardings: Sequence[Any] = ()) -> Callable[..., tuple[Any, Any]]:
  """jit of step_fn(state, batch, *extra) -> (state, metrics) with the state kept in its shardings.

  The batch is split over the mesh, metrics come back replicated, and `extra_shardings` gives one sharding (tree)
  per further argument (an rng key, teacher params). Donating the state lets XLA update it in place.
  """
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_sharding(mesh), *extra_shardings),
      out_shardings=(state_shardings, replicated(mesh)),
      donate_argnums=(0,) if donate else (),
  )
