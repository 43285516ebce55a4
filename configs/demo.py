"""The embedded default: the whole grafting pipeline on the demo set (scikit-learn's digits, 16x16, no VAE).

python -m graft_jax.main --config=configs/demo.py --workdir=runs/demo
Arguments: operator=swa|hyena_x (default swa), shrink=1 (a few steps of everything: the test's version).
Trains a small teacher DiT (cached in the workdir), grafts its odd attention layers, runs stage 1 and stage 2,
compares with a fresh-scion control and self-grafted MHA, and writes report.md / report.json, grids, losses.png.
"""
from graft_jax.experiment import demo_experiment


def get_config(arg=None):
  return demo_experiment(arg)
