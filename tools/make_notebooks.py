"""Writes the Colab TPU notebooks in notebooks/ (nbformat 4 JSON) from the cell texts below: `python
tools/make_notebooks.py`. Edit the cells here, not the .ipynb files; tests/test_notebooks.py checks that the files match
this script and runs their code cells on CPU with GRAFT_SHRINK=1 (tiny models, a few steps).

Conventions the test relies on: lines starting with "!" or "%" are shell or magic lines that only a notebook runs
(the test skips them), and every setting a CPU test must change is read from a GRAFT_* environment variable.
"""
from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

INSTALL = """\
# Colab: Runtime > Change runtime type > TPU. Colab's TPU runtime ships JAX for TPU; elsewhere install it first:
# !pip install -q "jax[tpu]"
# graft_jax from a clone of its repository (put the repository's address in place of REPO_URL):
# !git clone REPO_URL graft_jax
# %cd graft_jax
!pip install -q -e ".[torch]"  # the [torch] extra is only for the checkpoint converter"""

DEVICES = """\
import jax

# On a TPU runtime: backend "tpu" and one device per core (8 on a v2-8 / v3-8). "auto" operator backends then pick
# the TPU kernels: splash attention for SWA (and for MHA from 4,096 tokens), the Pallas causal conv for Hyena.
print(jax.default_backend(), jax.device_count(), "devices:", jax.devices())"""

SHOW = """\
def show(path):
  \"\"\"An image inline in a notebook, its path elsewhere.\"\"\"
  try:
    from IPython.display import Image, display
    display(Image(filename=str(path)))
  except ImportError:
    print("wrote", path)"""


def markdown(text: str) -> dict:
  return {"cell_type": "markdown", "metadata": {}, "source": _lines(text)}


def code(text: str) -> dict:
  return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": _lines(text)}


def _lines(text: str) -> list[str]:
  """nbformat stores a cell's source as lines that keep their newline, the last one without."""
  lines = text.strip("\n").split("\n")
  return [line + "\n" for line in lines[:-1]] + lines[-1:]


def notebook(cells: list[dict]) -> dict:
  return {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"accelerator": "TPU", "colab": {"provenance": []},
                       "kernelspec": {"name": "python3", "display_name": "Python 3"},
                       "language_info": {"name": "python"}},
          "cells": [dict(cell, id=f"cell-{i}") for i, cell in enumerate(cells)]}


