"""Config builders behind configs/*.py: a grafting experiment on a teacher, its stages and their settings.

A config file calls `graft_experiment(site, operator, op_config, arg)` or `parallel_experiment(arg)`. The argument
string (after the colon in `--config=configs/dit_xl2_swa.py:ratio=75,shrink=1`) sets:
  ratio=50|75|100   share of layers grafted: odd layers, all but every fourth, or all (default 50; operators only)
  shrink=1          a tiny random teacher on the embedded demo set with a few steps: for tests and a first look
"""
from __future__ import annotations

import ml_collections

from graft_jax.train import distill, finetune

RATIO_LAYERS = {50: "odd", 75: "three_of_four", 100: "all"}


def parse_arg(arg: str | None) -> dict[str, str]:
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value (e.g. ratio=75,shrink=1).")
    out[key.strip()] = value.strip()
  return out


def base_config() -> ml_collections.ConfigDict:
  """DiT-XL/2 on ImageNet-256 latents, the paper's stage 1 and stage 2, then 50k samples for the ADM evaluator."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # remat (operators/remat.py) applies to the checkpoint's model too: "elementwise" fits the paper's batch-256
  # stage 2 in an 80 GB GPU (74 GB on an H200) for 3% of step time.
  c.model = ml_collections.ConfigDict(dict(checkpoint="checkpoints/dit_xl2", preset="DiT-XL/2", overrides={},
                                           remat="elementwise"))
  c.graft = []
  c.data = ml_collections.ConfigDict(dict(
      # "latents": shard folders from `python -m graft_jax.data.cli encode` (8 and 128 images per class);
      # "npz": one file with arrays x (N, H, W, C) scaled latents and y (N,); "demo": the embedded digits.
      source="latents", resolution=256,
      distill_path="data/imagenet256_8pc", finetune_path="data/imagenet256_128pc", heldout=256))
  c.stages = ("distill", "finetune", "sample")
  c.distill = distill.default_config()
  c.finetune = finetune.default_config()
  # compute_dtype float32: what DiT's published FIDs were sampled with; bfloat16 is faster on a GPU.
  c.sample = ml_collections.ConfigDict(dict(sampler="ddpm", steps=250, cfg_scale=1.5, guided_channels=3,
                                            per_class=50, batch_size=250, seed=0, compute_dtype="float32"))
  # Several processes (hosts): set coordinator_address, num_processes and process_id (or the JAX_* environment
  # variables), or auto=True where JAX detects the cluster itself (Cloud TPU pods, SLURM). Unset: one process.
  placeholder = ml_collections.config_dict.placeholder
  c.distributed = ml_collections.ConfigDict(dict(auto=False, coordinator_address=placeholder(str),
                                                 num_processes=placeholder(int), process_id=placeholder(int)))
  return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment on a tiny random teacher and the demo set, small enough for a CPU test."""
  c.model = ml_collections.ConfigDict(dict(checkpoint="", preset="DiT-S/2", overrides=dict(
      depth=4, hidden_size=64, num_heads=2, input_size=16, in_channels=1, num_classes=10)))
  for entry in c.graft:
    if "num_heads" in entry.get("config", {}):
      entry["config"]["num_heads"] = 2
  c.data.source, c.data.heldout, c.data.resolution = "demo", 32, 16
  c.distill.update(dict(steps=4, batch_size=16, log_every=2, checkpoint_every=2))
  c.finetune.update(dict(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=2,
                         compute_dtype="float32"))
  c.sample.update(dict(sampler="ddim", steps=4, per_class=1, batch_size=10, cfg_scale=4.0))
  return c


