"""What every trainer's loop shares: metric writing (clu TensorBoard writer, metrics.jsonl, a progress log line with
steps/s and ETA), the NaN guard, and the loop itself.

Step metrics stay on the device until a log or checkpoint step, so between those the host waits for the device only
to stay IN_FLIGHT steps ahead of it; a non-finite value in any of them stops the run before the next checkpoint
could store it.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from graft_jax.train import partition
from graft_jax.train.checkpoint import Checkpointer


class NonFiniteError(FloatingPointError):
  """A training metric became NaN or infinite."""


class DataSource(Protocol):
  """What the loop reads: an iterator of process-local numpy batches whose position can be saved and restored."""

  def __next__(self) -> Mapping[str, np.ndarray]: ...

  def state(self) -> Mapping[str, Any]: ...

  def restore(self, state: Mapping[str, Any]) -> None: ...


def read_metrics(path: str | pathlib.Path) -> list[dict[str, float]]:
  """The rows a Reporter wrote to metrics.jsonl (none when the file does not exist)."""
  path = pathlib.Path(path)
  return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def summary_writer(logdir: pathlib.Path):
  """clu's TensorBoard writer (asynchronous), or None where tensorflow or tensorboard, which it needs, is missing."""
  missing = [name for name in ("tensorflow", "tensorboard") if importlib.util.find_spec(name) is None]
  if missing:
    logging.warning("TensorBoard summaries are off (%s not installed); metrics go to %s and the log.",
                    " and ".join(missing), logdir / "metrics.jsonl")
    return None
  # Imported here: it loads tensorflow, seconds of start-up that runs without summaries need not pay.
  import tensorflow as tf
  from clu import metric_writers
  # TensorFlow only writes event files here; left alone it would reserve GPU memory that JAX needs. Once TF's runtime
  # is up (a tf.data pipeline started first) the devices can no longer change, and that pipeline owns this choice.
  with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(logdir)))


