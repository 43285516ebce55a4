"""The README's demo command, shrunk: the whole pipeline runs and the report has every field the issue asks for."""
import json

from cli import ROOT, run_main
MODELS = {"teacher", "graft_stage1", "graft_stage1_2", "control", "self_mha"}


def test_shrunk_demo_writes_the_report(tmp_path):
  proc = run_main(f"--config={ROOT}/configs/demo.py:shrink=1", f"--workdir={tmp_path}/demo", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "demo"
  report = json.loads((run / "report.json").read_text())
  assert set(report["models"]) == MODELS
  for name, m in report["models"].items():
    assert set(m) >= {"fd", "accuracy", "per_class_accuracy", "params", "latency_ms", "grid"}
    assert len(m["per_class_accuracy"]) == 10 and (run / m["grid"]).exists()
  assert set(report["stage1_heldout_relative_error"]) == {"blocks_1/attn"}
  assert set(report["claims"]) == {"graft_fd_within_15pct_of_teacher", "graft_fd_over_teacher",
                                   "under_10pct_of_teacher_steps", "control_worse_than_graft"}
  assert report["cost"]["teacher_steps"] == 20 and 0 < report["cost"]["compute_fraction"]
  assert report["feature_net"] == "digits-cnn-v1"
  for name in ("report.md", "losses.png", "teacher/config.json"):
    assert (run / name).exists(), name
  assert "| graft_stage1_2 |" in (run / "report.md").read_text()
