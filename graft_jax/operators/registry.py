"""The operator registry: name -> Flax module class, its site, its default config, its FLOP formula and its PyTorch
importer.

Every operator maps (B, N, D) -> (B, N, D). A DiT layer names its sequence mixer (site "attn") and its channel
mixer (site "mlp") by registry name, so surgery only has to edit a name and a config dict. An operator of one's own
is registered the same way as the built-in ones (README, Use it), from any module imported before a config or
checkpoint names it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from graft_jax.operators.flops import Flops

SITES = ("attn", "mlp")

# A torch importer gets the tensors under one operator's prefix (keys relative to it, e.g. "qkv.weight") as numpy
# arrays, the model width and the teacher's head count, and returns (config, flax params) for that operator.
TorchImporter = Callable[[Mapping[str, np.ndarray], int, int], "tuple[dict[str, Any], dict[str, Any]]"]


@dataclasses.dataclass(frozen=True)
class Operator:
  name: str
  site: str                      # "attn" (sequence mixer) or "mlp" (channel mixer)
  module: type[nn.Module]        # constructed as module(dim=D, **config)
  defaults: Mapping[str, Any]
  flops: Flops                   # flops(config, dim, tokens): forward FLOPs on one sample (operators/flops.py)
  torch_modules: frozenset[str]  # the submodule names an official PyTorch checkpoint holds for it
  from_torch: TorchImporter | None = None

  def config(self, **overrides) -> dict[str, Any]:
    unknown = set(overrides) - set(self.defaults)
    if unknown:
      raise ValueError(f"operator {self.name!r} has no option(s) {sorted(unknown)}; "
                       f"its options are {sorted(self.defaults)}.")
    return {**self.defaults, **overrides}


_OPERATORS: dict[str, Operator] = {}


def register(name: str, site: str, defaults: Mapping[str, Any], *, flops: Flops, torch_modules=(), from_torch=None):
  """Class decorator adding a Flax module to the registry under `name`. The module is built as module(dim=D,
  **config), each of its options with a default in `defaults` (checked here); `flops(config, dim, tokens)` gives
  its forward FLOPs on one sample (the graft summary's); `torch_modules` and `from_torch` say how the converter
  recognises and imports its PyTorch weights.

  Registering a name again replaces the entry only when the class comes from the same module under the same name
  (a notebook cell or a config file run again); any other clash is an error."""
  if site not in SITES:
    raise ValueError(f"site must be one of {SITES}, got {site!r}")

  def wrap(cls):
    _check_fields(name, cls, defaults)
    old = _OPERATORS.get(name)
    if old is not None and (old.module.__module__, old.module.__qualname__) != (cls.__module__, cls.__qualname__):
      raise ValueError(f"operator {name!r} is already registered by {old.module.__module__}."
                       f"{old.module.__qualname__}; pick another name.")
    _OPERATORS[name] = Operator(name, site, cls, dict(defaults), flops, frozenset(torch_modules), from_torch)
    return cls
  return wrap


def _check_fields(name: str, cls, defaults: Mapping[str, Any]) -> None:
  """The module is built as cls(dim=D, **config): it must take `dim`, and its options must be its other fields, each
  required one with a default in `defaults`, so that a bad registration fails here rather than at the first build."""
  fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
  required = {f for f, field in fields.items()
              if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
  problems = []
  if "dim" not in fields:
    problems.append("it has no field 'dim'")
  if unknown := sorted(set(defaults) - set(fields)):
    problems.append(f"its defaults name {unknown}, which are not its fields")
  if missing := sorted(required - set(defaults) - {"dim"}):
    problems.append(f"its fields {missing} have no default")
  if problems:
    raise ValueError(f"operator {name!r} ({cls.__qualname__}) cannot be built as Module(dim=D, **options): "
                     f"{'; '.join(problems)}.")


def get(name: str) -> Operator:
  try:
    return _OPERATORS[name]
  except KeyError:
    raise ValueError(f"unknown operator {name!r}; known operators are {names()} (an operator of your own is known "
                     "once the module that registers it has been imported).") from None


def names(site: str | None = None) -> list[str]:
  return sorted(n for n, op in _OPERATORS.items() if site is None or op.site == site)


def build(name: str, dim: int, **config) -> nn.Module:
  """The Flax module for operator `name` at width `dim`; unspecified options take the operator's defaults."""
  op = get(name)
  return op.module(dim=dim, **op.config(**config))


def match_torch_modules(site: str, modules: frozenset[str]) -> Operator:
  """The operator of `site` whose official PyTorch submodules are exactly `modules`."""
  found = [op for op in _OPERATORS.values() if op.site == site and op.torch_modules == modules]
  if len(found) != 1:
    raise ValueError(f"no {site} operator has PyTorch submodules {sorted(modules)}")
  return found[0]
