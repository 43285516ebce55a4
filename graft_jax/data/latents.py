"""Latent caches on disk: a folder of .npz shards plus metadata.json, its writer, checks, loader and streaming reader.

Layout of a cache folder:
  metadata.json       format, kind ("imagenet", "synthetic" or "synthetic_pixart"), resolution, latent_shape,
                      num_classes, count, scale, arrays (the extra per-row arrays, when there are any),
                      vae {id, config, source} (None: the teacher's own latent space), the settings that made it, the
                      undecodable inputs skipped, and shards [{file, count}]
  shard-NNNNN.npz     x float32 (n, h, w, c) latents (already multiplied by the scale), y int32 (n,) labels,
                      key (n,) source names, skipped (m,) names of the inputs of this shard that did not decode,
                      and the per-row arrays metadata "arrays" names (a PixArt set: caption (n, L, C) float16
                      T5 embeddings and mask (n, L) bool; y is then the prompt's index)
A cache is built in a hidden sibling `.NAME.partial/` (each shard written under a temporary name and renamed) and
renamed to NAME when complete, so NAME never holds a half-written cache; a rerun with the same settings continues
the partial folder at its first missing shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct
import time
import zipfile
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from graft_jax.data.arrays import ArrayIterator

FORMAT = "graft_jax.latents/1"
_STANDARD = ("x", "y", "key", "skipped")  # the arrays every shard holds; any others are listed in metadata "arrays"
METADATA = "metadata.json"
PLAN = "plan.json"


class DataError(ValueError):
  """Input data a user can fix (a missing file, a cache made for other settings); the message is one sentence."""


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.npz"


def tree_digest(config: Mapping[str, Any], params: Any) -> str:
  """Identity of a model: sha256 over its config (as JSON) and every parameter's path, dtype, shape and bytes."""
  h = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode())
  leaves = sorted((jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params))
  for name, leaf in leaves:
    a = np.ascontiguousarray(leaf)
    h.update(f"{name}|{a.dtype}|{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
  return "sha256:" + h.hexdigest()[:16]


def stratified_subset(labels: Sequence[int], keys: Sequence[str], per_class: int, seed: int,
                      num_classes: int | None = None) -> np.ndarray:
  """Sorted indices of `per_class` items of every class, drawn with `seed`.

  Each class's items are ordered by key before drawing, so the subset depends on the names and labels only, not on
  the order a source lists them in (a folder and TFDS give the same subset of the same images).
  """
  labels, keys = np.asarray(labels), np.asarray(keys)
  num_classes = int(labels.max(initial=-1)) + 1 if num_classes is None else num_classes
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise DataError(f"class {c} has {len(members)} items, fewer than the {per_class} per class asked for.")
    members = members[np.argsort(keys[members], kind="stable")]
    chosen.append(members[np.random.default_rng([seed, c]).permutation(len(members))[:per_class]])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
  os.replace(tmp, path)


class ShardWriter:
  """Writes a cache shard by shard into `.NAME.partial/`; `finish` adds metadata.json and renames it to NAME.

  `plan` (JSON) names everything the shards' contents depend on; a partial folder left by a run with the same plan
  is continued (`done(i)` tells which shards exist), one with another plan is discarded.
  """

  def __init__(self, out: str | os.PathLike, plan: Mapping[str, Any]):
    self.out = pathlib.Path(out).absolute()
    if self.out.exists() and not (self.out.is_dir() and not any(self.out.iterdir())):
      raise DataError(f"{self.out} already exists and is not empty; choose a new output folder.")
    self.plan = json.loads(json.dumps(plan))
    self.partial = self.out.with_name(f".{self.out.name}.partial")
    plan_file = self.partial / PLAN
    if self.partial.exists() and (not plan_file.exists() or json.loads(plan_file.read_text()) != self.plan):
      logging.info("Discarding %s: it was started with other settings.", self.partial)
      shutil.rmtree(self.partial)
    if self.partial.exists():
      logging.info("Continuing %s (%d shards already written).", self.partial, len(self._shards()))
    else:
      self.out.parent.mkdir(parents=True, exist_ok=True)
      self.partial.mkdir()
      _write_json(plan_file, self.plan)

  def _shards(self) -> list[pathlib.Path]:
    return sorted(self.partial.glob("shard-*.npz"))

  def done(self, index: int) -> bool:
    return (self.partial / shard_name(index)).exists()

  def write(self, index: int, x: np.ndarray, y: np.ndarray, keys: Sequence[str],
            skipped: Sequence[str] = (), extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Shard `index`; `extra` holds further per-row arrays (stored as given, one row per latent)."""
    extra = dict(extra or {})
    clash = set(extra) & set(_STANDARD)
    if clash or any(len(v) != len(x) for v in extra.values()):
      raise ValueError(f"extra shard arrays must be new names with one row per latent, got {sorted(extra)}.")
    path = self.partial / shard_name(index)
    # A fixed temporary name (one writer per partial folder) keeps the umask's permissions, which mkstemp would not.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
      with open(tmp, "wb") as f:
        # Uncompressed, so a reader can memory-map each member (see _member_memmap).
        np.savez(f, x=np.asarray(x, np.float32), y=np.asarray(y, np.int32), key=np.asarray(keys, dtype=str),
                 skipped=np.asarray(skipped, dtype=str), **{k: np.asarray(v) for k, v in extra.items()})
      os.replace(tmp, path)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise

  def fill(self, metadata: Mapping[str, Any], rows: np.ndarray, shard_size: int,
           sample: Callable[[int, np.ndarray], np.ndarray], keys: Callable[[int, np.ndarray], Sequence[str]],
           extra: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None) -> pathlib.Path:
    """A generated set: shard i holds rows[i * shard_size:][:shard_size] (the labels y), its latents
    sample(i, y), names keys(first row, y) and extra(y) arrays. Shards already written are kept (a rerun resumes);
    then the folder is published."""
    starts = range(0, len(rows), shard_size)
    for index, start in enumerate(starts):
      if self.done(index):
        continue
      began = time.monotonic()
      y = rows[start:start + shard_size]
      self.write(index, sample(index, y), y, keys(start, y), extra=extra(y) if extra else None)
      logging.info("shard %d/%d: %d latents, %.2f samples/s", index + 1, len(starts), len(y),
                   len(y) / (time.monotonic() - began))
    return self.finish(metadata, len(starts))

  def finish(self, metadata: Mapping[str, Any], num_shards: int) -> pathlib.Path:
    """Records the shards 0..num_shards-1 (all must exist) and the skipped inputs, then publishes the folder."""
    shards, skipped, arrays = [], [], set()
    for i in range(num_shards):
      with np.load(self.partial / shard_name(i)) as f:
        shards.append({"file": shard_name(i), "count": int(len(f["y"]))})
        skipped.extend(str(k) for k in f["skipped"])
        arrays.update(name for name in f.files if name not in _STANDARD)
    meta = {**metadata, "format": FORMAT, "count": sum(s["count"] for s in shards), "shards": shards,
            "skipped": {"count": len(skipped), "keys": skipped}}
    if arrays:  # only then: a plain cache's metadata stays as it was
      meta["arrays"] = sorted(arrays)
    _write_json(self.partial / METADATA, meta)
    (self.partial / PLAN).unlink()
    if self.out.exists():
      self.out.rmdir()
    os.rename(self.partial, self.out)
    if skipped:
      logging.warning("%d inputs did not decode and were skipped (listed in %s): %s", len(skipped),
                      self.out / METADATA, ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return self.out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """metadata.json of a complete cache folder; DataError when `path` is none."""
  path = pathlib.Path(path)
  meta_file = path / METADATA
  if not meta_file.exists():
    partial = path.with_name(f".{path.name}.partial")
    hint = f" (an unfinished one is in {partial}: rerun the same command to complete it)" if partial.exists() else ""
    raise DataError(f"{path} is not a latent cache: it has no {METADATA}{hint}.")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != FORMAT:
    raise DataError(f"{meta_file} has format {meta.get('format')!r}; this version reads {FORMAT!r}.")
  return meta


def vae_id(meta: Mapping[str, Any]) -> str | None:
  return (meta.get("vae") or {}).get("id")


def check_latents(meta: Mapping[str, Any], path: str | os.PathLike, resolution: int | None = None,
                  vae: str | None = None) -> None:
  """Refuses a cache whose image resolution or VAE differs from the ones asked for (None: not checked).

  A synthetic cache made without naming a VAE is in its teacher's latent space and passes any VAE check.
  """
  if resolution is not None and meta["resolution"] != resolution:
    raise DataError(f"{path} holds latents of {meta['resolution']}px images but {resolution}px is asked for; "
                    f"encode a cache at {resolution}px into a new folder.")
  if vae is not None and vae_id(meta) is not None and vae_id(meta) != vae:
    raise DataError(f"{path} was encoded with VAE {vae_id(meta)} but VAE {vae} is asked for; encode a cache "
                    f"with that VAE into a new folder.")


def open_latents(path: str | os.PathLike, resolution: int | None = None, vae: str | None = None) -> dict[str, Any]:
  """The metadata of the cache at `path`, after checking it exists and matches `resolution` and `vae`."""
  meta = read_metadata(path)
  check_latents(meta, path, resolution, vae)
  return meta


def reuse_cache(out: str | os.PathLike, wanted: Mapping[str, Any]) -> bool:
  """True when `out` is a finished cache whose metadata has the `wanted` values, False when `out` is absent or
  empty; DataError when it holds anything else."""
  out = pathlib.Path(out)
  if not (out / METADATA).exists():
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
      raise DataError(f"{out} already exists and is not a latent cache; choose a new output folder.")
    return False
  meta = read_metadata(out)
  differ = [k for k, v in json.loads(json.dumps(wanted)).items() if meta.get(k) != v]
  if differ:
    raise DataError(f"{out} already holds a latent cache made with other {', '.join(differ)}; choose a new output "
                    f"folder.")
  logging.info("%s already holds these %d latents; nothing to do.", out, meta["count"])
  return True


def extra_arrays(meta: Mapping[str, Any]) -> list[str]:
  """Per-row arrays beyond x and y (a PixArt set's caption and mask); none in caches written before they existed."""
  return list(meta.get("arrays", ()))


def load_latents(path: str | os.PathLike, resolution: int | None = None,
                 vae: str | None = None) -> dict[str, np.ndarray]:
  """The whole cache in memory as {"x": float32 (N, h, w, c), "y": int32 (N,)} plus its extra per-row arrays (for
  sets that fit in RAM)."""
  meta = open_latents(path, resolution, vae)
  names = extra_arrays(meta)
  parts: dict[str, list] = {name: [] for name in ("x", "y", *names)}
  for shard in meta["shards"]:
    with np.load(pathlib.Path(path) / shard["file"]) as f:
      for name in parts:
        parts[name].append(f[name])
  shape = (0, *meta["latent_shape"])
  out = {"x": np.concatenate(parts["x"]) if parts["x"] else np.zeros(shape, np.float32),
         "y": np.concatenate(parts["y"]) if parts["y"] else np.zeros((0,), np.int32)}
  return out | {name: np.concatenate(parts[name]) for name in names if parts[name]}


def _member_memmap(path: pathlib.Path, name: str) -> np.ndarray:
  """Array `name` of an .npz as a read-only memory map (rows are read from disk when indexed); a compressed member
  (a cache not written by ShardWriter) cannot be mapped and is loaded instead."""
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(f"{name}.npy")
  if info.compress_type != zipfile.ZIP_STORED:
    with np.load(path) as f:
      return f[name]
  with open(path, "rb") as f:
    # The local file header (30 bytes, then name and extra field) precedes the member's .npy bytes.
    f.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    offset = f.tell()
  return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _labels(path: pathlib.Path) -> np.ndarray:
  with np.load(path) as f:
    return f["y"]


class LatentReader:
  """Endless batches {"x", "y"} (and the cache's extra per-row arrays) from a cache on disk, without loading it: a
  DataSource for the trainers.

  Host p of P reads only rows p, p + P, p + 2P, ... (the first floor(N / P) * P rows), so hosts read disjoint rows
  and all have the same number of batches. Within a host the order is ArrayIterator's: a fresh permutation per
  (seed, epoch), position (epoch, batch index), restorable exactly. Rows are gathered from memory-mapped shards.
  """

  def __init__(self, path: str | os.PathLike, batch_size: int, seed: int = 0, *, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None, resolution: int | None = None,
               vae: str | None = None):
    path = pathlib.Path(path)
    self.metadata = open_latents(path, resolution, vae)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise DataError(f"process index {process_index} is outside the {process_count} processes.")
    shards = [s for s in self.metadata["shards"] if s["count"]]
    self._x = [_member_memmap(path / s["file"], "x") for s in shards]
    self._extra = {name: [_member_memmap(path / s["file"], name) for s in shards]
                   for name in extra_arrays(self.metadata)}
    self._starts = np.cumsum([0] + [s["count"] for s in shards])
    self._y = np.concatenate([_labels(path / s["file"]) for s in shards] or [np.zeros((0,), np.int32)])
    per_host = len(self._y) // process_count
    rows = np.arange(process_index, per_host * process_count, process_count)
    if not 0 < batch_size <= per_host:
      raise DataError(f"batch size {batch_size} must be between 1 and the {per_host} rows each of the "
                      f"{process_count} processes reads from {path}.")
    self._rows = ArrayIterator({"row": rows}, batch_size, seed, shuffle)
    self.batch_size, self.batches_per_epoch = batch_size, self._rows.batches_per_epoch

  def __iter__(self) -> LatentReader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = next(self._rows)["row"]
    shard = np.searchsorted(self._starts, rows, side="right") - 1
    x = np.empty((len(rows), *self.metadata["latent_shape"]), np.float32)
    extra = {name: np.empty((len(rows), *maps[0].shape[1:]), maps[0].dtype) for name, maps in self._extra.items()}
    for s in np.unique(shard):
      picked = np.flatnonzero(shard == s)
      # Ascending offsets read each memory-mapped shard front to back.
      picked = picked[np.argsort(rows[picked])]
      x[picked] = self._x[s][rows[picked] - self._starts[s]]
      for name, maps in self._extra.items():
        extra[name][picked] = maps[s][rows[picked] - self._starts[s]]
    return {"x": x, "y": self._y[rows], **extra}

  def state(self) -> dict[str, int]:
    return self._rows.state()

  def restore(self, state: Mapping[str, Any]) -> None:
    self._rows.restore(state)
