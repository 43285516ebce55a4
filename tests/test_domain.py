"""The digits feature network: held-out accuracy, a Frechet distance that ranks image quality, checkpoints."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from graft_jax.data.demo import load_demo
from graft_jax.evaluation import domain, frechet


@pytest.fixture(scope="module")
def trained():
  net, params, accuracy = domain.train_domain_net(*load_demo("train"), seed=0)
  return net, params, accuracy


@pytest.fixture(scope="module")
def train_statistics(trained):
  net, params, _ = trained
  return domain.reference_statistics(net, params, load_demo("train")[0])


def blur(images, sigma):
  return gaussian_filter(images, (0, sigma, sigma, 0)).astype(np.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_matches_flax_conv(stride):
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  conv = domain.Conv3x3(5, stride=stride)
  params = jax.jit(conv.init)(jax.random.key(0), x)["params"]
  ours = np.asarray(jax.jit(conv.apply)({"params": params}, x))
  reference = nn.Conv(5, (3, 3), strides=stride, padding=1)
  ref_params = {"kernel": params["kernel"]["kernel"].reshape(3, 3, 3, 5), "bias": params["kernel"]["bias"]}
  expected = np.asarray(jax.jit(reference.apply)({"params": ref_params}, x))
  assert ours.shape == expected.shape == (2, 16 // stride, 16 // stride, 5)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_held_out_accuracy(trained):
  net, params, accuracy = trained
  test_x, test_y = load_demo("test")
  report = domain.class_accuracy(net, params, test_x, test_y)
  assert accuracy == report["accuracy"] >= 0.95
  _, logits = jax.jit(net.apply)({"params": params}, test_x)
  hit = np.asarray(logits).argmax(-1) == test_y
  np.testing.assert_array_equal(report["per_class"], [hit[test_y == c].mean() for c in range(10)])
  assert report["per_class"].min() >= 0.8
  # Samples that ignore their intended labels score near chance.
  shuffled = np.random.default_rng(0).permutation(test_y)
  assert domain.class_accuracy(net, params, test_x, shuffled)["accuracy"] < 0.3
  only_threes = domain.class_accuracy(net, params, test_x[test_y == 3], test_y[test_y == 3])
  assert np.isnan(only_threes["per_class"][0]) and not np.isnan(only_threes["per_class"][3])


def test_frechet_distance_ranks_quality(trained, train_statistics):
  net, params, _ = trained
  train_x, train_y = load_demo("train")
  test_x, _ = load_demo("test")
  n = len(test_x)
  rng = np.random.default_rng(0)
  fd = {name: domain.frechet_distance_to(net, params, images, train_statistics)["fd"] for name, images in {
      "held_out": test_x,
      "blur_0.5": blur(test_x, 0.5),
      "blur_1": blur(test_x, 1.0),
      "blur_2": blur(test_x, 2.0),
      "one_class": train_x[train_y == 1][:n],
      "pixels_shuffled": test_x.reshape(n, -1)[:, rng.permutation(256)].reshape(test_x.shape),
      "noise": rng.uniform(-1, 1, test_x.shape).astype(np.float32),
  }.items()}
  assert fd["held_out"] < fd["blur_0.5"] < fd["blur_1"] < fd["blur_2"]
  for bad in ("blur_1", "one_class", "pixels_shuffled", "noise"):
    assert fd[bad] > 10 * fd["held_out"], (bad, fd)


def test_features_do_not_depend_on_batching(trained):
  net, params, _ = trained
  x = load_demo("train")[0][:300]  # more than one evaluation batch, the second one padded
  full = domain.features(net, params, x)
  assert full.shape == (300, 64) and full.dtype == np.float32
  np.testing.assert_allclose(domain.features(net, params, x[250:260]), full[250:260], rtol=0, atol=1e-5)
  direct, _ = jax.jit(net.apply)({"params": params}, x[:7])
  np.testing.assert_allclose(full[:7], np.asarray(direct), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="takes"):
    domain.features(net, params, np.zeros((2, 8, 8, 1), np.float32))


def test_checkpoint_round_trip_and_reference_file(trained, train_statistics, tmp_path):
  net, params, accuracy = trained
  path = domain.save_domain_net(tmp_path / "digits.npz", net, params, accuracy)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npz"]
  loaded_net, loaded_params, meta = domain.load_domain_net(path)
  assert loaded_net == net
  assert meta["name"] == domain.NET_NAME and meta["test_accuracy"] == accuracy
  x = load_demo("test")[0]
  np.testing.assert_array_equal(domain.features(loaded_net, loaded_params, x), domain.features(net, params, x))
  # load_or_train finds the checkpoint instead of training again.
  assert domain.load_or_train(path)[2] == meta

  stats_path = frechet.save_statistics(tmp_path / "train_stats.npz", *train_statistics)
  from_file = domain.frechet_distance_to(net, params, x, stats_path)
  from_tuple = domain.frechet_distance_to(net, params, x, train_statistics)
  assert from_file == from_tuple
  assert from_file["feature_net"] == "digits-cnn-v1" and from_file["num_samples"] == len(x)


def test_checkpoint_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    domain.load_domain_net(tmp_path / "missing.npz")
  not_ours = tmp_path / "stats.npz"
  np.savez(not_ours, mu=np.zeros(2))
  with pytest.raises(ValueError, match="not a domain-network checkpoint"):
    domain.load_domain_net(not_ours)
  other = tmp_path / "other.npz"
  np.savez(other, __meta__=np.array('{"name": "digits-cnn-v0"}'))
  with pytest.raises(ValueError, match="digits-cnn-v0"):
    domain.load_domain_net(other)
