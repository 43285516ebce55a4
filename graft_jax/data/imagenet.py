"""ImageNet images -> SD-VAE latents cache (graft_jax.data.latents format), as DiT's training data is made.

Sources: TFDS `imagenet2012` (prepared from its manual-download folder, never downloaded) or a plain ImageNet-layout
folder SPLIT/<wnid>/*.JPEG, labels being the index of the wnid among the sorted wnids (TFDS' label order too).
Preprocessing is ADM's (guided_diffusion's center_crop_arr, which DiT trains with): RGB, halve with a box filter
while the short side is at least twice the target, bicubic resize of the short side to the target, centre crop,
optional horizontal flip, then x / 127.5 - 1. Images are decoded with PIL from both sources, so the same image
gives the same latent from either. Images that do not decode are skipped and counted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from PIL import Image

from graft_jax.convert.state_dict import ConversionError, read_state_dict
from graft_jax.convert.vae import vae_params_from_torch
from graft_jax.data.latents import METADATA, DataError, ShardWriter, check_latents, read_metadata, reuse_cache, \
    stratified_subset, tree_digest
from graft_jax.models.vae import SD_SCALING_FACTOR, AutoencoderKL, VAEConfig
from graft_jax.train import partition

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
FLIPS = ("none", "random")
# What PIL raises for bytes that are not an image it can read (truncated, corrupt, unknown format, too large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's centre crop of a PIL image to (size, size): uint8 array, channels as the image's mode has them."""
  # Box-filter halving first: one bicubic step from a much larger image would alias.
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
  pixels = np.asarray(image)
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


def load_image(source: str | os.PathLike | io.BytesIO, size: int, flip: bool = False) -> np.ndarray | None:
  """(size, size, 3) uint8 of one image file or bytes after ADM's preprocessing; None when it does not decode."""
  try:
    with Image.open(source) as image:
      image = image.convert("RGB")
  except DECODE_ERRORS:
    return None
  pixels = center_crop(image, size)
  return np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels


def to_unit_range(images: Any) -> Any:
  """uint8 pixels -> floats in [-1, 1] (numpy or jax, whichever comes in)."""
  return images.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a source: its place in the source's order, file name (e.g. n01440764_10026.JPEG), label."""
  position: int
  key: str
  label: int


class ImageFolder:
  """ROOT/SPLIT/<wnid>/<image> (or ROOT/<wnid>/<image> when ROOT has no SPLIT folder); files sorted by path."""

  def __init__(self, root: str | os.PathLike, split: str = "train"):
    root = pathlib.Path(root).absolute()
    self.folder = root / split if (root / split).is_dir() else root
    if not self.folder.is_dir():
      raise DataError(f"{root} is not a folder; give an ImageNet folder (train/<wnid>/*.JPEG) or 'tfds'.")
    self.split = split
    self.classes = sorted(d.name for d in self.folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not self.classes:
      raise DataError(f"{self.folder} has no class folders; expected {self.folder}/<wnid>/*.JPEG.")
    self._paths: list[pathlib.Path] = []
    self._records: list[Record] = []
    for label, wnid in enumerate(self.classes):
      for path in sorted((self.folder / wnid).iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
          self._records.append(Record(len(self._paths), path.name, label))
          self._paths.append(path)
    self.num_classes = len(self.classes)

  def describe(self) -> dict[str, Any]:
    return {"type": "folder", "path": str(self.folder), "split": self.split}

  def records(self) -> list[Record]:
    return list(self._records)

  def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, pathlib.Path]]:
    for record in records:
      yield record, self._paths[record.position]


def _tensorflow():
  """TensorFlow, imported only where TFDS reads or prepares data (it takes seconds), with GPUs hidden from it."""
  import tensorflow as tf
  # tf.data only reads files here; left alone TensorFlow would reserve GPU memory that JAX needs.
  with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")
  return tf


