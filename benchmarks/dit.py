"""DiT-XL/2 on one accelerator, bf16: the stage-2 train step (AdamW + EMA) and the forward pass at batch 256, and
the depth-14 parallel-pair model against the depth-28 teacher (issues: stage 2 point 7, depth to width point 4).

python benchmarks/dit.py [--what train,forward,depth] [--remat none|elementwise[+SITE_in]|dots|full]
  [--gelu-kernel auto|xla] [--attention auto|cudnn|xla|mosaic] [--data N] [--fsdp N] [--profile] [--out DIR]
The PyTorch side is ../shared/bench/torch_reference.py (dit_fwd dit_train), run in the same device call; pass its
JSON lines with --torch FILE to put the ratios into the results. Writes dit_xl2.json (dit_xl2_train.json or
dit_xl2_forward.json when --what has only one of the two) and depth_to_width.json. While the train step is timed,
only its state holds the parameters, so its peak memory is a training run's (results up to dit_xl2_train.json of
2026-11-30 12:53 UTC include a float32 copy of them besides: 2.7 GB for DiT-XL/2).
With --data / --fsdp the train step and the forward run sharded over that many devices (the training code's mesh;
the batch split over both axes), and the results go to dit_xl2_data{N}_fsdp{N}.json; peak memory is device 0's.
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import sampled_loop_ms, with_options, write_results
from benchmarks.profile import call_profile
from graft_jax import graft
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.timing import loop_ms, median_ms
from graft_jax.train import finetune, partition
from graft_jax.train.state import cast_floating, create_state


def peak_memory_gb(device=None) -> float | None:
  stats = (device or jax.devices()[0]).memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def batch_of(size: int, key: int = 0) -> dict:
  rng = np.random.default_rng(key)
  return {"x": rng.standard_normal((size, 32, 32, 4), np.float32),
          "y": rng.integers(0, 1000, size).astype(np.int32)}


def train_runner(config, model, params, mesh, batch):
  """A closure that dispatches one real stage-2 step (donated state, so each call feeds the next) and returns the
  step's loss without waiting for it."""
  optimizer = finetune.make_optimizer(config)
  holder = {}
  holder["state"], shardings = create_state(config, params, mesh, optimizer)
  step = partition.jit_step(finetune.make_train_step(config, model, finetune.diffusion_for(model), optimizer),
                            shardings, mesh)
  batch = partition.shard_batch(mesh, batch)

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]
  return run


def timings(run) -> dict:
  """`ms`: loop_ms, the PyTorch reference's method (the ratios use it), and `gpu`: the clock and power over its calls
  (`sampled_loop_ms`); `synchronised_ms`: median_ms, each call waited for (latency: adds the host's dispatch and
  launch gaps)."""
  ms, conditions = sampled_loop_ms(run)
  return {"ms": ms, "gpu": conditions, "synchronised_ms": median_ms(run)}


def train_step_ms(run) -> dict:
  """`timings` of `run` (a train_runner); then one more step must be finite."""
  ms = timings(run)
  if not np.isfinite(float(run())):
    raise RuntimeError("the benchmarked train step produced a non-finite loss")
  return ms


def forward_runner(model, params, batch, mesh=None):
  """The undifferentiated forward at t = 500; with a mesh, the batch is split over it and the weights replicated."""
  params = cast_floating(params, jnp.bfloat16)
  batch = {"x": batch["x"].astype(jnp.bfloat16), "y": batch["y"], "t": np.full(batch["y"].shape, 500, np.int32)}
  if mesh is not None:
    batch = partition.shard_batch(mesh, batch)
  x, t, y = (jnp.asarray(batch[k]) for k in ("x", "t", "y"))
  fn = jax.jit(model.apply)
  return lambda: fn({"params": params}, x, t, y)


def forward_ms(model, params, batch) -> float:
  return loop_ms(forward_runner(model, params, batch))


def bench_dit(batch_size: int, remat: str = "none", profile: bool = False, train: bool = True, forward: bool = True,
              gelu_kernel: str = "auto", mesh_sizes: dict | None = None, attention: str = "auto") -> list[dict]:
  """The stage-2 train step's row (when `train`), then the forward's (when `forward`), on one mesh."""
  cfg = with_options(dit_config("DiT-XL/2", remat=remat), "mlp", "mlp", gelu_kernel=gelu_kernel)
  cfg = with_options(cfg, "attn", "mha", backend=attention)
  model = DiT(cfg)
  config = finetune.default_config()
  config.update(dict(batch_size=batch_size, mesh=mesh_sizes or {"data": 1, "fsdp": 1}))
  mesh = partition.make_mesh(config.mesh, jax.devices()[:math.prod(config.mesh.values())])
  sharded = {"devices": mesh.size, "mesh": dict(config.mesh)} if mesh.size > 1 else {}
  rows = []
  if train:
    # Only the train state holds the parameters while the step is timed, as in a training run: its peak memory.
    run = train_runner(config, model, init_params(cfg, jax.random.key(0)), mesh, batch_of(batch_size))
    ms = train_step_ms(run)
    rows.append({"what": "dit_xl2_train_step_bf16_adamw_ema", "batch": batch_size, "remat": remat,
                 "gelu_kernel": gelu_kernel, "attention": attention, **sharded, **ms,
                 "img_per_s": batch_size / ms["ms"] * 1e3, "peak_mem_gb": peak_memory_gb()})
    if profile:
      rows[-1]["profile"] = call_profile(run, top=40)
    print(rows[-1], flush=True)
    del run  # frees the train state before the forward runs
  if not forward:
    return rows
  params = init_params(cfg, jax.random.key(0))
  run = forward_runner(model, params, batch_of(batch_size), mesh if mesh.size > 1 else None)
  fwd = timings(run)
  forward = {"what": "dit_xl2_forward_bf16", "batch": batch_size, "gelu_kernel": gelu_kernel, "attention": attention,
             **sharded, **fwd,
             "img_per_s": batch_size / fwd["ms"] * 1e3}
  if profile:
    forward["profile"] = call_profile(run, top=25)
  print(forward, flush=True)
  return rows + [forward]


