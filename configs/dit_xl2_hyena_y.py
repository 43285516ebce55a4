"""DiT-XL/2 with hyena_y in the attn site of 50% (ratio=75, 100) of the layers: stage 1, stage 2, samples.

python -m graft_jax.main --config=configs/dit_xl2_hyena_y.py[:ratio=75][,shrink=1] --workdir=runs/hyena_y
"""
from graft_jax.experiment import graft_experiment


def get_config(arg=None):
  return graft_experiment("attn", "hyena_y", None, arg)