GRAFT_CHECKPOINT = notebook([
    markdown("""\
# Graft a pretrained DiT-XL/2 on a TPU

Convert the PyTorch checkpoint, replace half of the attention layers with sliding-window attention (SWA, window 4),
train the new operators on the teacher's activations (stage 1), and sample from the grafted model. Stage 2
(fine-tuning) is one more stage name: `config.stages = ("distill", "finetune", "sample")`, or the command line
`python -m graft_jax.main --config=configs/dit_xl2_swa.py --workdir=runs/swa50`."""),
    code(INSTALL),
    code("""\
import os
import pathlib

# GRAFT_SHRINK=1 (what tests/test_notebooks.py sets) swaps in a tiny random teacher, the embedded digits and a few
# steps, so the whole notebook runs on a CPU in seconds.
SHRINK = os.environ.get("GRAFT_SHRINK", "0") == "1"
# The PyTorch DiT checkpoint; empty skips the conversion (a shrunk run uses a random teacher). The original file:
# !wget -q https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt
CHECKPOINT = os.environ.get("GRAFT_CHECKPOINT", "" if SHRINK else "DiT-XL-2-256x256.pt")
CONVERTED = pathlib.Path(os.environ.get("GRAFT_CONVERTED", "checkpoints/dit_xl2"))
WORKDIR = pathlib.Path(os.environ.get("GRAFT_WORKDIR", "runs/notebook_swa"))"""),
    code(DEVICES),
    markdown("""\
## 1. Convert the checkpoint
The converter reads the original `.pt`, a `.safetensors` file or a diffusers folder, and writes `config.json` and
orbax parameters. It runs once; a converted folder is reused."""),
    code("""\
from graft_jax.convert.cli import main as convert

if CHECKPOINT and not CONVERTED.exists():
  assert convert([CHECKPOINT, str(CONVERTED)]) == 0"""),
    markdown("""\
## 2. The plan
SWA in the odd layers (50%). Stage 1 needs latents: a cache of ImageNet latents
(`python -m graft_jax.data.cli encode ...`, see the README) or a set the teacher generates itself, as below."""),
    code("""\
from graft_jax import graft, pipeline
from graft_jax.experiment import graft_experiment

config = graft_experiment("attn", "swa", dict(num_heads=16, window=4), "shrink=1" if SHRINK else "ratio=50")
config.stages = ("distill",)
if CHECKPOINT:
  config.model.checkpoint = str(CONVERTED)
if not SHRINK:
  # Teacher-generated latents, 8 per class: no ImageNet download needed.
  config.data.distill_path = config.data.finetune_path = "data/synthetic"
  config.data.heldout = 256
  config.sample.update(dict(sampler="ddim", steps=50, per_class=1, batch_size=256))
teacher = pipeline.teacher_config(config)
print(graft.format_summary(graft.summary(teacher, graft.student_config(teacher, pipeline.plan(config, teacher)))))"""),
    code("""\
# Only for a real checkpoint: 8,000 teacher samples as the stage-1 set (a few minutes on a TPU v3-8).
!python -m graft_jax.data.cli synthesize --teacher {CONVERTED} --out data/synthetic --per-class 8"""),
    markdown("""\
## 3. Stage 1: every SWA layer learns its teacher layer's map, all in one jitted step
Checkpoints, metrics (TensorBoard and `metrics.jsonl`) and the per-layer held-out error go to the workdir; running
the cell again resumes."""),
    code("""\
import json

pipeline.run(config, WORKDIR)
print(json.dumps(json.loads((WORKDIR / "stage1" / "results.json").read_text()), indent=1))"""),
    markdown("""\
## 4. Sample from the grafted model
The student is the teacher with the stage-1 scions in place. DiT samples are VAE latents: the grid shows their
first channels; decode them with `graft_jax.models.vae` for pixels."""),
    code(SHOW),
    code("""\
from graft_jax.data.images import save_grid
from graft_jax.models import DiT

teacher_model, teacher_params = pipeline.load_teacher(config)
student, params = pipeline.student_from_stage1(config, WORKDIR, teacher_model, teacher_params)
images, labels = pipeline.sample_images(DiT(student), params, config.sample)
show(save_grid(images[:64, ..., :3], WORKDIR / "stage1_samples.png", nrow=8))"""),
])

DEMO = notebook([
    markdown("""\
# The grafting demo on a TPU

The whole method on the embedded digits set (16x16, no download): train a small teacher DiT, graft its odd attention
layers with SWA (or Hyena-X), run stage 1 and stage 2, compare with a fresh-scion control and self-grafted MHA, and
write a report. The same as `python -m graft_jax.main --config=configs/demo.py --workdir=runs/demo`."""),
    code(INSTALL),
    code("""\
import importlib.util
import os
import pathlib

SHRINK = os.environ.get("GRAFT_SHRINK", "0") == "1"  # tests/test_notebooks.py: a few steps of everything
OPERATOR = os.environ.get("GRAFT_OPERATOR", "swa")   # or "hyena_x"
REPO = pathlib.Path(os.environ.get("GRAFT_REPO", "."))  # the clone, where configs/ is
WORKDIR = pathlib.Path(os.environ.get("GRAFT_WORKDIR", "runs/demo"))"""),
    code(DEVICES),
    code("""\
# configs/demo.py is a config file (as --config takes it), not a module of the package.
spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
demo_config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_config)
config = demo_config.get_config(f"operator={OPERATOR}" + (",shrink=1" if SHRINK else ""))
print(config.stages, config.graft)"""),
    markdown("""\
## Run it
About 20 minutes on a CPU; much less on a TPU. A rerun resumes at the first unfinished stage."""),
    code("""\
from graft_jax import pipeline

pipeline.run(config, WORKDIR)"""),
    markdown("## The report"),
    code(SHOW),
    code("""\
print((WORKDIR / "report.md").read_text())
show(WORKDIR / "losses.png")
for grid in sorted((WORKDIR / "grids").glob("*.png")):
  print(grid.stem)
  show(grid)"""),
])

