"""configs/*.py and the main job: every paper configuration builds a valid plan; a shrunk one runs end to end."""
import importlib.util
import json
import re

import pytest

from cli import ROOT, load_config, run_main
import jax

from graft_jax import checkpoints, graft, pipeline
from graft_jax.models import dit_config, init_params
from graft_jax.pipeline import UserError, load_teacher, teacher_config

PAPER = ["swa", "hyena_x", "hyena_y", "hyena_se", "mamba2", "mlp_r3", "mlp_r6", "mlp_hyena_x", "self_mha",
         "self_mlp"]


def load(name, arg=""):
  return load_config(f"dit_xl2_{name}", arg)


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.parametrize("ratio", [50, 75, 100])
def test_paper_configs_build_valid_plans(name, ratio):
  c = load(name, f"ratio={ratio}")
  teacher = dit_config("DiT-XL/2")
  edits = graft.parse_plan(c.graft, teacher)
  assert sum(len(e.layers) for e in edits) == {50: 14, 75: 21, 100: 28}[ratio]
  small = load(name, f"ratio={ratio},shrink=1")
  graft.parse_plan(small.graft, teacher_config(small))


def test_bad_config_argument():
  with pytest.raises(ValueError, match="ratio must be one of"):
    load("swa", "ratio=60")


def test_model_remat_applies_to_a_converted_teacher(tmp_path):
  assert load("swa").model.remat == "elementwise"  # the paper's batch-256 stage 2 in 80 GB
  c = load("swa", "shrink=1")
  saved = teacher_config(c)
  checkpoints.save(tmp_path / "teacher", saved, init_params(saved, jax.random.key(0)))
  c.model.checkpoint, c.model.remat = str(tmp_path / "teacher"), "dots"
  assert teacher_config(c) == saved.replace(remat="dots")
  assert load_teacher(c)[0].config == saved.replace(remat="dots")
  c.model.remat = "some"
  with pytest.raises(UserError, match="^model remat 'some' is not one of none, elementwise, dots, full.$"):
    teacher_config(c)


@pytest.mark.parametrize("config_name, field, value, message", [
    ("dit_xl2_hyena_x", "finetune.loss", "bogus", "finetune: finetune loss 'bogus' is unknown"),
    ("dit_xl2_hyena_x", "finetune.log_every", 0, "finetune: log_every must be a positive integer, got 0."),
    ("dit_xl2_hyena_x", "finetune.ema_decay", 1.5, "finetune: ema_decay must be between 0 and 1, got 1.5."),
    ("dit_xl2_hyena_x", "finetune.compute_dtype", "fp8", "finetune: compute_dtype 'fp8' is unknown"),
    ("dit_xl2_hyena_x", "distill.loss.attn", "l3", "distill: stage-1 loss.attn must be one of"),
    ("dit_xl2_hyena_x", "distill.schedule", "cosine", "distill: stage-1 schedule must be 'paper' or 'released'"),
    ("dit_xl2_hyena_x", "distill.batch_size", 12, "distill: batch size 12 is not divisible by the 8 devices"),
    ("dit_xl2_hyena_x", "distill.mesh.fsdp", 3, "distill: mesh sizes"),
    ("dit_xl2_hyena_x", "sample.sampler", "euler", "sample: sampler must be one of ('ddpm', 'ddim'), got 'euler'."),
    ("dit_xl2_hyena_x", "sample.steps", 300, "sample: no integer stride takes exactly 300 steps out of 1000"),
    ("dit_xl2_hyena_x", "sample.per_class", 0, "sample: per_class must be a positive integer, got 0."),
    ("demo", "teacher.checkpoint_every", -1, "teacher: checkpoint_every must be a positive integer, got -1."),
])
def test_bad_settings_fail_before_any_stage_runs(tmp_path, config_name, field, value, message):
  """Whichever stage's section holds the mistake, it is one sentence naming the section, before anything is
  written (in process: the 8 fake devices of conftest.py)."""
  c = load_config(config_name, "shrink=1")
  c.update_from_flattened_dict({field: value})
  with pytest.raises(pipeline.UserError, match=re.escape(message)):
    pipeline.run(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def main(*args, cwd):
  return run_main(*args, cwd=cwd)


def test_missing_teacher_names_the_conversion_command(tmp_path):
  proc = main(f"--config={ROOT}/configs/dit_xl2_swa.py", f"--workdir={tmp_path}/run", cwd=tmp_path)
  assert proc.returncode == 2
  assert "convert_torch_weights.py" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.finetune.batchsize=3", "error: --config.finetune.batchsize=3: the config has no field 'batchsize'; "
                                      'did you mean "batch_size" instead of "batchsize"?'),
    ("--config.nonexistent=1", "error: --config.nonexistent=1: the config has no field 'nonexistent'."),
])
def test_an_override_of_a_missing_field_is_one_sentence(tmp_path, override, message):
  proc = main(f"--config={ROOT}/configs/dit_xl2_swa.py", f"--workdir={tmp_path}/run", override, cwd=tmp_path)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == message, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_shrunk_experiment_runs_end_to_end_and_resumes(tmp_path):
  args = (f"--config={ROOT}/configs/dit_xl2_hyena_x.py:shrink=1", f"--workdir={tmp_path}/run")
  proc = main(*args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  for name in ("graft_summary.md", "stage1/results.json", "student/config.json", "samples.png", "samples.npz"):
    assert (run / name).exists(), name
  for stage in ("distill", "finetune"):  # TensorBoard events beside metrics.jsonl, where tensorboard is installed
    events = list((run / stage / "metrics").glob("events.out.tfevents.*"))
    assert (run / stage / "metrics" / "metrics.jsonl").exists()
    assert bool(events) == (importlib.util.find_spec("tensorboard") is not None), stage
  errors = json.loads((run / "stages" / "distill.json").read_text())["heldout_relative_error"]
  assert set(errors) == {"blocks_1/attn", "blocks_3/attn"}
  student = json.loads((run / "student" / "config.json").read_text())
  assert [layer["attn"]["name"] for layer in student["layers"]] == ["mha", "hyena_x", "mha", "hyena_x"]
  again = main(*args, cwd=tmp_path)
  assert again.returncode == 0 and again.stdout.count("already done") == 3
