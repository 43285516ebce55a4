"""PixArt-Sigma (2K) with Hyena-X in the self-attention of layers 8, 10, 12, 14, 16, 18 and 20-27: the teacher's own
samples for a prompt file, stage 1 (the paper's settings, 8k pairs), stage 2 with LoRA rank 64 (12k pairs), then PNGs
for a prompt list (DPM-Solver++ 20 steps, cfg 4.5, the VAE of `vae.path`).

python -m graft_jax.main --config=configs/pixart_sigma_hyena_x.py[:shrink=1] --workdir=runs/pixart_hyena_x \
    [--config.text.t5=DIR --config.vae.path=DIR --config.data.prompts=FILE]
"""
from __future__ import annotations

from graft_jax.experiment_pixart import pixart_experiment


def get_config(arg=None):
  return pixart_experiment("hyena_x", None, arg)
