"""DiT-XL/2 depth to width: every pair of blocks made one parallel pair (28 -> 14 layers): stage 1, stage 2, samples.

python -m graft_jax.main --config=configs/dit_xl2_parallel.py[:shrink=1] --workdir=runs/parallel
"""
from graft_jax.experiment import parallel_experiment


def get_config(arg=None):
  return parallel_experiment(arg)
