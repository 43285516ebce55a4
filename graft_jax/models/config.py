"""The model description surgery edits: a plain, hashable, JSON-serialisable config with one operator spec per layer."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping

from graft_jax import operators
from graft_jax.operators.remat import parse as parse_remat


def _hashable(value):
  """JSON gives lists back; module attributes must be hashable, so lists become tuples."""
  return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """An operator by registry name plus its options (defaults filled in, so two specs compare by behaviour)."""
  name: str
  options: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def make(cls, name: str, **options) -> "OpSpec":
    full = operators.get(name).config(**options)
    return cls(name, tuple(sorted((k, _hashable(v)) for k, v in full.items())))

  @property
  def config(self) -> dict[str, Any]:
    return dict(self.options)

  def build(self, dim: int):
    return operators.build(self.name, dim, **self.config)

  def flops(self, dim: int, tokens: int) -> int:
    """Forward FLOPs on one sample of `tokens` tokens at width `dim`, by the formula the operator was registered with
    (operators/flops.py)."""
    return operators.get(self.name).flops(self.config, dim, tokens)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, **self.config}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "OpSpec":
    d = dict(d)
    return cls.make(d.pop("name"), **d)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One DiT block: a sequence mixer at site "attn" and a channel mixer at site "mlp"."""
  attn: OpSpec
  mlp: OpSpec

  def site(self, name: str) -> OpSpec:
    return getattr(self, name)

  def to_json(self) -> dict[str, Any]:
    return {"attn": self.attn.to_json(), "mlp": self.mlp.to_json()}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "LayerSpec":
    return cls(OpSpec.from_json(d["attn"]), OpSpec.from_json(d["mlp"]))


@dataclasses.dataclass(frozen=True)
class ParallelPairSpec:
  """Two DiT blocks that read the same input; a learned projection (2D -> D) of their concatenated residual updates
  merges them (depth to width: a pair replaces two consecutive blocks)."""
  first: LayerSpec
  second: LayerSpec

  @property
  def blocks(self) -> tuple[LayerSpec, LayerSpec]:
    return (self.first, self.second)

  def to_json(self) -> dict[str, Any]:
    return {"kind": "parallel_pair", "first": self.first.to_json(), "second": self.second.to_json()}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "ParallelPairSpec":
    return cls(LayerSpec.from_json(d["first"]), LayerSpec.from_json(d["second"]))


Layer = LayerSpec | ParallelPairSpec


# What a model may compute in (parameters stay float32 wherever they train).
COMPUTE_DTYPES = ("bfloat16", "float32")


def check_compute_dtype(dtype: str) -> None:
  """A ValueError of one sentence unless `dtype` is one of COMPUTE_DTYPES."""
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype {dtype!r} is unknown; use one of {', '.join(COMPUTE_DTYPES)}.")


def layer_from_json(d: Mapping[str, Any]) -> Layer:
  """A plain block's JSON has no "kind" (the format older exports use); a pair's says "parallel_pair"."""
  kind = d.get("kind", "block")
  if kind == "parallel_pair":
    return ParallelPairSpec.from_json(d)
  if kind != "block":
    raise ValueError(f"unknown layer kind {kind!r}; use a plain block or 'parallel_pair'.")
  return LayerSpec.from_json(d)


def layer_blocks(layer: Layer) -> tuple[LayerSpec, ...]:
  return layer.blocks if isinstance(layer, ParallelPairSpec) else (layer,)


class LatentTransformerConfig:
  """What DiT and PixArt configs share: a square latent cut into patches, and a tuple of layers that surgery edits
  by (layer, site). Subclasses are frozen dataclasses with the fields these methods read."""
  MODEL: ClassVar[str]   # the "model" entry of the JSON form, the key of checkpoints._MODELS
  TITLE: ClassVar[str]   # for error messages

  def __post_init__(self):
    try:
      parse_remat(self.remat)
    except ValueError as e:
      raise ValueError(f"model {e}") from None

  @property
  def depth(self) -> int:
    """Layers in sequence: a parallel pair counts once."""
    return len(self.layers)

  @property
  def blocks(self) -> tuple[LayerSpec, ...]:
    """Every block in order, the two of each parallel pair in turn."""
    return tuple(b for layer in self.layers for b in layer_blocks(layer))

  @property
  def num_pairs(self) -> int:
    return sum(isinstance(layer, ParallelPairSpec) for layer in self.layers)

  def first_block(self, layer: int) -> int:
    """The index in `blocks` of layer `layer`'s first block: the teacher's block number before pairs merged."""
    return sum(len(layer_blocks(prev)) for prev in self.layers[:layer])

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def with_layer(self, index: int, site: str, spec: OpSpec):
    layers = list(self.layers)
    layers[index] = dataclasses.replace(layers[index], **{site: spec})
    return self.replace(layers=tuple(layers))

  def to_json(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
    return {"model": self.MODEL, **d, "layers": [layer.to_json() for layer in self.layers]}

  def dumps(self) -> str:
    return json.dumps(self.to_json(), indent=1)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]):
    d = dict(d)
    if d.pop("model", "dit") != cls.MODEL:
      raise ValueError(f"this model config does not describe {cls.TITLE}")
    layers = tuple(layer_from_json(layer) for layer in d.pop("layers"))
    return cls(**d, layers=layers)


