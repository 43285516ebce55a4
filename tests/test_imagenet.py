"""ImageNet sources and ADM preprocessing: the centre crop against a step-by-step PIL reference and exact pixel
expectations, flips, the folder layout, and TFDS (missing manual files; a tiny prepared imagenet2012)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from graft_jax.data import imagenet
from graft_jax.data.latents import DataError

WNIDS = ("n01440764", "n01443537", "n01484850")  # real wnids: TFDS only accepts its 1000 label names


def reference_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center_crop_arr spelled out: sizes computed first, the crop taken with PIL's box crop."""
  width, height = image.size
  while min(width, height) >= 2 * size:
    width, height = width // 2, height // 2
    image = image.resize((width, height), Image.BOX)
  factor = size / min(width, height)
  width, height = round(width * factor), round(height * factor)
  image = image.resize((width, height), Image.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


def random_image(rng, height: int, width: int) -> Image.Image:
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("height,width,size", [(130, 300, 32), (37, 100, 16), (12, 20, 16), (64, 64, 32),
                                               (255, 129, 64), (33, 31, 16)])
def test_center_crop_matches_reference(height, width, size):
  image = random_image(np.random.default_rng(height * width), height, width)
  ours = imagenet.center_crop(image, size)
  assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
  np.testing.assert_array_equal(ours, reference_crop(image, size))


def test_center_crop_halves_with_box_filter():
  """64 -> 32 is one box halving and no resize: each output pixel is the mean of a 2x2 block, to within PIL's
  rounding after each of its two separable passes (a bicubic or bilinear reduction of noise is far off)."""
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  ours = imagenet.center_crop(Image.fromarray(pixels), 32).astype(float)
  blocks = pixels.reshape(32, 2, 32, 2, 3).astype(float).mean(axis=(1, 3))
  assert np.max(np.abs(ours - blocks)) <= 1.0


def test_center_crop_takes_the_middle():
  """A 16 x 100 image needs no resize; the crop must be columns 42..57 ((100 - 16) // 2 = 42) exactly."""
  columns = np.broadcast_to(np.arange(100, dtype=np.uint8)[None, :, None], (16, 100, 3))
  ours = imagenet.center_crop(Image.fromarray(np.ascontiguousarray(columns)), 16)
  np.testing.assert_array_equal(ours[0, :, 0], np.arange(42, 58))
  rows = np.ascontiguousarray(columns.transpose(1, 0, 2))  # 100 x 16: rows 42..57
  np.testing.assert_array_equal(imagenet.center_crop(Image.fromarray(rows), 16)[:, 0, 0], np.arange(42, 58))


def test_load_image_converts_flips_and_rejects(tmp_path):
  rng = np.random.default_rng(1)
  rgb = random_image(rng, 20, 30)
  rgb.save(tmp_path / "a.png")
  rgb.convert("L").save(tmp_path / "grey.png")
  (tmp_path / "bad.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
  plain = imagenet.load_image(tmp_path / "a.png", 16)
  np.testing.assert_array_equal(plain, reference_crop(rgb, 16))
  np.testing.assert_array_equal(imagenet.load_image(tmp_path / "a.png", 16, flip=True), plain[:, ::-1])
  grey = imagenet.load_image(tmp_path / "grey.png", 16)
  assert grey.shape == (16, 16, 3) and np.array_equal(grey[..., 0], grey[..., 2])
  assert imagenet.load_image(tmp_path / "bad.JPEG", 16) is None
  scaled = imagenet.to_unit_range(np.array([0, 255, 51], np.uint8))
  np.testing.assert_allclose(scaled, [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-7)


def make_folder(root, rng, counts=(3, 2, 4)):
  """ImageNet layout with classes created out of order, a stray text file and one undecodable image."""
  for wnid, count in reversed(list(zip(WNIDS, counts))):
    (root / "train" / wnid).mkdir(parents=True)
    for i in range(count):
      random_image(rng, 18 + i, 25).save(root / "train" / wnid / f"{wnid}_{i}.JPEG")
  (root / "train" / WNIDS[1] / "notes.txt").write_text("not an image")
  (root / "train" / WNIDS[1] / f"{WNIDS[1]}_9.JPEG").write_bytes(b"broken")


def test_image_folder_lists_sorted_classes(tmp_path):
  make_folder(tmp_path, np.random.default_rng(2))
  for root in (tmp_path, tmp_path / "train"):
    source = imagenet.ImageFolder(root)
    records = source.records()
    assert source.classes == list(WNIDS) and source.num_classes == 3
    assert [r.label for r in records] == [0] * 3 + [1] * 3 + [2] * 4
    assert [r.position for r in records] == list(range(10))
    assert records[5].key == f"{WNIDS[1]}_9.JPEG"  # undecodable files are listed; encoding skips them
    assert [p.name for _, p in source.read(records[:2])] == [f"{WNIDS[0]}_0.JPEG", f"{WNIDS[0]}_1.JPEG"]
  with pytest.raises(DataError, match="is not a folder"):
    imagenet.ImageFolder(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="has no class folders"):
    imagenet.ImageFolder(tmp_path / "empty")


def test_tfds_without_manual_files_says_where_they_go(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError) as e:
    imagenet.TfdsImageNet(tmp_path / "tfds", tmp_path / "manual")
  message = str(e.value)
  assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message and str(tmp_path / "manual") in message
  assert "\n" not in message


def _tar(files) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in files:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, "JPEG")
  return buf.getvalue()


def test_tfds_reads_the_same_images_as_the_folder(tmp_path):
  """A tiny imagenet2012 prepared by TFDS from fake manual tars: names, labels, and the bytes of any subset."""
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("importlib_resources")  # tfds' download_and_prepare imports it
  rng = np.random.default_rng(3)
  images = {wnid: [random_image(rng, 20 + i, 27) for i in range(3)] for wnid in WNIDS}
  manual = tmp_path / "manual"
  manual.mkdir()
  inner = [(f"{w}.tar", _tar([(f"{w}_{i}.JPEG", _jpeg(im)) for i, im in enumerate(images[w])])) for w in WNIDS]
  (manual / "ILSVRC2012_img_train.tar").write_bytes(_tar(inner))
  (manual / "ILSVRC2012_img_val.tar").write_bytes(_tar([("ILSVRC2012_val_00000001.JPEG", _jpeg(images[WNIDS[0]][0]))]))
  source = imagenet.TfdsImageNet(tmp_path / "tfds", manual)
  records = source.records()
  assert source.num_classes == 1000
  assert sorted((r.key, r.label) for r in records) == [(f"{w}_{i}.JPEG", c) for c, w in enumerate(WNIDS)
                                                       for i in range(3)]
  subset = [records[1], records[4], records[8]]
  for record, data in source.read(subset):
    wnid, index = record.key.split(".")[0].split("_")
    np.testing.assert_array_equal(imagenet.load_image(data, 16),
                                  imagenet.load_image(io.BytesIO(_jpeg(images[wnid][int(index)])), 16))
  assert [r.key for r, _ in source.read(subset)] == [r.key for r in subset]