def graft_experiment(site: str, operator: str, op_config: dict | None, arg: str | None,
                     init: str = "fresh") -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  unknown = set(args) - {"ratio", "shrink"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use ratio=50|75|100 and shrink=1.")
  ratio = int(args.get("ratio", 50))
  if ratio not in RATIO_LAYERS:
    raise ValueError(f"ratio must be one of {sorted(RATIO_LAYERS)}, got {ratio}.")
  c = base_config()
  c.graft = [dict(site=site, layers=RATIO_LAYERS[ratio], operator=operator, config=dict(op_config or {}),
                  init=init)]
  return shrink(c) if args.get("shrink", "0") not in ("0", "") else c


def parallel_experiment(arg: str | None) -> ml_collections.ConfigDict:
  """Depth to width: every two consecutive blocks become one parallel pair (DiT-XL/2: 28 -> 14 layers), distilled
  (L1) on 8k samples, then fine-tuned on 25% of ImageNet with the lr halved at 75k and 150k steps. The paper gives
  no total; 200k steps run past both milestones."""
  args = parse_arg(arg)
  if set(args) - {"shrink"}:
    raise ValueError(f"unknown config argument(s) {sorted(set(args) - {'shrink'})}; use shrink=1.")
  c = base_config()
  c.graft = [dict(kind="parallel_pairs", layers="all", init="teacher")]
  c.data.finetune_path = "data/imagenet256_320pc"  # 25% of ImageNet: 320 images per class
  c.finetune.update(dict(steps=200_000, lr_milestones=(75_000, 150_000)))
  return shrink(c) if args.get("shrink", "0") not in ("0", "") else c


DEMO_OPERATORS = {"swa": dict(num_heads=4, window=4), "hyena_x": dict()}


def demo_experiment(arg: str | None) -> ml_collections.ConfigDict:
  """configs/demo.py: the embedded default on the demo digits at 16x16 (see that file)."""
  args = parse_arg(arg)
  operator = args.get("operator", "swa")
  if operator not in DEMO_OPERATORS or set(args) - {"operator", "shrink"}:
    raise ValueError(f"demo arguments are operator={'|'.join(DEMO_OPERATORS)} and shrink=1, got {arg!r}.")
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(checkpoint="", preset="DiT-S/2", overrides=dict(
      depth=4, hidden_size=64, num_heads=4, input_size=16, in_channels=1, num_classes=10)))
  c.graft = [dict(site="attn", layers="odd", operator=operator, config=DEMO_OPERATORS[operator], init="fresh")]
  c.data.source, c.data.heldout, c.data.resolution = "demo", 128, 16
  c.stages = ("teacher", "compare", "report")
  # The teacher: DiT's diffusion loss from scratch. Short runs need a short EMA horizon.
  c.teacher = ml_collections.ConfigDict(c.finetune.to_dict())
  # Sized for 15 minutes on 2 CPU cores: the teacher's 2200 steps are most of it; stages 1 + 2 take 210 steps
  # (9.5% of the teacher's); 300 samples per model at 20 DDIM steps. The teacher's EMA horizon (1 / (1 - decay) =
  # 200 steps) must be short against its run: at 0.999 its weights would still carry the untrained start.
  c.teacher.update(dict(steps=2200, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995, grad_clip=1.0,
                        compute_dtype="float32", log_every=200, checkpoint_every=1100))
  c.distill.update(dict(steps=110, batch_size=64, lr=2e-3, log_every=55, checkpoint_every=110))
  c.finetune.update(dict(steps=100, batch_size=64, lr=3e-4, warmup_steps=10, ema_decay=0.99, grad_clip=1.0,
                         compute_dtype="float32", log_every=50, checkpoint_every=100))
  c.sample.update(dict(sampler="ddim", steps=20, cfg_scale=2.0, guided_channels=None, per_class=30, batch_size=300))
  c.report = ml_collections.ConfigDict(dict(latency_batch=64, domain_net_steps=600))
  if args.get("shrink", "0") not in ("0", ""):
    c.model.overrides.update(dict(depth=2, hidden_size=32, num_heads=2))
    if "num_heads" in c.graft[0]["config"]:
      c.graft[0]["config"] = dict(c.graft[0]["config"], num_heads=2)
    c.teacher.update(dict(steps=20, batch_size=16, warmup_steps=2, log_every=10, checkpoint_every=20))
    c.distill.update(dict(steps=4, batch_size=16, log_every=2, checkpoint_every=4))
    c.finetune.update(dict(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=4))
    c.sample.update(dict(steps=3, per_class=2, batch_size=20))
    c.data.heldout = 32
    c.report.domain_net_steps = 50
  return c


def demo_gpu_experiment(arg: str | None) -> ml_collections.ConfigDict:
  """configs/demo_gpu.py: the demo at the paper's token count (32x32 digits, patch 2: 256 tokens) with a DiT-B-sized
  teacher (depth 12, width 768, 12 heads), bf16 compute, for one GPU. With shrink=1 it is the demo's tiny version
  at 32 px."""
  c = demo_experiment(arg)
  c.model.overrides.input_size = c.data.resolution = 32
  if parse_arg(arg).get("shrink", "0") not in ("0", ""):
    return c
  c.model.overrides.update(dict(depth=12, hidden_size=768, num_heads=12))
  if "num_heads" in c.graft[0]["config"]:
    c.graft[0]["config"] = dict(c.graft[0]["config"], num_heads=12)
  c.teacher.update(dict(steps=3000, batch_size=128, lr=5e-4, warmup_steps=200, compute_dtype="bfloat16",
                        log_every=250, checkpoint_every=1000))
  c.distill.update(dict(steps=300, batch_size=128, lr=1e-3, compute_dtype="bfloat16", log_every=100,
                        checkpoint_every=300))
  c.finetune.update(dict(steps=240, batch_size=128, lr=2e-4, warmup_steps=20, compute_dtype="bfloat16",
                         log_every=80, checkpoint_every=240))
  c.report.latency_batch = 256
  return c
