"""DiT-XL/2 self-grafted attention (fresh MHA, the control) in 50% (ratio=75, 100) of the layers: stage 1, stage 2,
samples.

python -m graft_jax.main --config=configs/dit_xl2_self_mha.py[:ratio=75][,shrink=1] --workdir=runs/self_mha
"""
from graft_jax.experiment import graft_experiment


def get_config(arg=None):
  return graft_experiment("attn", "mha", dict(num_heads=16), arg)
