"""DiT-XL/2 with swa in the attn site of 50% (ratio=75, 100) of the layers: stage 1, stage 2, samples.

python -m graft_jax.main --config=configs/dit_xl2_swa.py[:ratio=75][,shrink=1] --workdir=runs/swa
"""
from graft_jax.experiment import graft_experiment


def get_config(arg=None):
  return graft_experiment("attn", "swa", dict(num_heads=16,window=4), arg)
