"""Convert a PyTorch DiT checkpoint (original .pt or a diffusers folder / safetensors) to graft_jax's format.

  python tools/convert_torch_weights.py DiT-XL-2-256x256.pt checkpoints/dit_xl2
  python tools/convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth checkpoints/inception  # FID Inception

Writes OUT_DIR/config.json and OUT_DIR/params (orbax). Runs offline; exits with status 2 and one sentence on bad input,
leaving no OUT_DIR behind.
"""
from __future__ import annotations

import sys

from graft_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
