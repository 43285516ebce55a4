"""FID, sFID, Inception Score, precision and recall of generated samples, as ADM's evaluator computes them.

python -m graft_jax.main --config=configs/evaluate.py --workdir=runs/dit_xl2_swa \
    --config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz --config.evaluate.inception=checkpoints/inception
Samples default to WORKDIR/samples.npz (what the sample stage writes); --config.evaluate.samples=PATH takes another.
The Inception folder comes from `python tools/convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth
checkpoints/inception`. Writes WORKDIR/metrics.json.
"""
from graft_jax.evaluation.job import default_config
from graft_jax.experiment import base_config


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/evaluate.py takes no argument; set --config.evaluate.* flags instead (got {arg!r}).")
  c = base_config()
  c.stages = ("evaluate",)
  c.evaluate = default_config()
  return c
