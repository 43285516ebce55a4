"""The FID Inception v3 (the 2015-12-05 TensorFlow graph behind FID, sFID, IS and precision/recall) in Flax, NHWC.

The layout is pytorch-fid's FIDInceptionV3: torchvision's Inception3 with the blocks patched to behave like the TF
graph. Average pools exclude padding (TF's AvgPool does), the last block's branch pool is a MAX pool (a quirk of the
graph), and BasicConv2d is a bias-free conv, inference batch norm with eps 1e-3, ReLU. Module and parameter names
follow the PyTorch state dict (`Mixed_6d/branch1x1/conv/kernel` <- `Mixed_6d.branch1x1.conv.weight`), so the
converter is a rename plus transposes.

Outputs (`InceptionV3.__call__` on preprocessed images):
  pool3            (N, 2048)  the TF graph's `pool_3:0`, FID's and precision/recall's features.
  spatial          (N, 2023)  sFID's features: the TF graph's `mixed_6/conv:0`, first 7 channels, flattened (h, w, c).
                   `mixed_6` is the graph's 7th mixed block, counting from `mixed` = Mixed_5b: mixed_3 is the grid
                   reduction Mixed_6a, so mixed_6 = Mixed_6d (not 6e), and `mixed_6/conv` is its first tower, the
                   1x1 branch; the tensor is the scope's output, i.e. after batch norm and ReLU = the output of
                   pytorch-fid's `Mixed_6d.branch1x1` (17 x 17 x 192). The (h, w, c) flattening order matters: it
                   is how ADM reshapes the NHWC tensor, so our mu_s / sigma_s line up with ADM reference batches.
  logits           (N, 1008)  pool3 @ W + b, the graph's softmax/logits.
  logits_unbiased  (N, 1008)  pool3 @ W: what ADM's Inception Score takes its softmax of (it reads the MatMul's
                   weight input and never adds the bias); torch-fidelity's 'logits_unbiased' likewise.

Preprocessing (`preprocess`): float images in [0, 255] are resized to 299 x 299 and mapped to [-1, 1].
  "tf1"    TF1's legacy bilinear resize (align_corners=False, half_pixel_centers=False: source = dst * in/out, no
           half-pixel shift), then (x - 128) / 128: what the TF graph does inside, hence what ADM's evaluator and
           torch-fidelity compute. The default, and the only mode comparable with published DiT numbers.
  "torch"  PyTorch's bilinear (align_corners=False: source = (dst + 0.5) * in/out - 0.5, clamped at 0), then
           x / 127.5 - 1: exactly pytorch-fid's pipeline (it feeds [0, 1] images, interpolates, then 2x - 1), so
           FIDs match pytorch-fid's rather than ADM's.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008          # the TF graph's classifier: 1000 ImageNet classes plus 8 unused
SPATIAL_CHANNELS = 7        # ADM keeps the first 7 of mixed_6/conv's 192 channels
RESIZE_MODES = ("tf1", "torch")
BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST  # features feed covariances over 50k images: no reduced-precision convs


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  """The saved description of a converted Inception (checkpoints.save writes it as config.json)."""
  num_classes: int = NUM_CLASSES
  source: str = ""          # the file it was converted from, for the record

  MODEL: ClassVar[str] = "inception"

  def to_json(self) -> dict[str, Any]:
    return {"model": self.MODEL, **dataclasses.asdict(self)}

  def dumps(self) -> str:
    return json.dumps(self.to_json(), indent=1)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "InceptionConfig":
    d = dict(d)
    if d.pop("model", None) != cls.MODEL:
      raise ValueError("this model config does not describe the FID Inception")
    return cls(**d)


# ----------------------------------------------------------------------------------------------------------- resizing

def _tf1_taps(in_size: int, out_size: int):
  """(lower, upper, fraction) source taps of TF1's legacy bilinear resize, in TF's float32 arithmetic."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lower = np.floor(src).astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, (src - lower.astype(np.float32)).astype(np.float32)


def _torch_taps(in_size: int, out_size: int):
  """(lower, upper, fraction) taps of torch's bilinear interpolate with align_corners=False."""
  scale = np.float32(in_size) / np.float32(out_size)
  # torch evaluates scale * (dst + 0.5) - 0.5 as one fused multiply-add: the exact value rounded once to float32.
  # Float64 holds that exact value (a 24-bit scale times an 11-bit index), so it rounds identically; two float32
  # roundings move taps by up to 1.5e-5 pixel, 3e-5 in the network's input at 384 -> 299.
  src = np.maximum((np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32), np.float32(0))
  lower = src.astype(np.int32)  # src >= 0, so truncation is floor
  upper = np.where(lower < in_size - 1, lower + 1, lower)
  return lower, upper, (src - lower.astype(np.float32)).astype(np.float32)