def bench_depth() -> list[dict]:
  teacher = dit_config("DiT-XL/2")
  params = init_params(teacher, jax.random.key(0))
  edits = graft.parse_plan([{"kind": "parallel_pairs", "layers": "all"}], teacher)
  student, student_params = graft.graft(teacher, params, edits, jax.random.key(1))
  rows = []
  for batch_size in (2, 256):
    batch = batch_of(batch_size)
    t_ms = forward_ms(DiT(teacher), params, batch)
    s_ms = forward_ms(DiT(student), student_params, batch)
    rows.append({"batch": batch_size, "teacher_depth": teacher.depth, "student_layers": len(student.layers),
                 "teacher_ms": t_ms, "parallel_ms": s_ms, "speedup": t_ms / s_ms})
    print(rows[-1], flush=True)
  return rows


def torch_lines(path: str | None) -> list[dict]:
  """The JSON lines torch_reference.py printed (none without a file)."""
  return [json.loads(line) for line in open(path) if line.startswith("{")] if path else []


def torch_rows(path: str | None) -> dict:
  return {r["what"]: r for r in torch_lines(path)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--what", default="train,forward,depth", help="any of train, forward, depth (comma-separated)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--remat", default="none", help="the model's remat policy for the train step, as "
                      "operators/remat.py lists: none, elementwise, elementwise+attn_in, elementwise+mlp_in, "
                      "elementwise+attn_in+mlp_in, dots, full")
  parser.add_argument("--profile", action="store_true", help="add each run's device time by kernel")
  parser.add_argument("--gelu-kernel", default="auto", help="the MLPs' fc1 + GELU: auto, xla or mosaic")
  parser.add_argument("--attention", default="auto", help="MHA's backend: auto, cudnn, xla or mosaic")
  parser.add_argument("--data", type=int, default=1, help="devices along the mesh's data axis")
  parser.add_argument("--fsdp", type=int, default=1, help="devices along the mesh's fsdp axis")
  parser.add_argument("--torch", help="JSON lines printed by shared/bench/torch_reference.py in the same run")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  what = args.what.split(",")
  unknown = sorted(set(what) - {"train", "forward", "depth"})
  if unknown:
    parser.error(f"--what takes train, forward and depth, not {', '.join(unknown)}.")
  runs = [w for w in ("train", "forward") if w in what]
  if runs:
    mesh = {"data": args.data, "fsdp": args.fsdp}
    rows = bench_dit(args.batch, args.remat, args.profile, train="train" in runs, forward="forward" in runs,
                     gelu_kernel=args.gelu_kernel, mesh_sizes=mesh, attention=args.attention)
    ref = torch_rows(args.torch)
    extra = {"torch_reference": list(ref.values())}
    # Each row's torch.compile counterpart and the speed-up the issue asks over it.
    targets = {"dit_xl2_train_step_bf16_adamw_ema": ("dit_xl2_train_amp_bf16_compiled_adamw", 1.2),
               "dit_xl2_forward_bf16": ("dit_xl2_fwd_bf16_compiled", 1.15)}
    for row in rows:
      name, speedup = targets[row["what"]]
      if name in ref:
        row["vs_torch_compile"] = row["img_per_s"] / ref[name]["img_per_s"]
        row["target_met"] = row["vs_torch_compile"] >= speedup and (row.get("peak_mem_gb") or 0) < 80
    extra["targets"] = {"train_vs_torch_compile": 1.2, "forward_vs_torch_compile": 1.15, "train_peak_mem_gb": 80}
    # A run of one of the two does not overwrite the file of both.
    name = "dit_xl2" + ("" if len(runs) == 2 else f"_{runs[0]}")
    name += "" if args.data * args.fsdp == 1 else f"_data{args.data}_fsdp{args.fsdp}"
    print(write_results(name, rows, extra, args.out))
  if "depth" in what:
    print(write_results("depth_to_width", bench_depth(), {"dtype": "bfloat16", "attention": "auto (cuDNN)"},
                        args.out))


if __name__ == "__main__":
  main()
