"""The converter's command line (tools/convert_torch_weights.py)."""
from __future__ import annotations

import argparse
import sys

import jax

from graft_jax import checkpoints
from graft_jax.convert.dit import FORMATS, dit_from_torch
from graft_jax.convert.inception import inception_from_torch, is_inception
from graft_jax.convert.pixart import detect_format as pixart_format, pixart_from_torch
from graft_jax.convert.t5 import convert_t5_encoder, is_t5
from graft_jax.convert.state_dict import ConversionError, read_state_dict


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="convert_torch_weights.py", description=__doc__)
  p.add_argument("src", help="a .pt/.pth/.bin/.safetensors file or a diffusers model folder")
  p.add_argument("out_dir", help="the folder to create: config.json + params/")
  p.add_argument("--format", default="auto", choices=("auto", "pixart") + FORMATS,
                 help="source layout (default: from keys)")
  p.add_argument("--num-heads", type=int, help="attention heads, when the width is no DiT preset")
  p.add_argument("--input-size", type=int,
                 help="latent size, when the checkpoint has no pos_embed (default 32; PixArt 128)")
  p.add_argument("--pe-interpolation", type=float,
                 help="PixArt: position-table scale, when the checkpoint has no pos_embed (default image size / 512)")
  p.add_argument("--weights", default="ema", choices=("ema", "model"),
                 help="which weights of a training checkpoint holding both (default ema)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    tensors, diffusers_config = read_state_dict(args.src, prefer_ema=args.weights == "ema")
    if is_inception(tensors):  # pytorch-fid's / torch-fidelity's FID Inception file, told apart by its keys
      out = checkpoints.save(args.out_dir, *inception_from_torch(tensors, args.src))
      print(f"wrote {out}: the FID Inception v3 (pool3, mixed_6/conv and 1008-class logits)")
      return 0
    if is_t5(tensors):  # a Hugging Face T5 (encoder) checkpoint: file or folder with its config.json
      hf = diffusers_config or {}
      config, params = convert_t5_encoder(tensors, hf.get("relative_attention_max_distance", 128),
                                          hf.get("layer_norm_epsilon", 1e-6), drop_decoder=True)
      out = checkpoints.save(args.out_dir, config, params)
      print(f"wrote {out}: T5 encoder, {config.num_layers} layers, width {config.d_model}")
      return 0
    if pixart_format(tensors):  # PixArt-alpha/Sigma (original or diffusers), told apart by its keys
      config, params = pixart_from_torch(tensors, args.format, args.num_heads, args.input_size, args.pe_interpolation,
                                         diffusers_config)
    else:
      config, params = dit_from_torch(tensors, args.format, args.num_heads, args.input_size, diffusers_config)
    out = checkpoints.save(args.out_dir, config, params)
  except (ConversionError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(v.size for v in jax.tree.leaves(params))
  print(f"wrote {out}: {type(config).__name__.removesuffix('Config')} depth {config.depth}, "
        f"width {config.hidden_size}, patch {config.patch_size}, "
        f"{n:,} parameters")
  return 0
