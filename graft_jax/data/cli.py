"""Command line for latent caches:

  python -m graft_jax.data.cli encode --source DIR|tfds --vae VAE --out OUT --resolution 256 --per-class 8
  python -m graft_jax.data.cli synthesize --teacher CKPT_DIR --out OUT --per-class 8 --sampler ddim --steps 50 \\
      --cfg 4.0
  python -m graft_jax.data.cli synthesize-pixart --teacher PIXART_DIR --prompts PROMPTS.txt \\
      (--t5 T5_DIR [--spiece spiece.model] | --embeddings EMB.npz) --out OUT [--per-prompt 1 --steps 20 --cfg 4.5]

A problem with the input (a missing folder, a cache made for other settings, a VAE that does not load) is one
sentence on stderr and exit status 2; the output folder appears only when complete.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from absl import logging

from graft_jax.data.latents import DataError, read_metadata
from graft_jax.models.config import COMPUTE_DTYPES
from graft_jax.models.vae import SD_SCALING_FACTOR, SDXL_SCALING_FACTOR


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", required=True, help="the cache folder to create")
  p.add_argument("--per-class", type=int, default=None, help="items per class (encode: default all images)")
  p.add_argument("--seed", type=int, default=0, help="subset draw, posterior noise, flips, sampling noise")
  p.add_argument("--batch-size", type=int, default=64, help="per step, split over the local devices")
  p.add_argument("--shard-size", type=int, default=4096, help="latents per .npz shard")
  p.add_argument("--scale", type=float, default=SD_SCALING_FACTOR, help="latent scaling factor (SD: 0.18215)")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m graft_jax.data.cli", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True)
  encode = commands.add_parser("encode", help="ImageNet images -> VAE latents")
  _common(encode)
  encode.add_argument("--source", required=True, help="an ImageNet folder (train/<wnid>/*.JPEG) or 'tfds'")
  encode.add_argument("--split", default="train", help="train or val (TFDS: validation)")
  encode.add_argument("--tfds-data-dir", help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  encode.add_argument("--manual-dir", help="where ILSVRC2012_img_{train,val}.tar are (default DATA_DIR/downloads/"
                      "manual)")
  encode.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder or .safetensors/.pt/.bin/.ckpt")
  encode.add_argument("--vae-groups", type=int, help="GroupNorm groups, when the VAE has no config.json (32)")
  encode.add_argument("--resolution", type=int, default=256, help="image side after the ADM centre crop")
  encode.add_argument("--flip", default="none", choices=("none", "random"), help="horizontal flip per image")
  encode.add_argument("--posterior", default="sample", choices=("sample", "mean"),
                      help="posterior sample (as DiT's extraction) or its mean")
  encode.add_argument("--workers", type=int, default=8, help="image decoding threads")
  synth = commands.add_parser("synthesize", help="teacher DiT samples -> latents")
  _common(synth)
  synth.add_argument("--teacher", required=True, help="converted DiT checkpoint folder")
  synth.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
  synth.add_argument("--steps", type=int, default=50)
  synth.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
  synth.add_argument("--eta", type=float, default=0.0, help="DDIM noise")
  synth.add_argument("--compute-dtype", default="float32", choices=COMPUTE_DTYPES,
                     help="the teacher's compute dtype (bfloat16: faster)")
  synth.add_argument("--vae-id", help="identity of the teacher's VAE to record (from an encoded cache's metadata)")
  pixart = commands.add_parser("synthesize-pixart", help="PixArt teacher samples for a prompt file -> latents with "
                               "caption embeddings")
  pixart.add_argument("--teacher", required=True, help="converted PixArt(-Sigma) folder")
  pixart.add_argument("--prompts", required=True, help="text file, one prompt per line")
  pixart.add_argument("--t5", default="", help="converted T5 encoder folder ('random': random embeddings, tests)")
  pixart.add_argument("--spiece", default="", help="T5's sentencepiece model (default T5_DIR/spiece.model)")
  pixart.add_argument("--lowercase", action="store_true", help="lowercase prompts (diffusers' PixArt pipeline)")
  pixart.add_argument("--embeddings", default="", help="precomputed .npz, one row per prompt (instead of --t5)")
  pixart.add_argument("--out", required=True, help="the cache folder to create")
  pixart.add_argument("--per-prompt", type=int, default=1, help="samples of every prompt")
  pixart.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
  pixart.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
  pixart.add_argument("--compute-dtype", default="bfloat16", choices=COMPUTE_DTYPES,
                      help="the teacher's compute dtype")
  pixart.add_argument("--negative-prompt", help="guide against this prompt's T5 encoding (needs --t5) instead of the "
                      "learned null caption; weights without one (diffusers') use \"\" by default")
  pixart.add_argument("--seed", type=int, default=0, help="sampling noise")
  pixart.add_argument("--batch-size", type=int, default=8, help="per step, split over the local devices")
  pixart.add_argument("--shard-size", type=int, default=1024, help="latents per .npz shard")
  pixart.add_argument("--scale", type=float, default=SDXL_SCALING_FACTOR, help="latent scaling factor (SDXL: 0.13025)")
  pixart.add_argument("--vae-id", help="identity of the teacher's VAE to record")
  return p


def _encode(args) -> str:
  from graft_jax.data import imagenet
  # The VAE first: it fails in a second, while opening TFDS may first spend hours preparing ImageNet.
  vae, params = imagenet.load_vae(args.vae, args.vae_groups)
  source = imagenet.open_source(args.source, args.split, args.tfds_data_dir, args.manual_dir)
  settings = imagenet.EncodeSettings(
      resolution=args.resolution, per_class=args.per_class, seed=args.seed, flip=args.flip,
      sample=args.posterior == "sample", scale=args.scale, batch_size=args.batch_size, shard_size=args.shard_size,
      workers=args.workers)
  return imagenet.encode_imagenet(source, vae, params, args.out, settings, str(pathlib.Path(args.vae).absolute()))


def _synthesize(args) -> str:
  from graft_jax.data import synthetic
  if args.per_class is None:
    raise DataError("synthesize needs --per-class, the number of samples of every class.")
  settings = synthetic.SynthesisSettings(
      per_class=args.per_class, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, eta=args.eta,
      seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size, scale=args.scale, vae=args.vae_id,
      compute_dtype=args.compute_dtype)
  return synthetic.synthesize_from_checkpoint(args.teacher, args.out, settings)


def _synthesize_pixart(args) -> str:
  import ml_collections

  from graft_jax.data import synthetic_pixart
  text = ml_collections.ConfigDict(dict(t5=args.t5, spiece=args.spiece, lowercase=args.lowercase, batch_size=8))
  settings = synthetic_pixart.PixArtSynthesisSettings(
      per_prompt=args.per_prompt, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size,
      shard_size=args.shard_size, scale=args.scale, vae=args.vae_id, negative_prompt=args.negative_prompt,
      compute_dtype=args.compute_dtype)
  return synthetic_pixart.synthesize_from_files(args.teacher, args.prompts, text, args.out, settings,
                                                args.embeddings)


COMMANDS = {"encode": _encode, "synthesize": _synthesize, "synthesize-pixart": _synthesize_pixart}


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    out = COMMANDS[args.command](args)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  meta = read_metadata(out)
  print(f"wrote {out}: {meta['count']} latents of shape {tuple(meta['latent_shape'])} in {len(meta['shards'])} "
        f"shards, {meta['skipped']['count']} inputs skipped")
  return 0


if __name__ == "__main__":
  sys.exit(main())
