"""Config builders behind configs/*.py: a grafting experiment on a teacher, its stages and their settings.

A config file calls `graft_experiment(site, operator, op_config, arg)`. The argument string (after the colon in
`--config=configs/dit_xl2_swa.py:ratio=75,shrink=1`) sets:
  ratio=50|75|100   share of layers grafted: odd layers, all but every fourth, or all (default 50)
  shrink=1          a tiny random teacher on the embedded demo set with a few steps: for tests and a first look
"""
from __future__ import annotations

import ml_collections

from graft_jax.train import distill, finetune

RATIO_LAYERS = {50: "odd", 75: "three_of_four", 100: "all"}


def parse_arg(arg: str | None) -> dict[str, str]:
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value (e.g. ratio=75,shrink=1).")
    out[key.strip()] = value.strip()
  return out


def base_config() -> ml_collections.ConfigDict:
  """DiT-XL/2 on ImageNet-256 latents, the paper's stage 1 and stage 2, then 50k samples for the ADM evaluator."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(checkpoint="checkpoints/dit_xl2", preset="DiT-XL/2", overrides={}))
  c.graft = []
  c.data = ml_collections.ConfigDict(dict(
      source="npz",  # "npz": arrays x (N, H, W, C) latents (already scaled) and y (N,) labels; or "demo"
      distill_path="data/imagenet256_latents_8k.npz", finetune_path="data/imagenet256_latents_10pct.npz",
      heldout=256))
  c.stages = ("distill", "finetune", "sample")
  c.distill = distill.default_config()
  c.finetune = finetune.default_config()
  c.sample = ml_collections.ConfigDict(dict(sampler="ddpm", steps=250, cfg_scale=1.5, guided_channels=3,
                                            per_class=50, batch_size=250, seed=0))
  return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment on a tiny random teacher and the demo set, small enough for a CPU test."""
  c.model = ml_collections.ConfigDict(dict(checkpoint="", preset="DiT-S/2", overrides=dict(
      depth=4, hidden_size=64, num_heads=2, input_size=16, in_channels=1, num_classes=10)))
  for entry in c.graft:
    if "num_heads" in entry["config"]:
      entry["config"]["num_heads"] = 2
  c.data.source, c.data.heldout = "demo", 32
  c.distill.update(dict(steps=4, batch_size=16, log_every=2, checkpoint_every=2))
  c.finetune.update(dict(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=2,
                         compute_dtype="float32"))
  c.sample.update(dict(sampler="ddim", steps=4, per_class=1, batch_size=10, cfg_scale=4.0))
  return c


def graft_experiment(site: str, operator: str, op_config: dict | None, arg: str | None,
                     init: str = "fresh") -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  unknown = set(args) - {"ratio", "shrink"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use ratio=50|75|100 and shrink=1.")
  ratio = int(args.get("ratio", 50))
  if ratio not in RATIO_LAYERS:
    raise ValueError(f"ratio must be one of {sorted(RATIO_LAYERS)}, got {ratio}.")
  c = base_config()
  c.graft = [dict(site=site, layers=RATIO_LAYERS[ratio], operator=operator, config=dict(op_config or {}),
                  init=init)]
  return shrink(c) if args.get("shrink", "0") not in ("0", "") else c