class TfdsImageNet:
  """TFDS imagenet2012 under `data_dir`, prepared first (once) from MANUAL_FILES in `manual_dir`.

  Examples are read in file order (interleave cycle 1), so a slice [a:b] of a split is rows a..b-1 of the whole.
  """

  def __init__(self, data_dir: str | os.PathLike | None = None, manual_dir: str | os.PathLike | None = None,
               split: str = "train"):
    import tensorflow_datasets as tfds
    self._tfds = tfds
    self.root = pathlib.Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    self.root = self.root.absolute()
    self.builder = tfds.builder("imagenet2012", data_dir=str(self.root))
    if not self.builder.is_prepared():
      self._prepare(pathlib.Path(manual_dir or self.root / "downloads" / "manual").expanduser().absolute())
    self.split = {"val": "validation"}.get(split, split)
    if self.split not in self.builder.info.splits:
      raise DataError(f"TFDS imagenet2012 in {self.root} has no split {split!r}; it has "
                      f"{sorted(self.builder.info.splits)}.")
    self.num_classes = self.builder.info.features["label"].num_classes

  def _prepare(self, manual: pathlib.Path) -> None:
    """TFDS' one-time conversion of the manual tars to its own files (the builder downloads nothing for ImageNet).

    Both tars are required: TFDS' builder reads the validation tar's names even to prepare the train split alone.
    """
    missing = [name for name in MANUAL_FILES if not (manual / name).is_file()]
    if missing:
      raise DataError(f"ImageNet is not prepared in {self.root} and {manual} lacks {' and '.join(missing)}: put "
                      f"{MANUAL_FILES[0]} and {MANUAL_FILES[1]} (from image-net.org) in {manual}.")
    _tensorflow()
    config = self._tfds.download.DownloadConfig(
        manual_dir=str(manual), download_mode=self._tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    self.builder.download_and_prepare(download_config=config)

  def describe(self) -> dict[str, Any]:
    return {"type": "tfds", "name": "imagenet2012", "version": str(self.builder.version), "data_dir": str(self.root),
            "split": self.split}

  def _dataset(self, split: str, decoders):
    _tensorflow()
    return self.builder.as_dataset(split=split, decoders=decoders, shuffle_files=False,
                                   read_config=self._tfds.ReadConfig(interleave_cycle_length=1))

  def records(self) -> list[Record]:
    """Every example's name and label: one pass over the split that skips decoding the images."""
    names = self._tfds.decode.PartialDecoding({"file_name": True, "label": True})
    ds = self._dataset(self.split, names).map(lambda e: (e["file_name"], e["label"])).batch(8192)
    out: list[Record] = []
    for keys, labels in ds.as_numpy_iterator():
      start = len(out)
      out.extend(Record(start + i, k.decode(), int(y)) for i, (k, y) in enumerate(zip(keys, labels)))
    return out

  def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, io.BytesIO]]:
    """The encoded bytes of `records` (sorted by position), reading only the slice of the split they span."""
    if not records:
      return
    tf = _tensorflow()
    first, last = records[0].position, records[-1].position
    wanted = np.zeros(last - first + 1, bool)
    wanted[[r.position - first for r in records]] = True
    wanted = tf.constant(wanted)
    ds = self._dataset(f"{self.split}[{first}:{last + 1}]", {"image": self._tfds.decode.SkipDecoding()})
    # Plain graph functions: AutoGraph cannot parse two lambdas on one line and has nothing to convert here.
    keep = tf.autograph.experimental.do_not_convert(lambda i, example: tf.gather(wanted, i - first))
    image = tf.autograph.experimental.do_not_convert(lambda i, example: example["image"])
    ds = ds.enumerate(first).filter(keep).map(image)
    for record, data in zip(records, ds.prefetch(64).as_numpy_iterator()):
      yield record, io.BytesIO(data)


def open_source(source: str, split: str = "train", data_dir: str | None = None, manual_dir: str | None = None):
  """'tfds' (TFDS imagenet2012) or an ImageNet-layout folder."""
  if source == "tfds":
    return TfdsImageNet(data_dir, manual_dir, split)
  return ImageFolder(source, split)