def format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
  """Steps per second over the last interval and the time left at that rate."""

  def __init__(self, total_steps: int, step: int):
    self.total_steps = total_steps
    self._step, self._time = step, time.monotonic()

  def update(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return {"steps_per_sec": rate, "eta_seconds": (self.total_steps - step) / rate}


class Reporter:
  """Collects step metrics; every `every` steps (and at the last) writes their means, with steps/s and ETA, to
  TensorBoard, `<logdir>/metrics.jsonl` and the log. Only process 0 writes; every process checks for NaN."""

  def __init__(self, logdir: str | pathlib.Path, total_steps: int, every: int, name: str,
               checkpointer: Checkpointer | None = None):
    self.logdir = pathlib.Path(logdir)
    self.total_steps, self.every, self.name = total_steps, every, name
    self._checkpointer = checkpointer
    self._writes = jax.process_index() == 0
    self._pending: list[tuple[int, Any]] = []
    self._rows: list[dict[str, float]] = []
    self._progress: Progress | None = None
    self._summary = None
    if self._writes:
      self.logdir.mkdir(parents=True, exist_ok=True)
      self._summary = summary_writer(self.logdir)

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Records the metrics of `step` (the number of updates done); writes when a log step is reached."""
    if self._progress is None:
      # Started after the first step returns, so its compilation does not count against steps/s.
      self._progress = Progress(self.total_steps, step - 1)
    self._pending.append((step, metrics))
    if self.due(step):
      self.write(step)

  def due(self, step: int) -> bool:
    """Whether `add(step, ...)` writes: every `every` steps and at the last."""
    return step % self.every == 0 or step == self.total_steps

  def check(self) -> None:
    """Fetches the recorded metrics; raises NonFiniteError at the first NaN or infinity among them."""
    fetched = jax.device_get([metrics for _, metrics in self._pending])
    for (step, _), values in zip(self._pending, fetched):
      # The loss first: it is the value a user recognises, and it goes bad in the same step as the rest.
      for name, value in sorted(values.items(), key=lambda item: item[0] != "loss"):
        if not np.all(np.isfinite(value)):
          raise NonFiniteError(self._stop_message(step, name, value))
      self._rows.append({name: float(value) for name, value in values.items()})
    self._pending = []

  def write(self, step: int) -> None:
    self.check()
    if not self._rows:
      return
    # A metric only some steps have (`train_loop`'s state_metrics) is the mean over those steps.
    names = dict.fromkeys(name for row in self._rows for name in row)
    scalars = {name: float(np.mean([row[name] for row in self._rows if name in row])) for name in names}
    scalars |= self._progress.update(step)
    self._rows = []
    if not self._writes:
      return
    if self._summary is not None:
      self._summary.write_scalars(step, scalars)
    with open(self.logdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("steps_per_sec", "eta_seconds"))
    logging.info("%s step %d/%d (%.1f%%): %s | %.2f steps/s, ETA %s", self.name, step, self.total_steps,
                 100 * step / self.total_steps, shown, scalars["steps_per_sec"],
                 format_seconds(scalars["eta_seconds"]))

  def _stop_message(self, step: int, name: str, value: Any) -> str:
    last = None if self._checkpointer is None else self._checkpointer.latest_step()
    kept = ("no checkpoint had been written yet" if last is None else
            f"the last good checkpoint, step {last} in {self._checkpointer.directory}, is kept")
    return (f"{self.name} stopped at step {step} because {name} is {value}; {kept} (lower the learning rate or "
            f"check the input data).")

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()

  def __enter__(self) -> Reporter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


# Steps dispatched ahead of the device: one queued behind the running one keeps an accelerator busy. More buy
# nothing, and XLA's CPU client (jaxlib 0.10) deadlocks on them with several devices: every thread of its
# execution pool ends up holding a later step that waits for its inputs, while the running step's all-reduce waits
# for a device whose share of it has no thread left, until XLA aborts the process (seen on 2 cores with 8 fake
# devices, a 120-step run that logged once, in about a quarter of runs under load).
IN_FLIGHT = 2


def train_loop(step_fn: Callable[..., tuple[Any, Any]], state: Any, data: DataSource, *, mesh: Mesh,
               reporter: Reporter, checkpointer: Checkpointer, total_steps: int, checkpoint_every: int, stage: str,
               args: tuple = (), state_metrics: Callable[[Any], Mapping[str, jax.Array]] | None = None) -> Any:
  """Runs `step_fn(state, batch, *args) -> (state, metrics)` from state["step"] to `total_steps`, at most IN_FLIGHT
  steps ahead of the device.

  Checkpoints every `checkpoint_every` steps and at the end, each with the data position (extra["data"]), and only
  after the metrics of every step before it were found finite. Returns the final state.

  `state_metrics(state)` adds metrics of the state itself to the steps the reporter writes, and only to those: a
  parameter norm is a pass over every parameter. In the step, XLA fused it into the optimizer's update, whose
  kernels then took 10.2 ms rather than 8.3 for DiT-XL/2 on an H200, for a number read once a log step.
  """
  in_flight = collections.deque()
  for step in range(int(state["step"]) + 1, total_steps + 1):
    state, metrics = step_fn(state, partition.shard_batch(mesh, next(data)), *args)
    in_flight.append(metrics)
    if len(in_flight) > IN_FLIGHT:
      jax.block_until_ready(in_flight.popleft())
    if state_metrics is not None and reporter.due(step):
      # Dispatched after that wait, so the device's queue is never longer than IN_FLIGHT + 1 programs, as before.
      metrics = {**metrics, **state_metrics(state)}
    reporter.add(step, metrics)
    if step % checkpoint_every == 0 or step == total_steps:
      reporter.check()
      checkpointer.save(step, state, {"stage": stage, "data": dict(data.state())}, force=True)
  return state