OWN_OPERATOR = notebook([
    markdown("""\
# Graft an operator of your own on a TPU

Write a sequence mixer in a cell, register it, and graft it into the demo's small DiT (the embedded digits, no
download): stage 1 teaches it the teacher's attention, stage 2 fine-tunes, and the report sets it beside the teacher,
a fresh-scion control and self-grafted MHA. Edit the operator's cell and run the notebook again to try another one
(a new workdir each time: a rerun of the same workdir resumes). `configs/demo_own_operator.py` does the same from the
command line with linear attention."""),
    code(INSTALL),
    code("""\
import importlib.util
import os
import pathlib

SHRINK = os.environ.get("GRAFT_SHRINK", "0") == "1"  # tests/test_notebooks.py: a few steps of everything
REPO = pathlib.Path(os.environ.get("GRAFT_REPO", "."))  # the clone, where configs/ is
WORKDIR = pathlib.Path(os.environ.get("GRAFT_WORKDIR", "runs/own_operator"))"""),
    code(DEVICES),
    markdown("""\
## The operator
Any Flax module mapping (B, N, D) -> (B, N, D), built as `Module(dim=D, **options)`. Registering it names its site
(`"attn"` for a sequence mixer, `"mlp"` for a channel mixer), its options' defaults and its forward FLOPs on one
sample, which the graft summary reports. Running the cell again replaces the registration. This one mixes tokens
with a depthwise convolution over the flattened sequence, k tokens wide, between two projections."""),
    code("""\
import flax.linen as nn
import jax.numpy as jnp

from graft_jax import operators
from graft_jax.operators import flops
from graft_jax.operators.init import dense


def conv_mixer_flops(config, dim, tokens):
  return flops.dense(tokens, dim, 2 * dim) + 2 * config["kernel_size"] * tokens * dim + flops.dense(tokens, dim, dim)


@operators.register("conv_mixer", "attn", defaults={"kernel_size": 9}, flops=conv_mixer_flops)
class ConvMixer(nn.Module):
  \"\"\"u, g = split(W_in x); y = W_out(depthwise_conv(u) * sigmoid(g)), the conv centred on each token.\"\"\"
  dim: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    u, g = jnp.split(dense(2 * self.dim, "in_proj")(x), 2, axis=-1)
    u = nn.Conv(self.dim, (self.kernel_size,), padding="SAME", feature_group_count=self.dim, name="conv")(u)
    return dense(self.dim, "out_proj")(u * nn.sigmoid(g))"""),
    markdown("""\
## The experiment
The demo's config (`configs/demo.py`) with the operator in the odd attention layers, then its graft summary."""),
    code("""\
from graft_jax import graft, pipeline

# configs/demo.py is a config file (as --config takes it), not a module of the package.
spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
demo_config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_config)
config = demo_config.get_config("shrink=1" if SHRINK else None)
config.graft = [dict(config.graft[0], operator="conv_mixer", config={"kernel_size": 9})]
teacher = pipeline.teacher_config(config)
print(graft.format_summary(graft.summary(teacher, graft.student_config(teacher, pipeline.plan(config, teacher)))))"""),
    markdown("""\
## Run it
About 20 minutes on a CPU; much less on a TPU. The report's stage-1 held-out error says how well the operator
imitates attention in each grafted layer; its FD and accuracy, how the grafted model samples."""),
    code(SHOW),
    code("""\
pipeline.run(config, WORKDIR)
print((WORKDIR / "report.md").read_text())
show(WORKDIR / "grids" / "graft_stage1_2.png")"""),
])

NOTEBOOKS = {"graft_checkpoint.ipynb": GRAFT_CHECKPOINT, "demo.ipynb": DEMO, "own_operator.ipynb": OWN_OPERATOR}


def render(nb: dict) -> str:
  return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
  out = ROOT / "notebooks"
  out.mkdir(exist_ok=True)
  for name, nb in NOTEBOOKS.items():
    (out / name).write_text(render(nb))
    print("wrote", out / name)


if __name__ == "__main__":
  main()
