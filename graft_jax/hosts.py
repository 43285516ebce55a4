"""What a run over several processes (hosts) needs beyond the sharded step: one writer, barriers, host-side copies.

Every process runs the same program on its own devices; jax.distributed joins them (partition.
maybe_initialize_distributed). Checkpoints of the train state go through orbax's CheckpointManager, which coordinates
the processes itself. Everything else a run writes (reports, exports, samples, stage markers) is written by process
0 alone, and a barrier after each stage makes those files visible before any process reads them. The workdir must be
one folder every process sees (a shared file system); with one process all of this reduces to plain calls.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def is_writer() -> bool:
  """True in the one process that writes the run's files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (no-op with one process); `name` must be the same string in all."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
  """A tree of (possibly sharded, possibly multi-host) arrays as numpy arrays in this process, whole."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  # Leaves split over other hosts' devices cannot be read locally; gathering them is a collective every process joins.
  return multihost_utils.process_allgather(tree, tiled=True)


def local_checkpointer() -> ocp.StandardCheckpointer:
  """An orbax checkpointer confined to this process, for host-side trees (exports, converted models).

  The default one expects every process to join each save and load; an export written by process 0 alone, or a
  model that each process loads for itself, would wait at its barriers for processes that never come.
  """
  me = jax.process_index()
  return ocp.StandardCheckpointer(
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))
