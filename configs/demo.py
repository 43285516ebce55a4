"""The embedded default: the whole grafting pipeline on the demo set (scikit-learn's digits, 16x16, no VAE).

python -m graft_jax.main --config=configs/demo.py --workdir=runs/demo
Arguments: operator=swa|hyena_x (default swa), shrink=1 (a few steps of everything: the test's version).
Trains a small teacher DiT (cached in the workdir), grafts its odd attention layers, runs stage 1 and stage 2,
compares with a fresh-scion control and self-grafted MHA, and writes report.md / report.json, grids, losses.png.
"""
import ml_collections

from graft_jax.experiment import base_config, parse_arg

OPERATORS = {"swa": dict(num_heads=4, window=4), "hyena_x": dict()}


def get_config(arg=None):
  args = parse_arg(arg)
  operator = args.get("operator", "swa")
  if operator not in OPERATORS or set(args) - {"operator", "shrink"}:
    raise ValueError(f"demo arguments are operator={'|'.join(OPERATORS)} and shrink=1, got {arg!r}.")
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(checkpoint="", preset="DiT-S/2", overrides=dict(
      depth=4, hidden_size=64, num_heads=4, input_size=16, in_channels=1, num_classes=10)))
  c.graft = [dict(site="attn", layers="odd", operator=operator, config=OPERATORS[operator], init="fresh")]
  c.data.source, c.data.heldout = "demo", 128
  c.stages = ("teacher", "compare", "report")
  # The teacher: DiT's diffusion loss from scratch. Short runs need a short EMA horizon.
  c.teacher = ml_collections.ConfigDict(c.finetune.to_dict())
  c.teacher.update(dict(steps=3000, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.999, grad_clip=1.0,
                        compute_dtype="float32", log_every=200, checkpoint_every=1000))
  c.distill.update(dict(steps=150, batch_size=64, lr=2e-3, log_every=50, checkpoint_every=150))
  c.finetune.update(dict(steps=120, batch_size=64, lr=3e-4, warmup_steps=10, ema_decay=0.99, grad_clip=1.0,
                         compute_dtype="float32", log_every=40, checkpoint_every=120))
  c.sample.update(dict(sampler="ddim", steps=25, cfg_scale=2.0, guided_channels=None, per_class=50, batch_size=250))
  c.report = ml_collections.ConfigDict(dict(latency_batch=64, domain_net_steps=600))
  if args.get("shrink", "0") not in ("0", ""):
    c.model.overrides.update(dict(depth=2, hidden_size=32, num_heads=2))
    c.graft[0]["config"] = dict(OPERATORS[operator], **({"num_heads": 2} if "num_heads" in OPERATORS[operator]
                                                        else {}))
    c.teacher.update(dict(steps=20, batch_size=16, warmup_steps=2, log_every=10, checkpoint_every=20))
    c.distill.update(dict(steps=4, batch_size=16, log_every=2, checkpoint_every=4))
    c.finetune.update(dict(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=4))
    c.sample.update(dict(steps=3, per_class=2, batch_size=20))
    c.data.heldout = 32
    c.report.domain_net_steps = 50
  return c
