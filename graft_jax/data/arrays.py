"""Endless shuffled batches from in-memory arrays, with a position the trainers checkpoint and restore."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np


class ArrayIterator:
  """Batches of rows of equally long arrays, every epoch in a fresh order drawn from (seed, epoch).

  The position is (epoch, batch index in the epoch); the order depends only on it, so a restored iterator continues
  exactly where the saved one was. The last rows of an epoch that do not fill a batch are skipped in that epoch.
  """

  def __init__(self, arrays: Mapping[str, Any], batch_size: int, seed: int = 0, shuffle: bool = True):
    self._arrays = {name: np.asarray(array) for name, array in arrays.items()}
    lengths = {name: len(array) for name, array in self._arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"the arrays must have the same number of rows, got {lengths}.")
    self._rows = next(iter(lengths.values()))
    if not 0 < batch_size <= self._rows:
      raise ValueError(f"batch size {batch_size} must be between 1 and the {self._rows} rows available.")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.batches_per_epoch = self._rows // batch_size
    self._epoch, self._index = 0, 0
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self._rows)
    return np.random.default_rng([self.seed, epoch]).permutation(self._rows)

  def __iter__(self) -> ArrayIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._index == self.batches_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._epoch_order(self._epoch)
    rows = self._order[self._index * self.batch_size:(self._index + 1) * self.batch_size]
    self._index += 1
    return {name: array[rows] for name, array in self._arrays.items()}

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: Mapping[str, Any]) -> None:
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
      raise ValueError(f"data position {dict(state)} is outside this data ({self.batches_per_epoch} batches an "
                       f"epoch).")
    self._epoch, self._index = epoch, index
    self._order = self._epoch_order(epoch)


def host_iterator(arrays: Mapping[str, Any], batch_size: int, seed: int = 0, *, shuffle: bool = True,
                  process_index: int | None = None, process_count: int | None = None) -> ArrayIterator:
  """This process's part of global batches of `batch_size` rows: an ArrayIterator over its own rows.

  Process p of P takes rows p, p + P, p + 2P, ... (the first floor(N / P) * P rows, as LatentReader does), so the
  processes' batches are disjoint and their number per epoch is the same everywhere; each yields batch_size / P
  rows, which the trainers assemble into one global array. With one process this is ArrayIterator itself.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes.")
  own = {name: np.asarray(array)[process_index:len(array) // process_count * process_count:process_count]
         for name, array in arrays.items()}
  return ArrayIterator(own, batch_size // process_count, seed, shuffle)
