"""VAE encode and decode throughput at 256 px, bf16: our AutoencoderKL against diffusers' in the same run (issue:
VAE and data, point 6). Random weights of the SD VAE's shape; the work is the same whatever the weights.

python benchmarks/vae.py [--batch 32] [--out benchmarks/results]    (on a GPU, with diffusers installed)
Writes vae.json with the command, machine and date.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_results
from graft_jax.models import vae
from graft_jax.timing import median_ms
from graft_jax.train.state import cast_floating

SIZE = 256


def ours(batch: int) -> dict:
  model = vae.AutoencoderKL(vae.VAEConfig())
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  params = cast_floating(params, jnp.bfloat16)
  images = jax.random.uniform(jax.random.key(1), (batch, SIZE, SIZE, 3), jnp.float32, -1, 1)
  encode = jax.jit(lambda p, x, k: model.encode_latents(p, x, k, vae.SD_SCALING_FACTOR))
  decode = jax.jit(lambda p, z: model.decode_latents(p, z, vae.SD_SCALING_FACTOR))
  latents = encode(params, images, jax.random.key(2))
  return {"encode_ms": median_ms(encode, params, images, jax.random.key(2)),
          "decode_ms": median_ms(decode, params, latents)}


def diffusers_vae(batch: int) -> dict:
  import torch
  from diffusers import AutoencoderKL

  model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=SIZE).to("cuda", torch.bfloat16).eval()
  images = torch.rand(batch, 3, SIZE, SIZE, device="cuda", dtype=torch.bfloat16) * 2 - 1

  def timed(fn):
    for _ in range(2):
      fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
      start = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)

  with torch.no_grad():
    latents = model.encode(images).latent_dist.sample() * vae.SD_SCALING_FACTOR
    return {"encode_ms": timed(lambda: model.encode(images).latent_dist.sample() * vae.SD_SCALING_FACTOR),
            "decode_ms": timed(lambda: model.decode(latents / vae.SD_SCALING_FACTOR).sample)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  rows = []
  for name, fn in (("graft_jax", ours), ("diffusers_eager", diffusers_vae)):
    r = fn(args.batch)
    rows.append({"implementation": name, "batch": args.batch, "resolution": SIZE, **r,
                 "encode_img_per_s": args.batch / r["encode_ms"] * 1e3,
                 "decode_img_per_s": args.batch / r["decode_ms"] * 1e3})
    print(rows[-1], flush=True)
  ratios = {f"{op}_speedup_over_diffusers": rows[1][f"{op}_ms"] / rows[0][f"{op}_ms"] for op in ("encode", "decode")}
  print(ratios)
  print(write_results("vae", rows, {"dtype": "bfloat16", **ratios}, args.out))


if __name__ == "__main__":
  main()