def _lerp_axis(x, axis: int, taps):
  lower, upper, frac = taps
  shape = [1] * x.ndim
  shape[axis] = -1
  a, b = jnp.take(x, lower, axis=axis), jnp.take(x, upper, axis=axis)
  # a + (b - a) * t is TF's formula; torch's (1 - t) a + t b differs by an ulp, far below what features notice.
  return a + (b - a) * jnp.asarray(frac).reshape(shape)


def resize(images, size: int = INPUT_SIZE, mode: str = "tf1"):
  """Bilinear resize of (N, H, W, C) float images to (N, size, size, C): TF1 legacy or torch semantics.

  Interpolates along W first, then H, as TF's kernel does (two separable lerps; bilinear weights are a product)."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}; got {mode!r}.")
  taps = _tf1_taps if mode == "tf1" else _torch_taps
  x = jnp.asarray(images, jnp.float32)
  h, w = x.shape[1:3]
  if w != size:  # both formulas are the identity at equal sizes
    x = _lerp_axis(x, 2, taps(w, size))
  if h != size:
    x = _lerp_axis(x, 1, taps(h, size))
  return x


def check_images(images) -> None:
  """Raises ValueError unless `images` is (N >= 1, H, W, 3), uint8 or float (values in [0, 255])."""
  shape, dtype = np.shape(images), getattr(images, "dtype", None)
  if len(shape) != 4 or shape[0] == 0 or shape[-1] != 3:
    raise ValueError(f"the Inception takes (N, H, W, 3) RGB images; got shape {tuple(shape)}.")
  if dtype is not None and not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"the Inception takes uint8 or float images in [0, 255]; got dtype {dtype}.")


def preprocess(images, mode: str = "tf1"):
  """(N, 299, 299, 3) float32 network input from (N, H, W, 3) images in [0, 255] (uint8 or float)."""
  x = resize(jnp.asarray(images).astype(jnp.float32), INPUT_SIZE, mode)
  if mode == "tf1":
    return (x - 128.0) / 128.0
  return x / 127.5 - 1.0


# -------------------------------------------------------------------------------------------------------- the network

class FrozenBatchNorm(nn.Module):
  """Inference batch norm with the running statistics as plain parameters (nothing is ever updated)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv2d(nn.Module):
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=_HIGHEST, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
  # count_include_pad=False: border outputs average only the real pixels, like TF's AvgPool with SAME padding.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35 x 35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17 x 17 block with factorised 7x7 convolutions; also returns its 1x1 branch (sFID reads Mixed_6d's)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8 x 8 block with split 1x3 / 3x1 outputs. `max_pool`: the graph's last block pools with max, not average."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                          BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = (nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1))) if self.max_pool
              else _avg_pool_3x3(x))
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The classifier: returns (pool3 @ W + b, pool3 @ W), both needed (torch-fidelity 'logits' / ADM's IS)."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.dot(x, kernel, precision=_HIGHEST)
    return unbiased + bias, unbiased


class InceptionV3(nn.Module):
  """The FID Inception on preprocessed (N, 299, 299, 3) input; returns the dict described in the module doc."""
  config: InceptionConfig = InceptionConfig()

  @nn.compact
  def __call__(self, x):
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool3 = x.mean(axis=(1, 2))
    logits, unbiased = Logits(self.config.num_classes, name="fc")(pool3)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    return {"pool3": pool3, "spatial": spatial, "logits": logits, "logits_unbiased": unbiased}


def param_shapes(config: InceptionConfig = InceptionConfig()):
  """The parameter tree as ShapeDtypeStructs, without computing anything."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(InceptionV3(config).init, jax.random.key(0), x)["params"]


# ---------------------------------------------------------------------------------------------------------- features

@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(model, params, images, mode):
  out = model.apply({"params": params}, preprocess(images, mode))
  return {k: out[k] for k in ("pool3", "spatial", "logits_unbiased")}


def features(model: InceptionV3, params, images, mode: str = "tf1", batch_size: int = 100,
             progress=None) -> dict[str, np.ndarray]:
  """{"pool3", "spatial", "logits_unbiased"} float32 numpy arrays for (N, H, W, 3) images in [0, 255].

  Batches are padded to `batch_size`, so any N compiles once per image size. `progress(done, total)` is called after
  each batch."""
  check_images(images)
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}; got {mode!r}.")
  n = len(images)
  batch_size = min(batch_size, n)
  out: dict[str, list] = {}
  for start in range(0, n, batch_size):
    chunk = np.asarray(images[start:start + batch_size])  # also reads memory-mapped arrays batch by batch
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    for k, v in jax.device_get(_forward(model, params, chunk, mode)).items():
      out.setdefault(k, []).append(v[:n - start])
    if progress is not None:
      progress(min(start + batch_size, n), n)
  return {k: np.concatenate(v) for k, v in out.items()}