@dataclasses.dataclass(frozen=True)
class DiTConfig(LatentTransformerConfig):
  MODEL: ClassVar[str] = "dit"
  TITLE: ClassVar[str] = "a DiT"

  input_size: int = 32          # latent height = width
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  num_heads: int = 16           # the teacher's heads; also what a re-created `mha` gets
  num_classes: int = 1000       # index num_classes is the null class (CFG, label dropout)
  learn_sigma: bool = True
  class_dropout_prob: float = 0.1
  remat: str = "none"           # activation recomputation per layer in training (operators/remat.py)
  layers: tuple[Layer, ...] = ()


@dataclasses.dataclass(frozen=True)
class PixArtConfig(LatentTransformerConfig):
  """PixArt-alpha/Sigma: the defaults are PixArt-Sigma-XL/2 at 1024 px (128 x 128 SDXL latents, T5-XXL captions).

  The position table's coordinates are divided by grid_size / base_size * pe_interpolation with base_size =
  grid_size of `input_size` (PixArt's convention), so another resolution keeps the training-time spacing.
  """
  MODEL: ClassVar[str] = "pixart"
  TITLE: ClassVar[str] = "a PixArt model"

  input_size: int = 128         # latent size the model was trained at: sets base_size of the position table
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  num_heads: int = 16           # self-attention (as re-created `mha`) and cross-attention heads
  caption_channels: int = 4096  # T5-XXL features
  caption_length: int = 300     # tokens of a caption, and rows of the learned null caption
  learn_sigma: bool = True
  pe_interpolation: float = 2.0  # image_size / 512 in PixArt-Sigma (diffusers' interpolation_scale)
  caption_dropout_prob: float = 0.1
  remat: str = "none"           # as DiTConfig.remat
  layers: tuple[LayerSpec, ...] = ()

  @property
  def base_size(self) -> int:
    return self.grid_size


# DiT paper sizes: (depth, width, heads).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit_config(preset: str = "DiT-XL/2", **overrides) -> DiTConfig:
  """A DiT preset such as "DiT-XL/2" (size S/B/L/XL, patch 2/4/8); `depth`, `hidden_size`, `num_heads`, `mlp_ratio`
  and any DiTConfig field can be overridden (tests use tiny widths)."""
  try:
    size, patch = preset.removeprefix("DiT-").split("/")
    depth, width, heads = SIZES[size]
    patch = int(patch)
  except (ValueError, KeyError):
    raise ValueError(f"unknown DiT preset {preset!r}; use DiT-{{S,B,L,XL}}/{{2,4,8}}.") from None
  depth = overrides.pop("depth", depth)
  mlp_ratio = overrides.pop("mlp_ratio", 4.0)
  fields = dict(patch_size=patch, hidden_size=width, num_heads=heads) | overrides
  layer = LayerSpec(OpSpec.make("mha", num_heads=fields["num_heads"]), OpSpec.make("mlp", ratio=mlp_ratio))
  return DiTConfig(**fields, layers=(layer,) * depth)


def pixart_config(image_size: int = 1024, **overrides) -> PixArtConfig:
  """PixArt-Sigma-XL/2 at `image_size` px (256, 512, 1024 or 2048; SDXL VAE, /8): 28 layers of width 1152 with 16
  heads, pe_interpolation = image_size / 512. `depth`, `mlp_ratio` and any PixArtConfig field can be overridden."""
  depth = overrides.pop("depth", 28)
  mlp_ratio = overrides.pop("mlp_ratio", 4.0)
  fields = dict(input_size=image_size // 8, pe_interpolation=image_size / 512) | overrides
  heads = fields.get("num_heads", 16)
  layer = LayerSpec(OpSpec.make("mha", num_heads=heads), OpSpec.make("mlp", ratio=mlp_ratio))
  return PixArtConfig(**fields, layers=(layer,) * depth)
