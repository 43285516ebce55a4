"""Attention locality and activation statistics of a teacher, and the graft layers they suggest (`job=analyze`).

python -m graft_jax.main --config=configs/analyze.py --workdir=runs/analyze
  (teacher: model.checkpoint, by default checkpoints/dit_xl2; another with --config.model.checkpoint=PATH)
Argument shrink=1: the demo-sized random teacher with a few samples and steps (the test's version).
The defaults follow the paper's analysis (50-step DDIM, CFG 1.5, 250 samples, k = 32 on 256 tokens) but look at
10 of the 50 steps of every trajectory rather than all of them.
"""
from __future__ import annotations

import ml_collections

from graft_jax.experiment import base_config, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  if set(args) - {"shrink"}:
    raise ValueError(f"analyze takes only shrink=1, got {arg!r}.")
  c = base_config()
  c.stages = ("analyze",)
  c.analyze = ml_collections.ConfigDict(dict(
      samples=250, batch_size=50, steps=50, timesteps=10, cfg_scale=1.5, guided_channels=3, seed=0,
      bands=(4, 8, 16, 32, 64), band=32,      # L_k for every band; `band` ranks the layers
      distance="flat",                         # |i - j| on the raster sequence (paper); "grid": 2-D Chebyshev
      suggest_fraction=0.5, suggest_count=0,   # suggest the top 50% by L_band (a count > 0 overrides)
      outlier_sigma=6.0))
  if args.get("shrink", "0") not in ("0", ""):
    shrink(c)
    c.analyze.update(dict(samples=4, batch_size=2, steps=4, timesteps=2, bands=(2, 4, 8), band=4))
  return c
