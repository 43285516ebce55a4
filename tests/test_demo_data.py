"""The demo digits: split, upsampling (against jax.image.resize), value range; image grids written as PNG."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from graft_jax.data import demo
from graft_jax.data.images import make_grid, save_grid, to_uint8


def test_split_is_stratified_disjoint_and_fixed():
  targets = load_digits().target
  train_x, train_y = demo.load_demo("train")
  test_x, test_y = demo.load_demo("test")
  assert train_x.shape == (len(train_y), 16, 16, 1) and test_x.shape == (len(test_y), 16, 16, 1)
  assert train_x.dtype == test_x.dtype == np.float32 and train_y.dtype == test_y.dtype == np.int32
  idx = demo.split_indices()
  assert len(np.intersect1d(idx["train"], idx["test"])) == 0
  assert len(idx["train"]) + len(idx["test"]) == len(targets) == 1797
  np.testing.assert_array_equal(train_y, targets[idx["train"]])
  np.testing.assert_array_equal(test_y, targets[idx["test"]])
  for c in range(demo.NUM_CLASSES):
    assert np.sum(test_y == c) == np.ceil(0.1 * np.sum(targets == c))
  again_x, again_y = demo.load_demo("test")
  np.testing.assert_array_equal(again_x, test_x)
  np.testing.assert_array_equal(again_y, test_y)


def test_native_size_is_the_raw_digits_scaled_to_unit_range():
  raw = load_digits().images
  x, _ = demo.load_demo("train", size=8)
  np.testing.assert_allclose(x[..., 0], raw[demo.split_indices()["train"]] / 8.0 - 1.0, rtol=0, atol=1e-6)
  assert x.min() == -1.0 and x.max() == 1.0


@pytest.mark.parametrize("size", [16, 24])
def test_upsampling_matches_jax_linear_resize(size):
  raw = load_digits().images[demo.split_indices()["test"]].astype(np.float32)
  resize = jax.jit(lambda a: jax.image.resize(a, (a.shape[0], size, size), "linear"))
  expected = np.asarray(resize(raw)) / 8.0 - 1.0
  x, _ = demo.load_demo("test", size=size)
  np.testing.assert_allclose(x[..., 0], expected, rtol=0, atol=1e-5)
  assert x.min() >= -1.0 and x.max() <= 1.0


def test_bilinear_matrix_rows_are_interpolation_weights():
  m = demo.bilinear_matrix(8, 16)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-15)
  assert m.min() >= 0.0
  # A linear ramp stays linear inside the border, where no clamping happens.
  ramp = m @ np.arange(8.0)
  np.testing.assert_allclose(np.diff(ramp[1:-1]), 0.5, rtol=0, atol=1e-12)


def test_bad_arguments():
  with pytest.raises(ValueError, match="split must be one of"):
    demo.load_demo("validation")
  with pytest.raises(ValueError, match="at least the digits' native 8"):
    demo.load_demo("train", size=4)


def test_to_uint8():
  x = np.array([-1.0, -0.5, 0.0, 1.0, 3.0, -7.0], np.float32).reshape(1, 2, 3, 1)
  u = to_uint8(x)
  assert u.shape == (1, 2, 3, 3) and u.dtype == np.uint8
  np.testing.assert_array_equal(u[0, ..., 0].ravel(), [0, 64, 128, 255, 255, 0])
  np.testing.assert_array_equal(u[..., 0], u[..., 2])
  rgb = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(to_uint8(rgb), np.rint((rgb + 1) * 127.5).astype(np.uint8))
  with pytest.raises(ValueError, match="to_uint8 expects"):
    to_uint8(np.zeros((4, 4, 1)))


def test_grid_layout_and_png_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(1, 256, (5, 3, 4, 3), dtype=np.uint8)
  grid = make_grid(images, nrow=2, pad=1)
  assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 3)
  for i in range(5):
    top, left = 1 + (i // 2) * 4, 1 + (i % 2) * 5
    np.testing.assert_array_equal(grid[top:top + 3, left:left + 4], images[i])
  assert np.all(grid[9:12, 6:10] == 0)  # the empty sixth cell
  path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=2, pad=1)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
  assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_demo_images_make_a_grid(tmp_path):
  x, _ = demo.load_demo("test")
  path = save_grid(to_uint8(x[:20]), tmp_path / "digits.png", nrow=10)
  with Image.open(path) as im:
    assert im.size == (10 * 18 + 2, 2 * 18 + 2) and im.mode == "RGB"
