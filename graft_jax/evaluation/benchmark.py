"""`job=benchmark` (stage "benchmark"): teacher against student on this process's first local device.

The student is `benchmark.student` (a saved model folder), else the workdir's fine-tuned student/, else the graft
plan applied to the teacher (stage-1 scions when workdir/stage1 exists, else fresh ones: speed does not depend on
the weights). For each model, with parameters and inputs in `benchmark.dtype`:
  forward latency   median ms of one jitted forward (graft_jax.timing.median_ms) at `latency_batch` (the paper's
                    batch 2) and at `throughput_batch`, whose images/s is the throughput
  sampling          the median ms of ONE jitted DDIM step (model call with CFG on the doubled batch plus the update)
                    at `sample_batch`; images/s for `sample_steps` steps is extrapolated as
                    batch / (steps * step time), not measured over a whole run (a run is that step repeated)
  memory            XLA's compiled estimate (arguments + outputs + temporaries) of each program, on every platform;
                    the device's peak bytes in use (memory_stats) on GPU/TPU, null on CPU where JAX keeps no stats
  size              parameters, and forward FLOPs per image from graft.model_flops
Writes benchmark.json and benchmark.md.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp

from graft_jax import checkpoints, graft, hosts, pipeline
from graft_jax.diffusion import cfg_model_fn, make_diffusion
from graft_jax.files import write_atomic
from graft_jax.models import DiT
from graft_jax.sample import at_compute_dtype
from graft_jax.timing import median_ms
from graft_jax.train.state import cast_floating

MEMORY_NOTE = ("compiled_bytes: XLA's estimate for one program (arguments + outputs + temporaries). "
               "device_peak_bytes: the device allocator's high-water mark for the process after the model's runs, "
               "both models' weights resident (null where the platform keeps no statistics, e.g. CPU). The student "
               "runs first; device_peak_is_upper_bound is true when a model's runs did not raise the mark, so its "
               "value is the earlier peak.")


def load_student(config, workdir: pathlib.Path, teacher, teacher_params):
  """(model, params, where it came from)."""
  b = config.benchmark
  folder = pathlib.Path(b.student) if b.student else workdir / "student"
  if folder.exists():
    return *checkpoints.load(folder), str(folder)
  if b.student:
    raise pipeline.UserError(f"benchmark.student {b.student} does not exist; give a saved model folder.")
  if not config.graft:
    raise pipeline.UserError("benchmark compares the teacher with a student: give a graft plan, benchmark.student, "
                             "or a workdir holding student/.")
  student, params = pipeline.student_from_stage1(config, workdir, teacher, teacher_params)
  scions = "stage-1" if (workdir / "stage1").exists() else "fresh"
  return DiT(student), params, f"graft plan ({scions} scions)"


def compile_and_time(fn, args, b) -> dict:
  """Compiles fn for args ahead of time (so the memory estimate and the timed program are the same one), then
  times it with median_ms."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  nbytes = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return {"ms": median_ms(compiled, *args, warmup=b.warmup, iters=b.iters), "compiled_bytes": nbytes}


