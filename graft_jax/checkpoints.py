"""A converted or exported model on disk: `config.json` (the model description) and `params/` (orbax).

`save` writes into a temporary sibling folder and renames it when complete, so a failed export leaves nothing.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from graft_jax import hosts
from graft_jax.evaluation.inception import InceptionConfig, InceptionV3
from graft_jax.models import DiT, DiTConfig
from graft_jax.models.config import PixArtConfig
from graft_jax.models.pixart import PixArt
from graft_jax.models.t5 import T5Config, T5Encoder

_MODELS = {"dit": (DiTConfig, DiT), "t5_encoder": (T5Config, T5Encoder)}
_MODELS["inception"] = (InceptionConfig, InceptionV3)  # the FID network, from convert/inception.py
_MODELS["pixart"] = (PixArtConfig, PixArt)  # from convert/pixart.py


def save(out_dir: str | pathlib.Path, config, params) -> pathlib.Path:
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} already exists and is not empty; choose a new output folder.")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    (tmp / "config.json").write_text(config.dumps())
    with hosts.local_checkpointer() as ckptr:
      # Host arrays: orbax refuses single-device jax arrays in a multi-process run (they look like pmap shards).
      ckptr.save(tmp / "params", jax.tree.map(np.asarray, params))
    if out.exists():
      out.rmdir()
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def load_config(model_dir: str | pathlib.Path):
  path = pathlib.Path(model_dir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; convert a checkpoint first with "
                            f"`python tools/convert_torch_weights.py SRC {model_dir}`.")
  d = json.loads(path.read_text())
  config_cls, _ = _MODELS[d.get("model", "dit")]
  return config_cls.from_json(d)


def load_params(model_dir: str | pathlib.Path):
  """The saved parameters, on the default device (as before exports were saved from host arrays: callers time and
  apply them as they are)."""
  with hosts.local_checkpointer() as ckptr:
    params = ckptr.restore(pathlib.Path(model_dir).absolute() / "params")
  return jax.tree.map(jax.numpy.asarray, params)


def load(model_dir: str | pathlib.Path):
  """(model, params) such that `model.apply({"params": params}, x, t, y)` runs the saved model."""
  config = load_config(model_dir)
  _, model_cls = _MODELS[config.to_json()["model"]]
  return model_cls(config), load_params(model_dir)