def load_vae(path: str | os.PathLike, norm_num_groups: int | None = None) -> tuple[AutoencoderKL, Any]:
  """(model, params) from a diffusers AutoencoderKL folder or a .safetensors/.pt/.bin/.ckpt state dict.

  A full Stable Diffusion checkpoint works too: its "first_stage_model." (or "vae.") tensors are taken. The group
  count is not stored in weights: it comes from the folder's config.json, else `norm_num_groups`, else 32.
  """
  try:
    tensors, config = read_state_dict(path)
  except ConversionError as e:
    raise DataError(str(e)) from None
  for prefix in ("first_stage_model.", "vae."):
    if any(k.startswith(prefix) for k in tensors):
      tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  groups = norm_num_groups or (config or {}).get("norm_num_groups", 32)
  try:
    vae_config, params = vae_params_from_torch(tensors, norm_num_groups=groups)
  except ValueError as e:
    raise DataError(f"{path} is not a usable AutoencoderKL: {e}") from None
  return AutoencoderKL(VAEConfig(**vae_config)), params


def make_encoder(vae: AutoencoderKL, scale: float, sample: bool, mesh) -> Callable:
  """jit fn(params, images uint8 (B, H, W, 3), positions int32 (B,), key) -> latents (B, h, w, c), batch-sharded.

  Each image's posterior noise comes from fold_in(key, its position in the source), so a latent does not depend on
  the batch it was in, the device count, or the subset it belongs to.
  """
  data = partition.batch_sharding(mesh)

  def encode(params, images, positions, key):
    def one(image, position):
      noise_key = jax.random.fold_in(key, position) if sample else None
      return vae.encode_latents(params, to_unit_range(image)[None], noise_key, scale)[0]
    return jax.vmap(one)(images, positions)

  replicated = partition.replicated(mesh)
  return jax.jit(encode, in_shardings=(replicated, data, data, replicated), out_shardings=data)


