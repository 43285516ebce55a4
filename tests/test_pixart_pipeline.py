"""Grafting on PixArt: conditioning in the trainers, captioned latent caches, the config, and the shrunk experiment end
to end (synthesize -> distill -> finetune with LoRA -> sample to PNGs) through the real command line."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli import ROOT, load_config, run_main
from graft_jax import graft, pipeline, pixart_stages
from graft_jax.data.latents import LatentReader, ShardWriter, load_latents
from graft_jax.models.config import pixart_config
from graft_jax.models.pixart import PixArt, init_params
from graft_jax.train import conditioning, state as train_state

CONFIG = f"{ROOT}/configs/pixart_sigma_hyena_x.py"


def tiny_pixart(**overrides):
  return pixart_config(64, **(dict(depth=2, hidden_size=32, num_heads=2, caption_channels=8, caption_length=6)
                              | overrides))


def test_config_is_the_papers_plan_and_lora_finds_pixart_kernels():
  c = load_config("pixart_sigma_hyena_x")
  full = pixart_config(2048)
  edits = graft.parse_plan(c.graft, full)
  assert edits[0].layers == (8, 10, 12, 14, 16, 18, 20, 21, 22, 23, 24, 25, 26, 27)
  assert (c.finetune.lora_rank, c.stages) == (64, ("synthesize", "distill", "finetune", "sample"))
  assert (c.sample.steps, c.sample.cfg_scale, c.synthesize.steps, c.synthesize.cfg_scale) == (20, 4.5, 20, 4.5)
  assert c.model.remat == "full"  # stage 2 at 16,384 tokens keeps only block inputs, as PixArt's training does
  small = load_config("pixart_sigma_hyena_x", "shrink=1")
  teacher = pipeline.teacher_config(small)
  student = graft.student_config(teacher, graft.parse_plan(small.graft, teacher))
  params = init_params(student, jax.random.key(0))
  found = {"/".join(p[1:-1]) for p in train_state.lora_targets(params, c.finetune.lora_targets)}
  assert found == {"attn/q", "attn/k", "attn/v", "attn/proj", "attn/in_proj", "attn/out_proj", "cross_attn/q_linear",
                   "cross_attn/kv_linear", "cross_attn/proj", "mlp/fc1", "mlp/fc2"}  # no Hyena conv taps


def test_conditioning_reads_batches_and_pads_captions_exactly():
  from graft_jax.models import DiT, dit_config
  dit = DiT(dit_config("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=4))
  y = np.array([1, 2])
  assert conditioning.cond_args(dit, {"x": 0, "y": y})[0] is y
  assert conditioning.batch_keys(dit) == ("x", "y")
  config = tiny_pixart()
  model, params = PixArt(config), init_params(config, jax.random.key(0))
  assert conditioning.batch_keys(model) == ("x", "caption", "mask")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  caption = rng.standard_normal((2, 6, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
  t = jnp.array([10, 500])
  forward = jax.jit(lambda b: conditioning.forward(model, params, x, t, b))
  full = forward({"caption": caption, "mask": mask})
  short = forward({"caption": caption[:, :3], "mask": mask[:, :3], "y": np.zeros(2)})
  np.testing.assert_allclose(np.asarray(short), np.asarray(full), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="caption and mask"):
    conditioning.cond_args(model, {"x": x, "y": y})
  from graft_jax.samplers.pixart import null_caption_missing
  zeroed = {**params, "y_embedder": {**params["y_embedder"], "y_embedding": jnp.zeros((6, 8))}}
  assert not null_caption_missing(params) and null_caption_missing(zeroed)


def test_captioned_cache_round_trip(tmp_path):
  caption = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float16)
  mask = np.ones((5, 3), bool)
  writer = ShardWriter(tmp_path / "set", {"kind": "synthetic_pixart", "resolution": 16, "latent_shape": [2, 2, 4]})
  for i, rows in enumerate([slice(0, 3), slice(3, 5)]):
    n = rows.stop - rows.start
    writer.write(i, np.full((n, 2, 2, 4), i, np.float32), np.arange(rows.start, rows.stop), [str(k) for k in range(n)],
                 extra={"caption": caption[rows], "mask": mask[rows]})
  out = writer.finish({"kind": "synthetic_pixart", "resolution": 16, "latent_shape": [2, 2, 4]}, 2)
  assert json.loads((out / "metadata.json").read_text())["arrays"] == ["caption", "mask"]
  loaded = load_latents(out, resolution=16)
  np.testing.assert_array_equal(loaded["caption"], caption)
  batch = next(LatentReader(out, 5, shuffle=False))
  np.testing.assert_array_equal(batch["caption"][np.argsort(batch["y"])], caption)
  assert batch["mask"].dtype == bool and batch["x"].shape == (5, 2, 2, 4)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
  """A tiny random T5 folder (16 wide, as the shrunk PixArt's captions) and a sentencepiece model trained here."""
  spm = pytest.importorskip("sentencepiece")
  from graft_jax import checkpoints
  from graft_jax.models import t5
  folder = tmp_path_factory.mktemp("t5") / "t5"
  config = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=12)
  checkpoints.save(folder, config, t5.init_params(config, jax.random.key(3)))
  corpus = pixart_stages.prompts.read_prompts(ROOT / "configs" / "prompts" / "pixart_sample_prompts.txt")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 4), model_writer=model, vocab_size=60,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  (folder / "spiece.model").write_bytes(model.getvalue())
  return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
  """A tiny random diffusers AutoencoderKL (two blocks: 8x8 latents -> 16x16 images), saved by a separate process:
  importing torch (and triton) into a process that has run many JAX programs can crash it."""
  pytest.importorskip("diffusers")
  folder = tmp_path_factory.mktemp("vae") / "vae"
  script = (
      "import sys, torch, diffusers\n"
      "torch.manual_seed(0)\n"
      "diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),\n"
      "    down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,\n"
      "    layers_per_block=1, norm_num_groups=4).save_pretrained(sys.argv[1])\n")
  proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return folder


