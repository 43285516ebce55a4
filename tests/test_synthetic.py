"""Teacher-generated latent sets: the synthesize command on a saved checkpoint against the sampler called directly
(sharded over 8 devices vs one), shard layout, labels, the recorded generator, reuse and refusals, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import dot_dtypes

from graft_jax import checkpoints
from graft_jax.data import cli, latents, synthetic
from graft_jax.data.latents import DataError
from graft_jax.models import DiT, dit_config
from graft_jax.sample import generate, make_sampler, sample_labels
from graft_jax.train import partition


@pytest.fixture(scope="module")
def teacher():
  """A tiny DiT with random weights everywhere (adaLN-Zero would leave a fresh one's output at zero).

  The weights are drawn with numpy onto shapes from eval_shape: compiling init on CPU costs seconds for nothing.
  """
  config = dit_config("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
  x, i = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(DiT(config).init, jax.random.key(0), x, i, i)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  return DiT(config), params


SETTINGS = synthetic.SynthesisSettings(per_class=2, sampler="ddim", steps=3, cfg_scale=4.0, seed=5, batch_size=8,
                                       shard_size=8)


def test_synthesize_command_matches_the_sampler(tmp_path, teacher):
  model, params = teacher
  checkpoints.save(tmp_path / "teacher", model.config, params)
  out = tmp_path / "synth"
  assert cli.main(["synthesize", "--teacher", str(tmp_path / "teacher"), "--out", str(out), "--per-class", "2",
                   "--sampler", "ddim", "--steps", "3", "--cfg", "4.0", "--seed", "5", "--batch-size", "8",
                   "--shard-size", "8"]) == 0
  meta = latents.read_metadata(out)
  assert meta["kind"] == "synthetic" and meta["count"] == 20 and meta["num_classes"] == 10
  assert [s["count"] for s in meta["shards"]] == [8, 8, 4] and meta["latent_shape"] == [8, 8, 4]
  assert meta["resolution"] == 64 and meta["vae"] is None and meta["source"] == str(tmp_path / "teacher")
  generator = meta["generator"]
  assert (generator["sampler"], generator["steps"], generator["cfg_scale"], generator["eta"]) == ("ddim", 3, 4.0, 0)
  assert generator["model"] == model.config.to_json() and generator["teacher"].startswith("sha256:")
  data = latents.load_latents(out)
  np.testing.assert_array_equal(data["y"], sample_labels(10, 2))

  # Shard i is the sampler's output for its labels with fold_in(key(seed), i); here on one device, there on eight.
  run = make_sampler(model, "ddim", 3, 4.0)
  labels, key = sample_labels(10, 2), jax.random.key(5)
  expected = np.concatenate([generate(run, params, labels[i * 8:(i + 1) * 8], jax.random.fold_in(key, i), 8)
                             for i in range(3)])
  err = np.max(np.abs(data["x"] - expected)) / np.max(np.abs(expected))
  assert err < 1e-5, err
  assert np.std(data["x"]) > 0.1

  assert synthetic.synthesize(model, params, out, SETTINGS) == out  # the same generator: kept as it is
  with pytest.raises(DataError, match="other generator"):
    synthetic.synthesize(model, params, out, synthetic.SynthesisSettings(**{**SETTINGS.__dict__, "steps": 4}))


def test_synthesize_refuses_bad_input(tmp_path, teacher, capsys):
  model, params = teacher
  with pytest.raises(DataError, match="not divisible"):
    synthetic.synthesize(model, params, tmp_path / "a", SETTINGS, mesh=partition.make_mesh({"data": 3},
                                                                                           jax.devices()[:3]))
  with pytest.raises(DataError, match="sampler must be"):
    synthetic.synthesize(model, params, tmp_path / "a", synthetic.SynthesisSettings(per_class=1, sampler="euler"))
  bad = ["synthesize", "--teacher", str(tmp_path / "absent"), "--out", str(tmp_path / "bad"), "--per-class", "1"]
  assert cli.main(bad) == 2
  assert cli.main(bad[:-2]) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 2 and "convert a checkpoint first" in errors[0] and "--per-class" in errors[1]
  assert list(tmp_path.iterdir()) == []


def test_sampling_compute_dtype(teacher):
  """bf16 sampling runs the model in bf16 (its matmuls) and lands near the float32 samples; the sampler's own
  arithmetic stays float32."""
  model, params = teacher
  labels, key = sample_labels(10, 1)[:8], jax.random.key(2)
  f32 = make_sampler(model, "ddim", 3, 4.0)
  bf16 = make_sampler(model, "ddim", 3, 4.0, compute_dtype="bfloat16")
  token_dots = {dtype for ndim, dtype in dot_dtypes(jax.make_jaxpr(bf16)(params, labels, key)) if ndim >= 3}
  assert token_dots == {"bfloat16"}, token_dots
  a, b = np.asarray(f32(params, labels, key)), np.asarray(bf16(params, labels, key))
  assert b.dtype == np.float32 and np.max(np.abs(a - b)) / np.max(np.abs(a)) < 0.05
