"""The embedded default: a small class-conditional DiT sampled with DDIM and CFG into a grid.

python -m graft_jax.main --config=configs/demo.py --workdir=runs/demo
"""
from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.model = ConfigDict(dict(checkpoint="", preset="DiT-S/2",
                            overrides=dict(depth=4, hidden_size=128, num_heads=4, input_size=16, in_channels=1,
                                           num_classes=10)))
  c.stages = ("sample",)
  c.sample = ConfigDict(dict(sampler="ddim", steps=20, cfg_scale=4.0, guided_channels=None, per_class=8,
                             batch_size=80, seed=0))
  return c