def test_missing_inputs_are_one_sentence(tmp_path, text_encoder):
  c = load_config("pixart_sigma_hyena_x", "shrink=1")
  bad = {"data.prompts": (tmp_path / "none.txt", "prompt file"), "text.t5": (tmp_path / "no_t5", "T5 encoder"),
         "vae.path": (tmp_path / "no_vae", "VAE"), "model.checkpoint": (tmp_path / "no_teacher", "convert")}
  for field, (value, words) in bad.items():
    config = load_config("pixart_sigma_hyena_x", "shrink=1")
    block, name = field.split(".")
    config[block][name] = str(value)
    with pytest.raises(pipeline.UserError, match=words):
      pixart_stages.check_inputs(config, tmp_path)
  c.text.update(dict(t5=str(text_encoder), spiece=str(tmp_path / "none.model")))
  with pytest.raises(pipeline.UserError, match="spiece"):
    pixart_stages.check_inputs(c, tmp_path)
  proc = run_main(f"--config={CONFIG}:shrink=1", f"--workdir={tmp_path}/run",
                  f"--config.sample.prompts={tmp_path}/missing.txt", cwd=tmp_path)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: the sample prompt file")


def test_data_cli_synthesize_pixart(tmp_path):
  """A converted PixArt folder, a prompt file and precomputed embeddings -> a captioned cache the reader takes."""
  from graft_jax import checkpoints
  from graft_jax.data import cli
  from graft_jax.text import save_prompt_embeddings
  config = tiny_pixart()
  checkpoints.save(tmp_path / "teacher", config, init_params(config, jax.random.key(0)))
  (tmp_path / "p.txt").write_text("a red cube\n\nthe blue sphere on a table\nsnow\n")
  emb = np.random.default_rng(2).standard_normal((3, 6, 8)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([[3], [5], [2]])
  save_prompt_embeddings(tmp_path / "emb.npz", emb, mask)
  args = ["synthesize-pixart", "--teacher", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "p.txt"),
          "--per-prompt", "2", "--steps", "3", "--batch-size", "8", "--shard-size", "4"]
  assert cli.main([*args, "--embeddings", str(tmp_path / "emb.npz"), "--out", str(tmp_path / "set")]) == 0
  batch = next(LatentReader(tmp_path / "set", 6, shuffle=False))
  order = np.argsort(batch["y"], kind="stable")
  np.testing.assert_array_equal(batch["y"][order], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(batch["mask"][order], np.repeat(mask[:, :5], 2, axis=0))  # cut to the longest
  np.testing.assert_allclose(batch["caption"][order], np.repeat(emb[:, :5], 2, axis=0), rtol=1e-3, atol=1e-3)
  assert batch["x"].shape == (6, 8, 8, 4) and np.isfinite(batch["x"]).all()
  # Bad input: one sentence, exit status 2.
  assert cli.main([*args, "--out", str(tmp_path / "other")]) == 2  # neither --t5 nor --embeddings
  assert cli.main([*args[:4], str(tmp_path / "none.txt"), "--t5", "random", "--out", str(tmp_path / "o")]) == 2


def test_shrunk_pixart_experiment_end_to_end(tmp_path, text_encoder, vae_folder):
  args = (f"--config={CONFIG}:shrink=1", f"--workdir={tmp_path}/run", f"--config.text.t5={text_encoder}",
          f"--config.vae.path={vae_folder}")
  proc = run_main(*args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  meta = json.loads((run / "synthetic" / "metadata.json").read_text())
  assert (meta["count"], meta["kind"], meta["arrays"]) == (32, "synthetic_pixart", ["caption", "mask"])
  assert meta["caption_shape"][1] == 16 and meta["caption_shape"][0] <= 16
  errors = json.loads((run / "stages" / "distill.json").read_text())["heldout_relative_error"]
  assert set(errors) == {"blocks_2/attn", "blocks_3/attn"}
  student = json.loads((run / "student" / "config.json").read_text())
  assert student["model"] == "pixart"
  assert [layer["attn"]["name"] for layer in student["layers"]] == ["mha", "mha", "hyena_x", "hyena_x"]
  # Stage 2 trains LoRA factors only (rank 4 in the shrunk config), and they get gradients.
  finetune_metrics = [json.loads(line) for line in (run / "finetune" / "metrics" / "metrics.jsonl").open()]
  assert all(m["grad_norm"] > 0 for m in finetune_metrics)
  assert len(list((run / "samples").glob("*.png"))) == 16 and (run / "samples.png").exists()
  with np.load(run / "samples_latents.npz") as f:
    assert f["latents"].shape == (16, 8, 8, 4) and np.isfinite(f["latents"]).all()
  # Without a VAE the sample stage keeps the latents and says so.
  (run / "stages" / "sample.json").unlink()
  again = run_main(*args[:3], "--config.vae.path=", cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("already done") == 3 and "no VAE given" in again.stdout


def test_negative_prompt_guidance():
  """A negative caption replaces the learned null caption in the unconditional half: given the null caption itself
  with the prompts' mask, the samples are the same; weights without a null caption guide against "" when a text
  encoder can encode it."""
  from graft_jax.samplers.pixart import choose_negative_prompt, make_pixart_sampler, sample_latents
  config = tiny_pixart()
  model, params = PixArt(config), init_params(config, jax.random.key(0))
  # Zero-initialised outputs (cross-attention, final layer) would hide the caption: perturb every weight.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = tree.unflatten([a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  caption = rng.standard_normal((3, 6, 8)).astype(np.float32)
  mask = np.tile(np.arange(6) < 4, (3, 1))
  run = make_pixart_sampler(model, steps=3)
  key = jax.random.key(1)
  learned = sample_latents(run, params, caption, mask, key, 8)
  null = (np.asarray(params["y_embedder"]["y_embedding"]), mask[0])
  np.testing.assert_allclose(sample_latents(run, params, caption, mask, key, 8, negative=null), learned,
                             rtol=1e-5, atol=1e-5)
  other = (rng.standard_normal((2, 8)).astype(np.float32), np.array([True, False]))  # shorter: padded
  assert np.abs(sample_latents(run, params, caption, mask, key, 8, negative=other) - learned).max() > 1e-3

  zeroed = {**params, "y_embedder": {**params["y_embedder"], "y_embedding": jnp.zeros((6, 8))}}
  assert choose_negative_prompt(params, None, True) == (None, None)
  assert choose_negative_prompt(params, "blurry", False) == ("blurry", None)
  text, note = choose_negative_prompt(zeroed, None, True)
  assert text == "" and "diffusers" in note
  text, note = choose_negative_prompt(zeroed, None, False)
  assert text is None and note.startswith("warning")


def test_negative_prompt_needs_a_text_encoder(tmp_path):
  from graft_jax import checkpoints
  from graft_jax.data import cli
  from graft_jax.text import save_prompt_embeddings
  config = tiny_pixart()
  checkpoints.save(tmp_path / "teacher", config, init_params(config, jax.random.key(0)))
  (tmp_path / "p.txt").write_text("snow\n")
  save_prompt_embeddings(tmp_path / "emb.npz", np.ones((1, 6, 8), np.float32), np.ones((1, 6), bool))
  args = ["synthesize-pixart", "--teacher", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "p.txt"),
          "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "set")]
  assert cli.main([*args, "--embeddings", str(tmp_path / "emb.npz"), "--negative-prompt", "blurry"]) == 2
  assert not (tmp_path / "set").exists()
  assert cli.main([*args, "--t5", "random", "--negative-prompt", "blurry"]) == 0
