"""The embedded default, end to end on the demo set: train a small teacher DiT, graft half of its attention layers,
run stage 1 and stage 2, compare against controls, and write report.md / report.json with grids and loss plots.

Stages (listed in configs/demo.py): "teacher" trains the teacher from scratch (cached in workdir/teacher);
"compare" runs every variant as its own pipeline run under workdir/variants/NAME (so each resumes on its own);
"report" samples every model once, scores it with the domain feature network, and writes the report.
Variants: graft (stage 1 + stage 2), control (fresh scions straight to stage 2, same steps), self_mha (fresh MHA
scions, stage 1 + stage 2). "graft after stage 1" is the graft's student before stage 2.
"""
from __future__ import annotations

import copy
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax import checkpoints, graft, hosts, pipeline
from graft_jax.data.arrays import host_iterator
from graft_jax.data.demo import load_demo
from graft_jax.data.images import save_grid
from graft_jax.evaluation import domain
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.timing import median_ms
from graft_jax.train import finetune
from graft_jax.train.metrics import read_metrics


def teacher_dir(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "teacher"


def stage_teacher(config, workdir: pathlib.Path) -> dict:
  """Trains the teacher with DiT's diffusion loss from scratch; its EMA weights become workdir/teacher."""
  cfg = dit_config(config.model.preset, **config.model.overrides)
  x, y = load_demo("train", size=config.data.resolution)
  out = finetune.run_finetune(config.teacher, DiT(cfg), init_params(cfg, jax.random.key(config.seed)),
                              host_iterator({"x": x, "y": y}, config.teacher.batch_size, config.seed),
                              workdir / "teacher_run")
  ema = hosts.fetch(out["ema"])
  if hosts.is_writer():
    shutil.rmtree(teacher_dir(workdir), ignore_errors=True)
    checkpoints.save(teacher_dir(workdir), cfg, ema)
  return {"steps": out["step"], "batch_size": config.teacher.batch_size}


def variant_configs(config, workdir: pathlib.Path) -> dict:
  """name -> the pipeline config of that variant, on the trained teacher."""
  def make(plan, stages):
    c = copy.deepcopy(config).unlock()
    c.model.checkpoint = str(teacher_dir(workdir))
    c.graft, c.stages = plan, stages
    return c
  mha_plan = [dict(e, operator="mha", config=dict(num_heads=config.model.overrides.num_heads)) for e in config.graft]
  return {"graft": make(config.graft, ("distill", "finetune")),
          "control": make(config.graft, ("finetune",)),
          "self_mha": make(mha_plan, ("distill", "finetune"))}


def stage_compare(config, workdir: pathlib.Path) -> dict:
  done = {}
  for name, c in variant_configs(config, workdir).items():
    print(f"compare: variant {name}", flush=True)
    pipeline.run(c, workdir / "variants" / name)
    done[name] = str(workdir / "variants" / name)
  return done


def forward_latency_ms(model, params, batch: int) -> float:
  cfg = model.config
  x = jnp.zeros((batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = jnp.zeros((batch,), jnp.int32)
  return median_ms(jax.jit(lambda p: model.apply({"params": p}, x, t, t)), params, warmup=1, iters=5)


def models_to_compare(config, workdir: pathlib.Path) -> dict:
  """name -> (model, params) for the report, in its order."""
  teacher, teacher_params = checkpoints.load(teacher_dir(workdir))
  variants = variant_configs(config, workdir)
  graft_dir = workdir / "variants" / "graft"
  stage1, stage1_params = pipeline.student_from_stage1(variants["graft"], graft_dir, teacher, teacher_params)
  out = {"teacher": (teacher, teacher_params), "graft_stage1": (DiT(stage1), stage1_params)}
  for name, label in (("graft", "graft_stage1_2"), ("control", "control"), ("self_mha", "self_mha")):
    out[label] = checkpoints.load(workdir / "variants" / name / "student")
  return out


def training_cost(config, workdir: pathlib.Path) -> dict:
  """Steps and forward-FLOP-weighted compute of stages 1 + 2 as a fraction of the teacher's training.

  A training step costs about 3 forwards (forward + backward); a stage-1 step costs one teacher forward plus
  3 forwards of the scions only, which we bound above by 3 student forwards.
  """
  teacher_cfg = checkpoints.load_config(teacher_dir(workdir))
  student_cfg = checkpoints.load_config(workdir / "variants" / "graft" / "student")
  f_t, f_s = graft.model_flops(teacher_cfg), graft.model_flops(student_cfg)
  t_steps, t_batch = config.teacher.steps, config.teacher.batch_size
  d_steps, d_batch = config.distill.steps, config.distill.batch_size
  f_steps, f_batch = config.finetune.steps, config.finetune.batch_size
  teacher = t_steps * t_batch * 3 * f_t
  grafting = d_steps * d_batch * (f_t + 3 * f_s) + f_steps * f_batch * 3 * f_s
  return {"teacher_steps": t_steps, "stage1_steps": d_steps, "stage2_steps": f_steps,
          "steps_fraction": (d_steps + f_steps) / t_steps, "compute_fraction": grafting / teacher}


def stage_report(config, workdir: pathlib.Path) -> dict:
  size = config.data.resolution
  net, net_params, meta = domain.load_or_train(workdir / "domain_net.npz", config.report.domain_net_steps, size=size)
  test_x, test_y = load_demo("test", size=size)
  train_x, _ = load_demo("train", size=size)
  reference = domain.reference_statistics(net, net_params, train_x)
  rows = {}
  grids = workdir / "grids"
  for name, (model, params) in models_to_compare(config, workdir).items():
    images, labels = pipeline.sample_images(model, params, config.sample, f"report {name}")
    if hosts.is_writer():
      save_grid(images[np.argsort(labels, kind="stable")], grids / f"{name}.png", nrow=config.sample.per_class
                if config.sample.per_class <= 16 else 10)
    floats = images[..., :1].astype(np.float32) / 127.5 - 1.0
    fd = domain.frechet_distance_to(net, net_params, floats, reference)
    acc = domain.class_accuracy(net, net_params, floats, labels)
    rows[name] = {"fd": fd["fd"], "accuracy": acc["accuracy"], "per_class_accuracy": acc["per_class"].tolist(),
                  "params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
                  "latency_ms": forward_latency_ms(model, params, config.report.latency_batch),
                  "grid": f"grids/{name}.png"}
  # The data's own FD: held-out real digits against the training statistics, the floor any model can reach.
  data_fd = domain.frechet_distance_to(net, net_params, test_x, reference)["fd"]
  stage1 = json.loads((workdir / "variants" / "graft" / "stages" / "distill.json").read_text())
  report = {"feature_net": meta["name"], "feature_net_test_accuracy": meta["test_accuracy"],
            "real_heldout_fd": data_fd, "models": rows,
            "stage1_heldout_relative_error": stage1["heldout_relative_error"],
            "cost": training_cost(config, workdir), "plan": [dict(e) for e in config.graft]}
  teacher_fd, graft_fd, control_fd = (rows[k]["fd"] for k in ("teacher", "graft_stage1_2", "control"))
  report["claims"] = {
      "graft_fd_within_15pct_of_teacher": graft_fd <= 1.15 * teacher_fd,
      "graft_fd_over_teacher": graft_fd / teacher_fd,
      "under_10pct_of_teacher_steps": report["cost"]["steps_fraction"] < 0.10,
      "control_worse_than_graft": control_fd > graft_fd}
  if hosts.is_writer():
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    (workdir / "report.md").write_text(render(report))
    plot_losses(workdir)
  print(render(report), flush=True)
  return {"report": "report.md", "claims": report["claims"]}


def render(r: dict) -> str:
  lines = ["# Grafting demo report", "",
           f"Plan: {r['plan']}", "",
           f"Feature network {r['feature_net']} (held-out accuracy {r['feature_net_test_accuracy']:.3f}); "
           f"FD of held-out real digits: {r['real_heldout_fd']:.3f} (the floor).", "",
           "| model | FD | class accuracy | params | forward latency (ms) |", "|---|---|---|---|---|"]
  for name, m in r["models"].items():
    lines.append(f"| {name} | {m['fd']:.3f} | {m['accuracy']:.3f} | {m['params']:,} | {m['latency_ms']:.2f} |")
  cost = r["cost"]
  lines += ["", f"Stage 1 {cost['stage1_steps']} steps + stage 2 {cost['stage2_steps']} steps against "
            f"{cost['teacher_steps']} teacher steps: {100 * cost['steps_fraction']:.1f}% of the steps, "
            f"{100 * cost['compute_fraction']:.1f}% of the training compute.", "",
            "Stage-1 held-out relative error per grafted site:", ""]
  lines += [f"- {site}: {err:.4f}" for site, err in r["stage1_heldout_relative_error"].items()]
  c = r["claims"]
  lines += ["", "## The method's claim at this scale", "",
            f"- graft FD / teacher FD = {c['graft_fd_over_teacher']:.3f} "
            f"({'within' if c['graft_fd_within_15pct_of_teacher'] else 'NOT within'} 15%)",
            f"- stages 1 + 2 used {'under' if c['under_10pct_of_teacher_steps'] else 'NOT under'} 10% of the "
            "teacher's steps",
            f"- the control (fresh scions, stage 2 only) is {'worse' if c['control_worse_than_graft'] else 'NOT worse'}"
            " than the graft", "", "Grids: grids/NAME.png; loss curves: losses.png.", ""]
  return "\n".join(lines)


def plot_losses(workdir: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = {"teacher": workdir / "teacher_run" / "finetune" / "metrics" / "metrics.jsonl"}
  for name in ("graft", "control", "self_mha"):
    runs[f"{name} stage 2"] = workdir / "variants" / name / "finetune" / "metrics" / "metrics.jsonl"
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for name, path in runs.items():
    rows = read_metrics(path)
    if rows:
      a.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
  rows = read_metrics(workdir / "variants" / "graft" / "distill" / "metrics" / "metrics.jsonl")
  for key in sorted(k for k in (rows[0] if rows else {}) if k.startswith("loss/")):
    b.plot([r["step"] for r in rows], [r[key] for r in rows], label=key[5:])
  a.set(title="diffusion loss", xlabel="step", yscale="log")
  b.set(title="stage 1 (graft) per-site loss", xlabel="step", yscale="log")
  a.legend()
  b.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / "losses.png", dpi=100)
  plt.close(fig)


STAGES = {"teacher": stage_teacher, "compare": stage_compare, "report": stage_report}
