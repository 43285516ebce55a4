"""The PixArt-Sigma grafting experiment behind configs/pixart_sigma_hyena_x.py (see ../shared/reference/grafting.md).

Stages: synthesize (the teacher's own samples for a prompt file: 12k pairs, DPM-Solver++ 20 steps, cfg 4.5), distill
(stage 1 on the first 8k of them, the paper's settings), finetune (stage 2 on all 12k with LoRA rank 64, which the
paper chose for memory at 16,384 tokens), sample (PNGs for a prompt list). The argument string sets:
  shrink=1   a tiny random PixArt (depth 4, width 32, 64 px, noise on every weight) with random caption embeddings,
             grafted at its last two layers, a few steps of everything and no VAE: for tests and a first look on a CPU
"""
from __future__ import annotations

import pathlib

import ml_collections

from graft_jax.experiment import parse_arg
from graft_jax.models.vae import SDXL_SCALING_FACTOR
from graft_jax.train import distill, finetune

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_PROMPTS = ROOT / "configs" / "prompts" / "pixart_sample_prompts.txt"
# The paper's list (15 layers by its text; the list names 14): Hyena-X in the self-attention of these layers.
PAPER_LAYERS = [8, 10, 12, 14, 16, 18] + list(range(20, 28))
# Every Dense kernel of a block: self-attention (mha's q/k/v/proj, or a scion's in_proj/out_proj), cross-attention,
# MLP. Hyena's short filters are 2-D "kernel"s too, but convolution taps, so they are named out, not matched.
PIXART_LORA_TARGETS = (r"blocks_\d+/attn/(q|k|v|proj|in_proj|out_proj)/",
                       r"blocks_\d+/cross_attn/(q_linear|kv_linear|proj)/", r"blocks_\d+/mlp/(fc1|fc2)/")


def pixart_experiment(operator: str, op_config: dict | None, arg: str | None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  if set(args) - {"shrink"}:
    raise ValueError(f"unknown config argument(s) {sorted(set(args) - {'shrink'})}; use shrink=1.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A converted PixArt-Sigma folder (`python tools/convert_torch_weights.py PixArt-Sigma-XL-2-2K-MS.pth DIR`).
  # remat "full" keeps only each block's input for stage 2's backward pass, as PixArt's own training code
  # checkpoints every block: at 16,384 tokens that is about 1 GB a sample against about 18 GB with "elementwise"
  # (counted from tensor sizes, not measured).
  c.model = ml_collections.ConfigDict(dict(kind="pixart", checkpoint="checkpoints/pixart_sigma_xl2_2k",
                                           image_size=2048, overrides={}, remat="full"))
  # T5-v1.1-XXL converted to a folder; its spiece.model beside config.json unless `spiece` names it.
  c.text = ml_collections.ConfigDict(dict(t5="checkpoints/t5_v1_1_xxl", spiece="", lowercase=False, batch_size=8))
  # A diffusers AutoencoderKL folder or weights file (the SDXL VAE); empty: samples stay latents.
  c.vae = ml_collections.ConfigDict(dict(path="checkpoints/sdxl_vae", scale=SDXL_SCALING_FACTOR))
  c.graft = [dict(site="attn", layers=list(PAPER_LAYERS), operator=operator, config=dict(op_config or {}),
                  init="fresh")]
  c.data = ml_collections.ConfigDict(dict(
      source="latents", resolution=2048,
      prompts="data/pixart_prompts_12k.txt",  # one prompt per line; the paper's 12k pairs
      embeddings="",  # optional precomputed .npz of those prompts instead of running T5
      synthetic_path="data/pixart_sigma_2k_synthetic_12k",  # empty: WORKDIR/synthetic
      distill_path="", finetune_path="",  # empty: the synthesized set
      distill_rows=8000, finetune_rows=0, heldout=64))
  placeholder = ml_collections.config_dict.placeholder
  # negative_prompt unset: guidance against the learned null caption, or "" for weights without one (diffusers').
  c.synthesize = ml_collections.ConfigDict(dict(per_prompt=1, steps=20, cfg_scale=4.5, seed=0, batch_size=8,
                                                shard_size=512, negative_prompt=placeholder(str),
                                                compute_dtype="bfloat16"))
  c.stages = ("synthesize", "distill", "finetune", "sample")
  c.distill = distill.default_config()  # AdamW 1e-4, batch 64, 200 epochs; L1 on attention outputs
  c.finetune = finetune.default_config()
  # LoRA rank 64 is the paper's; it gives no step count or schedule for this stage, so these are ours.
  c.finetune.update(dict(lora_rank=64, lora_targets=PIXART_LORA_TARGETS, steps=10_000, batch_size=64, lr=1e-4,
                         warmup_steps=500, ema_decay=0.999))
  c.sample = ml_collections.ConfigDict(dict(prompts=str(SAMPLE_PROMPTS), embeddings="", per_prompt=1, steps=20,
                                            cfg_scale=4.5, batch_size=4, seed=0, negative_prompt=placeholder(str),
                                            compute_dtype="bfloat16"))
  c.distributed = ml_collections.ConfigDict(dict(auto=False, coordinator_address=placeholder(str),
                                                 num_processes=placeholder(int), process_id=placeholder(int)))
  return shrink(c) if args.get("shrink", "0") not in ("0", "") else c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Tiny and random: a 64 px PixArt of depth 4 (16 tokens), 16-wide captions of 16 tokens from random embeddings,
  the sample prompts as the training prompts (2 samples each), a few steps per stage, LoRA rank 4, no VAE."""
  # init_noise: see pipeline.load_teacher; without it stage 2's LoRA factors would see zero gradients.
  c.model = ml_collections.ConfigDict(dict(kind="pixart", checkpoint="", image_size=64, init_noise=0.05,
                                           overrides=dict(depth=4, hidden_size=32, num_heads=2, caption_channels=16,
                                                          caption_length=16)))
  c.text.t5 = "random"
  c.vae.path = ""
  for entry in c.graft:
    entry["layers"] = [2, 3]  # the plan's tail (all of the last layers), at depth 4
    if "num_heads" in entry.get("config", {}):
      entry["config"]["num_heads"] = 2
  c.data.update(dict(resolution=64, prompts=str(SAMPLE_PROMPTS), synthetic_path="", distill_rows=0, heldout=8))
  c.synthesize.update(dict(per_prompt=2, batch_size=8, shard_size=16))
  c.distill.update(dict(steps=4, batch_size=8, log_every=2, checkpoint_every=2))
  c.finetune.update(dict(lora_rank=4, steps=4, batch_size=8, warmup_steps=2, log_every=2, checkpoint_every=2,
                         compute_dtype="float32"))
  c.sample.update(dict(batch_size=8))
  return c
