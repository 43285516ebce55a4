"""DiT-XL/2 with mlp in the mlp site of 50% (ratio=75, 100) of the layers: stage 1, stage 2, samples.

python -m graft_jax.main --config=configs/dit_xl2_mlp_r3.py[:ratio=75][,shrink=1] --workdir=runs/mlp_r3
"""
from graft_jax.experiment import graft_experiment


def get_config(arg=None):
  return graft_experiment("mlp", "mlp", dict(ratio=3), arg)
