"""job=benchmark: the shrunk teacher-against-student run writes every field; the student comes from the right place."""
from __future__ import annotations

import json

import jax
import pytest

from cli import ROOT, load_config, run_main
from graft_jax import checkpoints, graft, pipeline
from graft_jax.evaluation import benchmark
from graft_jax.models import init_params


def test_shrunk_benchmark_job(tmp_path):
  arg = "experiment=dit_xl2_hyena_x,shrink=1"
  proc = run_main(f"--config={ROOT}/configs/benchmark.py:{arg}", f"--workdir={tmp_path}/run", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  for name in ("benchmark.json", "benchmark.md", "stages/benchmark.json"):
    assert (run / name).exists(), name
  r = json.loads((run / "benchmark.json").read_text())
  assert r["platform"] == "cpu" and r["dtype"] == "float32" and r["student"] == "graft plan (fresh scions)"
  assert "extrapolated" in r["sampling_method"] and "median_ms" in r["timing"]
  config = load_config("benchmark", arg)
  teacher = pipeline.teacher_config(config)
  student = graft.student_config(teacher, graft.parse_plan(config.graft, teacher))
  for name, cfg in (("teacher", teacher), ("student", student)):
    m = r["models"][name]
    assert m["flops_per_image"] == graft.model_flops(cfg) and m["params"] == graft.model_params(cfg)
    assert m["forward"]["latency"]["batch"] == 2 and m["forward"]["throughput"]["batch"] == 8
    for row in m["forward"].values():
      assert row["ms"] > 0 and row["images_per_s"] == pytest.approx(row["batch"] * 1e3 / row["ms"])
      assert row["compiled_bytes"] > 0
    s = m["sampling"]
    assert s["batch"] == 4 and s["images_per_s"] == pytest.approx(4 * 1e3 / (4 * s["step_ms"]))
    assert m["device_peak_bytes"] is None  # CPU keeps no memory statistics
  assert r["flops_ratio"] < 1  # hyena_x is cheaper than attention
  assert r["speedup"]["sampling"] == pytest.approx(r["models"]["student"]["sampling"]["images_per_s"]
                                                   / r["models"]["teacher"]["sampling"]["images_per_s"])
  assert "| sampling images/s (extrapolated) |" in (run / "benchmark.md").read_text()


def test_student_folder_wins_over_the_plan(tmp_path):
  config = load_config("benchmark", "experiment=dit_xl2_swa,shrink=1")
  teacher = pipeline.teacher_config(config)
  student = graft.student_config(teacher, graft.parse_plan(config.graft, teacher))
  checkpoints.save(tmp_path / "student", student, init_params(student, jax.random.key(1)))
  # Neither branch below needs the teacher's weights; only grafting from the plan does.
  model, _, source = benchmark.load_student(config, tmp_path, None, None)
  assert source == str(tmp_path / "student") and model.config == student

  config.unlock().benchmark.student = str(tmp_path / "elsewhere")
  with pytest.raises(pipeline.UserError, match="does not exist"):
    benchmark.load_student(config, tmp_path, None, None)
  config.benchmark.student, config.graft = "", []
  with pytest.raises(pipeline.UserError, match="graft plan"):
    benchmark.load_student(config, tmp_path / "empty", None, None)


def test_benchmark_config_names_an_experiment():
  with pytest.raises(ValueError, match="not a grafting config"):
    load_config("benchmark", "experiment=nope")
  c = load_config("benchmark", "experiment=dit_xl2_mlp_r3,ratio=75")
  assert c.stages == ("benchmark",) and c.graft[0]["layers"] == "three_of_four" and c.benchmark.dtype == "bfloat16"
