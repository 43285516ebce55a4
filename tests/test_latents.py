"""Latent caches: encoding through the command line (against diffusers' VAE), refusals, resumable writing, the
stratified subset, the streaming reader (resume, host split) and the in-memory loader."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from graft_jax.data import cli, imagenet, latents
from graft_jax.data.latents import DataError

SCALE = 0.18215


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  """A tiny diffusers AutoencoderKL folder (2 blocks: 16px images -> 8x8x4 latents), norms and biases randomised."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
      norm_num_groups=8, sample_size=16)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("vae") / "vae"
  model.save_pretrained(path)
  return path, model.eval()


def make_folder(root):
  """3 classes x 3 images of assorted sizes, plus one undecodable file in class 1."""
  rng = np.random.default_rng(0)
  for c in range(3):
    (root / "train" / f"n0{c}").mkdir(parents=True)
    for i in range(3):
      pixels = rng.integers(0, 256, (17 + 5 * i, 40 - 3 * c, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / "train" / f"n0{c}" / f"n0{c}_{i}.JPEG", quality=95)
  (root / "train" / "n01" / "n01_broken.JPEG").write_bytes(b"\xff\xd8\xff truncated")


def encode_args(tmp_path, vae_path, out, *extra):
  return ["encode", "--source", str(tmp_path / "images"), "--vae", str(vae_path), "--out", str(out),
          "--resolution", "16", "--batch-size", "8", "--shard-size", "4", *extra]


def test_encode_matches_diffusers_and_refuses_other_settings(tmp_path, vae_dir, capsys):
  torch = pytest.importorskip("torch")
  vae_path, model = vae_dir
  make_folder(tmp_path / "images")
  out = tmp_path / "latents"
  assert cli.main(encode_args(tmp_path, vae_path, out)) == 0
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["count"] == 9 and meta["latent_shape"] == [8, 8, 4] and meta["resolution"] == 16
  assert meta["skipped"] == {"count": 1, "keys": ["n01_broken.JPEG"]}
  assert [s["count"] for s in meta["shards"]] == [4, 3, 2]  # shard 1 lost its broken image
  assert meta["vae"]["id"].startswith("sha256:") and meta["scale"] == SCALE and meta["posterior"] == "sample"
  assert not list(tmp_path.glob(".*partial"))

  # Reference: diffusers' posterior on our preprocessed pixels, noise from fold_in(key(seed), source position).
  cache = latents.load_latents(out)
  records = {r.key: r for r in imagenet.ImageFolder(tmp_path / "images").records()}
  keys = []
  for shard in meta["shards"]:
    with np.load(out / shard["file"]) as f:
      keys += [str(k) for k in f["key"]]
  pixels = np.stack([imagenet.load_image(tmp_path / "images" / "train" / k[:3] / k, 16) for k in keys])
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(imagenet.to_unit_range(pixels)).permute(0, 3, 1, 2)).latent_dist
  noise = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(0), records[k].position), (8, 8, 4))
                    for k in keys])
  expected = (posterior.mean.permute(0, 2, 3, 1).numpy() + posterior.std.permute(0, 2, 3, 1).numpy() * noise) * SCALE
  err = np.max(np.abs(cache["x"] - expected)) / np.max(np.abs(expected))
  assert err < 1e-5, err
  np.testing.assert_array_equal(cache["y"], [records[k].label for k in keys])

  capsys.readouterr()
  assert cli.main(encode_args(tmp_path, vae_path, out)) == 0  # same settings: kept as it is
  assert cli.main(encode_args(tmp_path, vae_path, out, "--resolution", "32")) == 2
  assert cli.main(encode_args(tmp_path, vae_path, out, "--flip", "random")) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 2
  assert "16px" in errors[0] and "32px is asked for" in errors[0]
  assert "other flip" in errors[1]
  with pytest.raises(DataError, match="was encoded with VAE"):
    latents.load_latents(out, resolution=16, vae="sha256:0000")
  with pytest.raises(DataError, match="8px is asked for"):
    latents.LatentReader(out, 2, resolution=8)


def test_encode_bad_input_writes_nothing(tmp_path, vae_dir, capsys):
  vae_path, _ = vae_dir
  out = tmp_path / "latents"
  (tmp_path / "images").mkdir()
  assert cli.main(encode_args(tmp_path, vae_path, out)) == 2
  make_folder(tmp_path / "images")
  assert cli.main(encode_args(tmp_path, tmp_path / "no_vae", out)) == 2
  (tmp_path / "not_a_vae.safetensors").write_bytes(b"junk")
  assert cli.main(encode_args(tmp_path, tmp_path / "not_a_vae.safetensors", out)) == 2
  assert cli.main(encode_args(tmp_path, vae_path, out, "--batch-size", "3")) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 4 and all(e.startswith("error: ") for e in errors)
  assert "has no class folders" in errors[0] and "does not exist" in errors[1]
  assert "could not be read as a safetensors file" in errors[2] and "not divisible" in errors[3]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "not_a_vae.safetensors"]


