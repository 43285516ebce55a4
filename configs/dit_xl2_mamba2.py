"""DiT-XL/2 with mamba2 in the attn site of 50% (ratio=75, 100) of the layers: stage 1, stage 2, samples.

python -m graft_jax.main --config=configs/dit_xl2_mamba2.py[:ratio=75][,shrink=1] --workdir=runs/mamba2
"""
from graft_jax.experiment import graft_experiment


def get_config(arg=None):
  return graft_experiment("attn", "mamba2", None, arg)