def _ordered_map(pool: concurrent.futures.Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
  """fn over items in a thread pool, results in order, at most `ahead` pending (bounds the decoded images held)."""
  pending: collections.deque = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= ahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  """What an encoding run does; batch_size and workers change only the speed, the rest is in the metadata."""
  resolution: int = 256
  per_class: int | None = None  # None: every image of the split
  seed: int = 0  # subset draw, posterior noise and random flips
  flip: str = "none"  # "random": each image flipped or not by (seed, position), fixed for the cache
  sample: bool = True  # posterior sample (DiT's extraction) or its mean
  scale: float = SD_SCALING_FACTOR
  batch_size: int = 64
  shard_size: int = 4096
  workers: int = 8


def encode_imagenet(source, vae: AutoencoderKL, params: Any, out: str | os.PathLike,
                    settings: EncodeSettings = EncodeSettings(), vae_source: str | None = None,
                    mesh=None) -> pathlib.Path:
  """Encodes `source` (ImageFolder or TfdsImageNet) into the latent cache `out`; returns its path.

  The batch is split over `mesh` (default: every local device). An existing complete cache with the same settings
  is kept as it is; an unfinished one is continued.
  """
  mesh = mesh or partition.make_mesh({"data": -1}, jax.local_devices())
  _check_settings(vae, settings, mesh)
  out = pathlib.Path(out).absolute()
  meta = _metadata(source, vae, params, settings, vae_source)
  if (out / METADATA).exists():
    check_latents(read_metadata(out), out, settings.resolution, meta["vae"]["id"])
  if reuse_cache(out, {k: meta[k] for k in ("source", "per_class", "seed", "flip", "posterior", "scale")}):
    return out
  records = _select(source, settings)
  names = "\n".join(f"{r.position} {r.key} {r.label}" for r in records)
  writer = ShardWriter(out, {**meta, "records": hashlib.sha256(names.encode()).hexdigest(),
                             "shard_size": settings.shard_size})
  encode = make_encoder(vae, settings.scale, settings.sample, mesh)
  params = jax.device_put(params, partition.replicated(mesh))
  dispatch = functools.partial(_dispatch, encode, params, jax.random.key(settings.seed), settings.batch_size)
  shards = [records[i:i + settings.shard_size] for i in range(0, len(records), settings.shard_size)]
  with concurrent.futures.ThreadPoolExecutor(settings.workers) as pool:
    for index, shard in enumerate(shards):
      if writer.done(index):
        continue
      start = time.monotonic()
      pixels = _ordered_map(pool, functools.partial(_decode, settings), source.read(shard),
                            ahead=4 * settings.batch_size)
      x, good, skipped = _encode_stream(pixels, dispatch, settings.batch_size, meta["latent_shape"])
      writer.write(index, x, [r.label for r in good], [r.key for r in good], skipped)
      logging.info("shard %d/%d: %d latents, %d skipped, %.1f images/s", index + 1, len(shards), len(good),
                   len(skipped), len(shard) / (time.monotonic() - start))
  return writer.finish(meta, len(shards))


def _check_settings(vae: AutoencoderKL, settings: EncodeSettings, mesh) -> None:
  if settings.flip not in FLIPS:
    raise DataError(f"flip must be one of {FLIPS}, got {settings.flip!r}.")
  factor = 2 ** (len(vae.config.block_out_channels) - 1)
  if settings.resolution % factor:
    raise DataError(f"resolution {settings.resolution} is not a multiple of the VAE's downsampling {factor}.")
  try:
    partition.check_batch(mesh, settings.batch_size)
  except ValueError as e:
    raise DataError(str(e)) from None


def _metadata(source, vae: AutoencoderKL, params: Any, settings: EncodeSettings,
              vae_source: str | None) -> dict[str, Any]:
  config = dataclasses.asdict(vae.config)
  side = settings.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
  return {"kind": "imagenet", "resolution": settings.resolution, "num_classes": source.num_classes,
          "latent_shape": [side, side, vae.config.latent_channels], "scale": settings.scale,
          "vae": {"id": tree_digest(config, params), "config": config, "source": vae_source},
          "source": source.describe(), "per_class": settings.per_class, "seed": settings.seed, "flip": settings.flip,
          "posterior": "sample" if settings.sample else "mean", "preprocess": "adm_center_crop", "generator": None}


def _select(source, settings: EncodeSettings) -> list[Record]:
  """The source's records, or its stratified subset of `per_class` per class, in source order."""
  records = source.records()
  if settings.per_class:
    picked = stratified_subset([r.label for r in records], [r.key for r in records], settings.per_class,
                               settings.seed, source.num_classes)
    records = [records[i] for i in picked]
  if not records:
    raise DataError(f"{source.describe()} holds no images.")
  return records


def _decode(settings: EncodeSettings, item: tuple[Record, Any]) -> tuple[Record, np.ndarray | None]:
  record, payload = item
  flip = settings.flip == "random" and bool(np.random.default_rng([settings.seed, record.position]).integers(2))
  return record, load_image(payload, settings.resolution, flip)


def _encode_stream(decoded: Iterable[tuple[Record, np.ndarray | None]], dispatch: Callable, batch_size: int,
                   latent_shape: Sequence[int]) -> tuple[np.ndarray, list[Record], list[str]]:
  """(latents, records encoded, keys skipped) of decoded images, encoded in batches of `batch_size`."""
  good: list[Record] = []
  skipped: list[str] = []
  outputs, images = [], []
  for record, pixels in decoded:
    if pixels is None:
      skipped.append(record.key)
      continue
    good.append(record)
    images.append(pixels)
    if len(images) == batch_size:
      outputs.append(dispatch(images, good[-len(images):]))
      images = []
  if images:
    outputs.append(dispatch(images, good[-len(images):]))
  # Batches were dispatched asynchronously: the device worked while the next images decoded.
  x = np.concatenate([np.asarray(z)[:n] for z, n in outputs] or [np.zeros((0, *latent_shape), np.float32)])
  return x, good, skipped


def _dispatch(encode: Callable, params: Any, key: jax.Array, batch_size: int, images: list[np.ndarray],
              records: Sequence[Record]) -> tuple[jax.Array, int]:
  """Starts one batch, padded to full size so one compiled program serves every batch."""
  n = len(images)
  batch = np.zeros((batch_size, *images[0].shape), np.uint8)
  batch[:n] = np.stack(images)
  positions = np.zeros((batch_size,), np.int32)
  positions[:n] = [r.position for r in records]
  return encode(params, batch, positions, key), n