def test_stratified_subset_exact_and_deterministic():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 400)
  keys = np.array([f"img_{i:04d}" for i in range(400)])
  picked = latents.stratified_subset(labels, keys, 8, seed=0)
  assert np.bincount(labels[picked], minlength=5).tolist() == [8] * 5
  assert np.array_equal(picked, np.sort(picked)) and len(set(picked)) == 40
  np.testing.assert_array_equal(picked, latents.stratified_subset(labels, keys, 8, seed=0))
  assert not np.array_equal(picked, latents.stratified_subset(labels, keys, 8, seed=1))
  # Listing order does not matter: the same names are drawn from a shuffled listing.
  order = rng.permutation(400)
  shuffled = latents.stratified_subset(labels[order], keys[order], 8, seed=0)
  assert sorted(keys[order][shuffled]) == sorted(keys[picked])
  with pytest.raises(DataError, match="class 5 has 0 items"):
    latents.stratified_subset(labels, keys, 8, seed=0, num_classes=6)


def write_cache(out, counts, shape=(2, 2, 1), **meta):
  """A cache whose row r holds the value r everywhere and label r % 7."""
  writer = latents.ShardWriter(out, {"test": True})
  start = 0
  for i, n in enumerate(counts):
    rows = np.arange(start, start + n)
    writer.write(i, np.broadcast_to(rows[:, None, None, None], (n, *shape)), rows % 7, [str(r) for r in rows])
    start += n
  return writer.finish({"kind": "test", "resolution": 16, "latent_shape": list(shape), "vae": None, **meta},
                       len(counts))


def test_shard_writer_resumes_and_publishes_atomically(tmp_path):
  out = tmp_path / "cache"
  writer = latents.ShardWriter(out, {"a": 1})
  writer.write(0, np.zeros((2, 2, 2, 1)), [0, 1], ["x", "y"], skipped=["z"])
  assert not out.exists() and writer.done(0) and not writer.done(1)
  assert latents.ShardWriter(out, {"a": 1}).done(0)  # same plan: continued
  with pytest.raises(DataError, match="unfinished one"):
    latents.read_metadata(out)
  writer = latents.ShardWriter(out, {"a": 2})  # another plan: started over
  assert not writer.done(0)
  writer.write(0, np.zeros((1, 2, 2, 1)), [3], ["w"], skipped=["v"])
  writer.write(1, np.zeros((0, 2, 2, 1)), [], [], skipped=["u"])
  writer.finish({"resolution": 16, "latent_shape": [2, 2, 1]}, 2)
  meta = latents.read_metadata(out)
  assert meta["count"] == 1 and meta["skipped"] == {"count": 2, "keys": ["v", "u"]}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
  with pytest.raises(DataError, match="already exists"):
    latents.ShardWriter(out, {"a": 2})


def test_reader_resumes_and_splits_hosts(tmp_path):
  out = write_cache(tmp_path / "cache", [5, 0, 7, 11])
  full = latents.load_latents(out)
  np.testing.assert_array_equal(full["x"][:, 0, 0, 0], np.arange(23))
  np.testing.assert_array_equal(full["y"], np.arange(23) % 7)

  reader = latents.LatentReader(out, batch_size=4, seed=3, process_index=0, process_count=1)
  assert reader.batches_per_epoch == 5
  batches = [next(reader) for _ in range(7)]
  for b in batches:
    rows = b["x"][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(b["x"], full["x"][rows])
    np.testing.assert_array_equal(b["y"], rows % 7)
  epoch0 = np.concatenate([b["x"][:, 0, 0, 0] for b in batches[:5]])
  assert len(set(epoch0)) == 20 and not np.array_equal(epoch0, np.sort(epoch0))
  state = reader.state()
  after = [next(reader)["x"] for _ in range(6)]  # crosses into epoch 2
  resumed = latents.LatentReader(out, batch_size=4, seed=3, process_index=0, process_count=1)
  resumed.restore(state)
  for a in after:
    np.testing.assert_array_equal(next(resumed)["x"], a)
  other_seed = latents.LatentReader(out, batch_size=4, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(next(other_seed)["x"], batches[0]["x"])

  seen = []
  for p in range(3):
    host = latents.LatentReader(out, batch_size=2, seed=0, process_index=p, process_count=3)
    assert host.batches_per_epoch == 3  # 23 // 3 = 7 rows each
    seen.append({int(v) for _ in range(3) for v in next(host)["x"][:, 0, 0, 0]})
  assert all(len(s) == 6 for s in seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  with pytest.raises(DataError, match="batch size 9"):
    latents.LatentReader(out, batch_size=9, process_index=0, process_count=3)


def test_tree_digest_tracks_config_and_params():
  params = {"a": np.ones((2, 3), np.float32), "b": {"c": np.zeros((4,), np.float32)}}
  base = latents.tree_digest({"width": 2}, params)
  assert base == latents.tree_digest({"width": 2}, {"b": {"c": np.zeros(4, np.float32)}, "a": np.ones((2, 3))
                                                    .astype(np.float32)})
  changed = {"a": params["a"].copy(), "b": params["b"]}
  changed["a"][1, 2] = 1.5
  assert latents.tree_digest({"width": 2}, changed) != base
  assert latents.tree_digest({"width": 3}, params) != base
