"""notebooks/*.ipynb: valid nbformat 4, the same as tools/make_notebooks.py writes, and their code cells run on CPU with
GRAFT_SHRINK=1 (tiny models, a few steps), shell and magic lines ("!", "%") left out, so they cannot rot."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cli import ROOT

spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
make_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_notebooks)


def python_of(nb: dict) -> str:
  """The code cells as one script: what a notebook runs, less its shell and magic lines."""
  cells = ["".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
           for cell in nb["cells"] if cell["cell_type"] == "code"]
  return "\n\n".join(cells)


@pytest.mark.parametrize("name", sorted(make_notebooks.NOTEBOOKS))
def test_notebook_is_valid_and_generated(name):
  text = (ROOT / "notebooks" / name).read_text()
  assert text == make_notebooks.render(make_notebooks.NOTEBOOKS[name]), "run python tools/make_notebooks.py"
  nb = json.loads(text)
  assert nb["nbformat"] == 4 and nb["metadata"]["accelerator"] == "TPU"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list) and cell["id"]
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  compile(python_of(nb), name, "exec")


@pytest.mark.parametrize("name,made,first_says", [
    ("graft_checkpoint.ipynb", ["stage1/results.json", "stage1_samples.png"], "blocks_1/attn"),
    ("demo.ipynb", ["report.md", "losses.png", "grids/teacher.png"], "'operator': 'swa'"),
    ("own_operator.ipynb", ["report.md", "grids/graft_stage1_2.png"], "'operator': 'conv_mixer'")])
def test_notebook_runs_shrunk(tmp_path, name, made, first_says):
  nb = json.loads((ROOT / "notebooks" / name).read_text())
  workdir = tmp_path / "run"
  # The command-line tests' setting: the machine's one CPU device, not the 8 fake devices of in-process tests.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(GRAFT_SHRINK="1", GRAFT_WORKDIR=str(workdir), GRAFT_REPO=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", python_of(nb)], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for path in made:
    assert (workdir / path).exists(), path
  assert first_says in (workdir / made[0]).read_text()  # what ran: the grafted layer, or the plan's operator