def device_peak_bytes():
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def measure(model, params, config) -> dict:
  b, s = config.benchmark, config.sample
  cfg = model.config
  dtype = jnp.dtype(b.dtype)
  params = jax.device_put(cast_floating(params, dtype), jax.local_devices()[0])
  key = jax.random.key(b.seed)

  def inputs(batch):
    x = jax.random.normal(key, (batch, cfg.input_size, cfg.input_size, cfg.in_channels), dtype)
    return x, jnp.full((batch,), 500, jnp.int32), jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes

  forward = lambda p, x, t, y: model.apply({"params": p}, x, t, y)
  out = {"params": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
         "flops_per_image": graft.model_flops(cfg), "forward": {}}
  for name, batch in (("latency", b.latency_batch), ("throughput", b.throughput_batch)):
    r = compile_and_time(forward, (params, *inputs(batch)), b)
    out["forward"][name] = {"batch": int(batch), **r, "images_per_s": batch * 1e3 / r["ms"],
                            "tflops_per_s": batch * out["flops_per_image"] / r["ms"] / 1e9}

  diffusion = make_diffusion(1000, f"ddim{b.sample_steps}", "learned_range" if cfg.learn_sigma else "fixed_small")

  def ddim_step(p, x, y):
    apply = at_compute_dtype(lambda q, x, t, y: model.apply({"params": q}, x, t, y), p, dtype)
    model_fn = cfg_model_fn(apply, y, s.cfg_scale, cfg.num_classes, s.guided_channels)
    t = jnp.full((x.shape[0],), b.sample_steps // 2, jnp.int32)  # any step costs the same; the middle one
    return diffusion.ddim_sample(model_fn, x, t, jnp.zeros_like(x))

  x, _, y = inputs(b.sample_batch)
  r = compile_and_time(ddim_step, (params, x.astype(jnp.float32), y), b)
  out["sampling"] = {"batch": int(b.sample_batch), "step_ms": r["ms"], "compiled_bytes": r["compiled_bytes"],
                     "images_per_s": b.sample_batch * 1e3 / (b.sample_steps * r["ms"])}
  return out


def stage_benchmark(config, workdir: pathlib.Path) -> dict:
  teacher, teacher_params = pipeline.load_teacher(config)
  student, student_params, source = load_student(config, workdir, teacher, teacher_params)
  models = {}
  # The student first: its peak is then its own, and the teacher's is exact whenever the teacher needs more.
  for name, (model, params) in (("student", (student, student_params)), ("teacher", (teacher, teacher_params))):
    print(f"benchmark: {name}", flush=True)
    before = device_peak_bytes()
    models[name] = measure(model, params, config)
    peak = device_peak_bytes()
    models[name]["device_peak_bytes"] = peak
    models[name]["device_peak_is_upper_bound"] = None if peak is None else bool(before and peak <= before)
  t, s = models["teacher"], models["student"]
  b = config.benchmark
  result = {
      "device": jax.local_devices()[0].device_kind, "platform": jax.default_backend(), "dtype": b.dtype,
      "teacher": config.model.checkpoint or config.model.preset, "student": source,
      "timing": f"median of {b.iters} synchronised calls after compile and {b.warmup} warm-up calls "
                "(graft_jax.timing.median_ms)",
      "sampling_method": f"one DDIM step timed (CFG {config.sample.cfg_scale}, model batch doubled when CFG is on), "
                         f"images/s extrapolated to {b.sample_steps} steps as batch / (steps * step time)",
      "memory_note": MEMORY_NOTE,
      "models": models,
      "speedup": {"forward_latency": t["forward"]["latency"]["ms"] / s["forward"]["latency"]["ms"],
                  "forward_throughput": s["forward"]["throughput"]["images_per_s"]
                  / t["forward"]["throughput"]["images_per_s"],
                  "sampling": s["sampling"]["images_per_s"] / t["sampling"]["images_per_s"]},
      "flops_ratio": s["flops_per_image"] / t["flops_per_image"],
      "params_ratio": s["params"] / t["params"],
  }
  if hosts.is_writer():  # with several processes each times its own first device; process 0 writes
    write_atomic(workdir / "benchmark.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    write_atomic(workdir / "benchmark.md", lambda f: f.write(render(result).encode()))
  print(render(result), flush=True)
  return {"benchmark": "benchmark.json", "speedup": result["speedup"]}


def _mib(n):
  return "n/a" if n is None else f"{n / 2 ** 20:.1f}"


def render(r: dict) -> str:
  m = r["models"]
  lat, thr = (m["teacher"]["forward"][k]["batch"] for k in ("latency", "throughput"))
  rows = [("params", lambda x: f"{x['params']:,}"),
          ("forward GFLOPs / image", lambda x: f"{x['flops_per_image'] / 1e9:.4g}"),
          (f"forward ms, batch {lat}", lambda x: f"{x['forward']['latency']['ms']:.3f}"),
          (f"forward ms, batch {thr}", lambda x: f"{x['forward']['throughput']['ms']:.3f}"),
          (f"forward images/s, batch {thr}", lambda x: f"{x['forward']['throughput']['images_per_s']:.1f}"),
          (f"forward TFLOP/s, batch {thr}", lambda x: f"{x['forward']['throughput']['tflops_per_s']:.3g}"),
          (f"DDIM step ms, batch {m['teacher']['sampling']['batch']}", lambda x: f"{x['sampling']['step_ms']:.3f}"),
          ("sampling images/s (extrapolated)", lambda x: f"{x['sampling']['images_per_s']:.2f}"),
          (f"compiled MiB, forward batch {thr}", lambda x: _mib(x["forward"]["throughput"]["compiled_bytes"])),
          ("compiled MiB, DDIM step", lambda x: _mib(x["sampling"]["compiled_bytes"])),
          ("device peak MiB", lambda x: _mib(x["device_peak_bytes"]))]
  lines = [f"# Benchmark: teacher against student on {r['device']} ({r['platform']}, {r['dtype']})", "",
           f"Teacher: {r['teacher']}. Student: {r['student']}.", "",
           "| | teacher | student |", "|---|---|---|"]
  lines += [f"| {label} | {fmt(m['teacher'])} | {fmt(m['student'])} |" for label, fmt in rows]
  sp = r["speedup"]
  lines += ["", f"Student speed-up: forward latency {sp['forward_latency']:.3f}x, forward throughput "
            f"{sp['forward_throughput']:.3f}x, sampling {sp['sampling']:.3f}x; FLOPs x{r['flops_ratio']:.3f}, "
            f"params x{r['params_ratio']:.3f}.", "",
            f"Timing: {r['timing']}. Sampling: {r['sampling_method']}.", "", f"Memory: {r['memory_note']}", ""]
  return "\n".join(lines)


STAGES = {"benchmark": stage_benchmark}
