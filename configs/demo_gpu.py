"""The demo pipeline at the paper's token count, for one GPU: digits upsampled to 32x32, patch 2 (256 tokens, as
DiT-XL/2 on 256-px latents), a DiT-B-sized teacher (depth 12, width 768, 12 heads), bf16 compute.

python -m graft_jax.main --config=configs/demo_gpu.py --workdir=runs/demo_gpu
Arguments as configs/demo.py: operator=swa|hyena_x, shrink=1. Target: under 10 minutes on one H200, compilation
included. The report is the demo's (report.md / report.json, grids, losses.png).
"""
from graft_jax.experiment import demo_gpu_experiment


def get_config(arg=None):
  return demo_gpu_experiment(arg)
