"""DiT-XL/2 with hyena_se in the attn site of 50% (ratio=75, 100) of the layers: stage 1, stage 2, samples.

python -m graft_jax.main --config=configs/dit_xl2_hyena_se.py[:ratio=75][,shrink=1] --workdir=runs/hyena_se
"""
from graft_jax.experiment import graft_experiment


def get_config(arg=None):
  return graft_experiment("attn", "hyena_se", None, arg)
