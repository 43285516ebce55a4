"""Reading PyTorch checkpoints into {key: numpy array}, and a key pool that proves every key was used."""
from __future__ import annotations

import json
import pathlib
from typing import Mapping

import numpy as np


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message is one sentence meant for the user."""


def _torch_load(path: pathlib.Path) -> dict:
  import torch  # only the converter needs torch
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a damaged file
    raise ConversionError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt?): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _safetensors_load(path: pathlib.Path) -> dict:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except Exception as e:
    raise ConversionError(f"{path} could not be read as a safetensors file (truncated or corrupt?): {e}") from None


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _unwrap(obj: Mapping, prefer_ema: bool) -> Mapping:
  """Training checkpoints nest the weights: {"ema", "model", "opt"} (DiT, grafting) or {"state_dict"} (PixArt)."""
  for key in (("ema", "model") if prefer_ema else ("model", "ema")) + ("state_dict",):
    if key in obj and isinstance(obj[key], Mapping):
      return obj[key]
  return obj


# Weight files of a model folder: diffusers' names, then transformers' (a T5 encoder); one file or an index of shards.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def read_state_dict(src: str | pathlib.Path, prefer_ema: bool = True) -> tuple[dict[str, np.ndarray], dict | None]:
  """(tensors, the folder's config.json or None) from a .pt/.pth/.bin/.safetensors file or a diffusers or
  transformers model folder."""
  path = pathlib.Path(src)
  if not path.exists():
    raise ConversionError(f"{path} does not exist.")
  config = None
  if path.is_dir():
    if not (path / "config.json").exists():
      raise ConversionError(f"{path} is a folder without config.json, so it is not a diffusers model folder.")
    config = json.loads((path / "config.json").read_text())
    weights = [path / n for n in WEIGHT_FILES if (path / n).exists()]
    indexes = [path / n for n in INDEX_FILES if (path / n).exists()]
    if not weights and not indexes:
      raise ConversionError(f"{path} holds none of {', '.join(WEIGHT_FILES + INDEX_FILES)}.")
    if not weights:  # large models (T5-XXL) are saved in shards listed by an index
      shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
      missing = [n for n in shards if not (path / n).exists()]
      if missing:
        raise ConversionError(f"{path} lacks the shard(s) {missing} that {indexes[0].name} lists.")
      raw = {}
      for name in shards:
        raw.update(_safetensors_load(path / name))
      return {k: _to_numpy(v) for k, v in raw.items()}, config
    path = weights[0]
  if path.suffix == ".safetensors":
    raw = _safetensors_load(path)
  elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
    raw = _torch_load(path)
  else:
    raise ConversionError(f"{path} has an unknown format; expected .pt, .pth, .bin, .safetensors or a diffusers "
                          "folder.")
  if not isinstance(raw, Mapping):
    raise ConversionError(f"{path} does not hold a state dict.")
  raw = _unwrap(raw, prefer_ema)
  return {k: _to_numpy(v) for k, v in raw.items() if hasattr(v, "shape")}, config


class KeyPool:
  """Tensors handed out by key; `finish()` fails if any key was never taken."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self._tensors = dict(tensors)
    self._taken: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self._tensors

  def take(self, key: str) -> np.ndarray:
    if key not in self._tensors:
      raise ConversionError(f"the checkpoint is missing {key}.")
    self._taken.add(key)
    return self._tensors[key]

  def take_prefix(self, prefix: str) -> dict[str, np.ndarray]:
    """Every tensor under `prefix`, keyed relative to it."""
    found = {k[len(prefix):]: self.take(k) for k in list(self._tensors) if k.startswith(prefix)}
    if not found:
      raise ConversionError(f"the checkpoint has no tensors under {prefix}.")
    return found

  def finish(self) -> None:
    left = sorted(set(self._tensors) - self._taken)
    if left:
      listed = ", ".join(f"{k} {tuple(self._tensors[k].shape)}" for k in left[:20])
      raise ConversionError(f"{len(left)} checkpoint keys were not used: {listed}"
                            + (" ..." if len(left) > 20 else "") + ".")
