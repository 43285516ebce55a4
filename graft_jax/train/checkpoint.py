"""Training checkpoints: a pytree of arrays plus JSON metadata per step, restorable onto any mesh.

Each step directory holds two orbax items: "state" (params, optimizer state, EMA, rng key data: any pytree of
arrays) and "extra" (JSON: data position, stage name, config). Orbax writes a step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an interrupted save never looks like a checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

ITEMS = ("state", "extra")


class Checkpointer:
  """Keeps the latest `max_to_keep` checkpoints of one run, written every `save_interval_steps` steps."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, save_interval_steps: int = 1):
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.AnySavePolicy([
            checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            # A preempted job (TPU maintenance, SLURM requeue) saves wherever it stands.
            checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=checkpoint_managers.LatestN(max_to_keep),
        # Saves block until the step is on disk: a caller may exit or restore right after save() returns.
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Writes `step` if it is due (or `force`, e.g. the last step); True if it was written."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra or {})))
    saved = self._manager.save(step, args=args, force=force)
    self._manager.wait_until_finished()
    return saved

  def restore(self, step: int | None = None, *, target_state: Any,
              target_shardings: Any = None) -> tuple[Any, dict[str, Any]]:
    """(state, extra) of `step` (default: the latest), laid out as `target_shardings` asks.

    `target_state` gives the tree structure, shapes and dtypes (arrays or jax.ShapeDtypeStruct); the shardings
    default to its leaves' own, so a checkpoint written on any mesh loads onto the current one.
    """
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      wanted = "any step" if step is None else f"step {step}"
      raise FileNotFoundError(f"no checkpoint of {wanted} in {self.directory} (steps there: {steps}).")
    if target_shardings is None:
      target_shardings = jax.tree.map(lambda leaf: leaf.sharding, target_state)
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                            target_state, target_shardings)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored.state, restored.extra

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
