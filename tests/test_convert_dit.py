"""The DiT converter end to end: files on disk -> OUT_DIR -> checkpoints.load; and every bad input's error."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from graft_jax import checkpoints
from graft_jax.convert.cli import main
from test_dit import diffusers_dit, inputs, original_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random diffusers DiT saved in both layouts, and its output on fixed inputs (NHWC)."""
  model = diffusers_dit(patch=2)
  x, t, y = inputs(8)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
  tmp = tmp_path_factory.mktemp("sources")
  model.save_pretrained(tmp / "diffusers")
  original = {k: torch.from_numpy(v) for k, v in original_state_dict(model).items()}
  torch.save({"model": {k: v * 0 for k, v in original.items()}, "ema": original}, tmp / "train_ckpt.pt")
  torch.save(original, tmp / "dit.pt")
  save_file(original, str(tmp / "dit.safetensors"))
  return tmp, (x.transpose(0, 2, 3, 1), t, y), ref.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("src,extra", [("diffusers", []), ("dit.pt", ["--num-heads", "2"]),
                                       ("dit.safetensors", ["--num-heads", "2"]),
                                       ("train_ckpt.pt", ["--num-heads", "2"])])  # EMA weights by default
def test_convert_and_load(reference, tmp_path, src, extra):
  tmp, (x, t, y), ref = reference
  assert main([str(tmp / src), str(tmp_path / "out"), *extra]) == 0
  model, params = checkpoints.load(tmp_path / "out")
  out = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
  assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary folder left


def _bad(tmp_path, src, *extra):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, str(ROOT / "tools/convert_torch_weights.py"), str(src), str(out), *extra],
                        capture_output=True, text=True)
  assert proc.returncode == 2, proc.stderr
  assert not out.exists() and not list(tmp_path.glob(".out*"))
  message = proc.stderr.strip()
  assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
  return message


def test_bad_inputs(reference, tmp_path):
  tmp, _, _ = reference
  assert "does not exist" in _bad(tmp_path, tmp_path / "missing.pt")
  data = (tmp / "dit.pt").read_bytes()
  (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
  assert "truncated or corrupt" in _bad(tmp_path, tmp_path / "truncated.pt")
  vae = {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3)}
  torch.save(vae, tmp_path / "vae.pt")
  assert "not a DiT" in _bad(tmp_path, tmp_path / "vae.pt")
  (tmp_path / "weights.npz").write_bytes(b"x")
  assert "unknown format" in _bad(tmp_path, tmp_path / "weights.npz")
  sd = torch.load(tmp / "dit.pt")
  torch.save({**sd, "extra.weight": torch.zeros(3, 2)}, tmp_path / "extra.pt")
  assert "extra.weight (3, 2)" in _bad(tmp_path, tmp_path / "extra.pt", "--num-heads", "2")
  del sd["blocks.1.mlp.fc2.bias"]
  torch.save(sd, tmp_path / "missing_key.pt")
  assert "blocks_1']['mlp']['fc2']['bias'] missing" in _bad(tmp_path, tmp_path / "missing_key.pt", "--num-heads", "2")


def test_official_grafted_checkpoint_layers_are_recognised():
  """A stage-2 grafting checkpoint: blocks whose attn/mlp hold SWA, Hyena or Mamba-2 keys import as those operators."""
  from graft_jax import operators
  from graft_jax.convert.dit import dit_from_torch
  from graft_jax.models import DiT

  rng = np.random.default_rng(0)
  sd = original_state_dict(diffusers_dit(patch=2, depth=4))
  d = 16
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1
  for k in [k for k in sd if k.startswith(("blocks.1.attn.", "blocks.2.attn.", "blocks.3.attn.", "blocks.3.mlp."))]:
    del sd[k]
  grafted = {
      "blocks.1.attn.": {"Wqkv.weight": r(3 * d, d), "Wqkv.bias": r(3 * d), "out_proj.weight": r(d, d),
                         "out_proj.bias": r(d)},
      "blocks.2.attn.": {"in_proj.weight": r(3 * d, d), "in_proj.bias": r(3 * d), "short_filter.weight": r(3 * d, 1, 4),
                         "short_filter.bias": r(3 * d), "out_proj.weight": r(d, d), "out_proj.bias": r(d)},
      "blocks.3.attn.": {"in_proj.weight": r(2 * 2 * d + 2 * 64 + 2, d), "conv1d.weight": r(2 * d + 128, 1, 4),
                         "conv1d.bias": r(2 * d + 128), "dt_bias": r(2), "A_log": r(2), "D": r(2),
                         "norm.weight": r(2 * d), "out_proj.weight": r(d, 2 * d)},
      "blocks.3.mlp.": {"fc1.weight": r(3 * d, d), "fc1.bias": r(3 * d), "fc2.weight": r(d, 3 * d), "fc2.bias": r(d)},
  }
  for prefix, tensors in grafted.items():
    sd.update({prefix + k: v for k, v in tensors.items()})
  config, params = dit_from_torch(sd, "dit", num_heads=2)
  names = [(layer.attn.name, layer.mlp.name, layer.mlp.config.get("ratio")) for layer in config.layers]
  assert names == [("mha", "mlp", 4.0), ("swa", "mlp", 4.0), ("hyena_x", "mlp", 4.0), ("mamba2", "mlp", 3.0)]
  for prefix, tensors in grafted.items():
    i, site = int(prefix.split(".")[1]), prefix.split(".")[2]
    op = operators.get(config.layers[i].site(site).name)
    _, want = op.from_torch(tensors, d, 2)
    jax.tree.map(np.testing.assert_array_equal, params[f"blocks_{i}"][site], want)
  x, t, y = inputs(8)
  out = DiT(config).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y))
  assert np.isfinite(np.asarray(out)).all()
