"""Stage 2 of DiT-XL/2 over the GPUs of one host: data + FSDP sharding against one GPU in the same run (issue: scale
out, point 1). Weak scaling: each GPU keeps the per-device batch, so the global batch grows with the device count.

python benchmarks/scaling.py [--per-device-batch 128] [--out benchmarks/results]
Efficiency = img/s on n devices / (n x img/s on one). Writes scaling.json with the command, machine and date.
"""
from __future__ import annotations

import argparse

import jax

from benchmarks.common import write_results
from benchmarks.dit import batch_of, peak_memory_gb, train_runner, train_step_ms
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.train import finetune, partition


def meshes(n: int) -> list[dict]:
  """Layouts worth comparing on n devices: pure data parallel, pure FSDP, and both when n allows."""
  out = [{"data": n, "fsdp": 1}, {"data": 1, "fsdp": n}]
  if n >= 4:
    out.append({"data": n // 2, "fsdp": 2})
  return out


def layout_name(mesh: dict) -> str:
  return "both" if mesh["data"] > 1 and mesh["fsdp"] > 1 else "data" if mesh["data"] > 1 else "fsdp"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--per-device-batch", type=int, default=128)
  parser.add_argument("--layouts", default="data,fsdp", help="which n-device meshes: data, fsdp, both")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  cfg = dit_config("DiT-XL/2")
  model, params = DiT(cfg), init_params(cfg, jax.random.key(0))
  devices = jax.devices()
  rows, single = [], None
  layouts = [m for m in meshes(len(devices)) if layout_name(m) in args.layouts.split(",")] if len(devices) > 1 else []
  for layout in [{"data": 1, "fsdp": 1}] + layouts:
    n = layout["data"] * layout["fsdp"]
    config = finetune.default_config()
    config.update(dict(batch_size=args.per_device_batch * n, mesh=layout))
    mesh = partition.make_mesh(layout, devices[:n])
    ms = train_step_ms(train_runner(config, model, params, mesh, batch_of(config.batch_size)))
    row = {"devices": n, "mesh": layout, "global_batch": config.batch_size, **ms,
           "img_per_s": config.batch_size / ms["ms"] * 1e3, "peak_mem_gb_device0": peak_memory_gb(devices[0])}
    single = single or row["img_per_s"]
    row["efficiency"] = row["img_per_s"] / (n * single)
    rows.append(row)
    print(row, flush=True)
  best = max((r for r in rows if r["devices"] > 1), key=lambda r: r["efficiency"], default=None)
  extra = {"dtype": "bfloat16", "step": "stage-2 train step (diffusion loss, AdamW, EMA)", "target_efficiency": 0.9,
           "best_efficiency": best and best["efficiency"], "target_met": bool(best and best["efficiency"] >= 0.9)}
  print(write_results("scaling", rows, extra, args.out))


if __name__ == "__main__":
  main()
