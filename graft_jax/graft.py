"""Graft plans and parameter-tree surgery: (teacher config, teacher params, plan) -> (student config, params).

A plan is a list of edits, each `{site, layers, operator, config, init}`:
  site      "attn" (sequence mixer) or "mlp" (channel mixer)
  layers    a list of 0-based block indices or a pattern: "odd" (1, 3, ...), "even", "three_of_four" (all but
            0, 4, 8, ...), "all", "first:K", "last:K"
  operator  a registry name (graft_jax.operators.names()); config its options
  init      "fresh" (the operator's default init), "teacher" (keep the teacher's weights; only when the operator
            type and shapes are unchanged: self-grafting controls), or the path of a stage-1 export
Everything is validated before any weight is touched; errors are one sentence (PlanError).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax import operators
from graft_jax.models.config import DiTConfig, OpSpec
from graft_jax.operators.flops import operator_flops

INITS = ("fresh", "teacher")


class PlanError(ValueError):
  """An invalid graft plan; the message is one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class Edit:
  site: str
  layers: tuple[int, ...]
  op: OpSpec
  init: str = "fresh"


def parse_layers(spec: Any, depth: int) -> tuple[int, ...]:
  if isinstance(spec, str):
    patterns = {"odd": range(1, depth, 2), "even": range(0, depth, 2), "all": range(depth),
                "three_of_four": [i for i in range(depth) if i % 4]}
    if spec in patterns:
      return tuple(patterns[spec])
    kind, _, count = spec.partition(":")
    if kind in ("first", "last") and count.isdigit() and 0 < int(count) <= depth:
      k = int(count)
      return tuple(range(k)) if kind == "first" else tuple(range(depth - k, depth))
    raise PlanError(f"layer pattern {spec!r} is not one of odd, even, all, three_of_four, first:K, last:K "
                    f"(K from 1 to {depth}).")
  layers = tuple(int(i) for i in spec)
  bad = [i for i in layers if not 0 <= i < depth]
  if bad or not layers:
    raise PlanError(f"layers {bad or '[]'} are out of range for a model of depth {depth} (0 to {depth - 1}).")
  if len(set(layers)) != len(layers):
    raise PlanError(f"layers {list(layers)} list a layer twice.")
  return tuple(sorted(layers))


@functools.lru_cache(maxsize=None)
def operator_shapes(spec: OpSpec, dim: int, tokens: int):
  """The operator's parameter shapes at width `dim` on `tokens` tokens (no weights are made)."""
  module = spec.build(dim)
  return jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, tokens, dim), jnp.float32))["params"]


def operator_params(spec: OpSpec, dim: int, tokens: int) -> int:
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(operator_shapes(spec, dim, tokens)))


def parse_plan(entries: Sequence[Mapping[str, Any]], teacher: DiTConfig) -> tuple[Edit, ...]:
  edits, seen = [], {}
  for n, entry in enumerate(entries):
    entry = dict(entry)
    where = f"graft plan entry {n}"
    unknown = set(entry) - {"site", "layers", "operator", "config", "init"}
    if unknown:
      raise PlanError(f"{where} has unknown field(s) {sorted(unknown)}.")
    site = entry.get("site")
    if site not in operators.SITES:
      raise PlanError(f"{where}: site must be one of {operators.SITES}, got {site!r}.")
    name = entry.get("operator")
    if name not in operators.names():
      raise PlanError(f"{where}: unknown operator {name!r}; known operators are {operators.names()}.")
    if operators.get(name).site != site:
      raise PlanError(f"{where}: operator {name!r} is a {operators.get(name).site} operator, not a {site} one.")
    try:
      op = OpSpec.make(name, **dict(entry.get("config") or {}))
    except ValueError as e:
      raise PlanError(f"{where}: {e}") from None
    try:
      operator_shapes(op, teacher.hidden_size, teacher.num_tokens)
    except Exception as e:  # a module's own shape checks raise various types
      raise PlanError(f"{where}: {name} with {op.config} cannot be built at width {teacher.hidden_size} on "
                      f"{teacher.num_tokens} tokens ({e}).") from None
    layers = parse_layers(entry.get("layers", "all"), teacher.depth)
    init = str(entry.get("init", "fresh"))
    if init not in INITS and not pathlib.Path(init).exists():
      raise PlanError(f"{where}: init must be 'fresh', 'teacher' or an existing stage-1 folder; {init!r} is none.")
    for i in layers:
      if (i, site) in seen:
        raise PlanError(f"{where}: layer {i} {site} is already edited by entry {seen[i, site]}.")
      seen[i, site] = n
      if init == "teacher":
        before = teacher.layers[i].site(site)
        if before.name != op.name or jax.tree.map(
            lambda s: s.shape, operator_shapes(before, teacher.hidden_size, teacher.num_tokens)) != jax.tree.map(
                lambda s: s.shape, operator_shapes(op, teacher.hidden_size, teacher.num_tokens)):
          raise PlanError(f"{where}: init 'teacher' needs the teacher's operator with the same shapes at layer {i} "
                          f"{site}, but the teacher has {before.name} there.")
    edits.append(Edit(site, layers, op, init))
  return tuple(edits)


def student_config(teacher: DiTConfig, edits: Sequence[Edit]) -> DiTConfig:
  config = teacher
  for edit in edits:
    for i in edit.layers:
      config = config.with_layer(i, edit.site, edit.op)
  return config


def sites(edits: Sequence[Edit]) -> list[tuple[int, str]]:
  """The grafted (layer, site) pairs in layer order."""
  return sorted((i, e.site) for e in edits for i in e.layers)


def _stage1_params(path: str):
  from graft_jax.train.distill import load_scions  # stage 1 writes the format it reads
  return load_scions(path)


def graft(teacher: DiTConfig, teacher_params, edits: Sequence[Edit], key: jax.Array):
  """(student config, student params): untouched subtrees are the teacher's arrays; each grafted site gets fresh
  params (its own key, folded from `key` by layer), the teacher's (init "teacher") or stage-1 weights (a path)."""
  config = student_config(teacher, edits)
  params = dict(teacher_params)
  for edit in edits:
    loaded = None if edit.init in INITS else _stage1_params(edit.init)
    want = operator_shapes(edit.op, teacher.hidden_size, teacher.num_tokens)
    for i in edit.layers:
      block = dict(params[f"blocks_{i}"])
      if edit.init == "teacher":
        continue
      if loaded is not None:
        try:
          new = loaded[f"blocks_{i}"][edit.site]
        except KeyError:
          raise PlanError(f"stage-1 folder {edit.init} holds no weights for layer {i} {edit.site}.") from None
        if jax.tree.map(np.shape, new) != jax.tree.map(lambda s: s.shape, want):
          raise PlanError(f"stage-1 weights for layer {i} {edit.site} in {edit.init} do not fit {edit.op.name}.")
      else:
        new = init_operator(edit.op, teacher.hidden_size, teacher.num_tokens,
                            jax.random.fold_in(key, 2 * i + (edit.site == "mlp")))
      block[edit.site] = new
      params[f"blocks_{i}"] = block
  return config, params


def init_operator(spec: OpSpec, dim: int, tokens: int, key: jax.Array):
  module = spec.build(dim)
  return jax.jit(module.init)(key, jnp.zeros((1, tokens, dim)))["params"]


def model_flops(config: DiTConfig) -> int:
  """Forward FLOPs per sample: every operator plus embedders, adaLN and the final layer."""
  d, n, p = config.hidden_size, config.num_tokens, config.patch_size
  ops = sum(operator_flops(layer.site(s).name, layer.site(s).config, d, n)
            for layer in config.layers for s in operators.SITES)
  embed = 2 * n * p * p * config.in_channels * d + 2 * (256 * d + d * d)
  adaln = 2 * d * 6 * d * config.depth + 2 * d * 2 * d
  return ops + embed + adaln + 2 * n * d * p * p * config.out_channels


def model_params(config: DiTConfig) -> int:
  from graft_jax.models.dit import init_params
  shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def summary(teacher: DiTConfig, student: DiTConfig) -> dict:
  """Per changed site: operator before/after, params and FLOPs; totals with the paper's dParam and dFLOPs in %."""
  d, n = teacher.hidden_size, teacher.num_tokens
  rows = []
  for i, (a, b) in enumerate(zip(teacher.layers, student.layers)):
    for s in operators.SITES:
      before, after = a.site(s), b.site(s)
      if before != after:
        rows.append({"layer": i, "site": s, "before": before.name, "after": after.name,
                     "params_before": operator_params(before, d, n), "params_after": operator_params(after, d, n),
                     "flops_before": operator_flops(before.name, before.config, d, n),
                     "flops_after": operator_flops(after.name, after.config, d, n)})
  p0, p1 = model_params(teacher), model_params(student)
  f0, f1 = model_flops(teacher), model_flops(student)
  return {"rows": rows, "params_teacher": p0, "params_student": p1, "flops_teacher": f0, "flops_student": f1,
          "dparams_pct": 100.0 * (p1 - p0) / p0, "dflops_pct": 100.0 * (f1 - f0) / f0}


def format_summary(s: dict) -> str:
  lines = ["| layer | site | before | after | params before | params after | GFLOPs before | GFLOPs after |",
           "|---|---|---|---|---|---|---|---|"]
  for r in s["rows"]:
    lines.append(f"| {r['layer']} | {r['site']} | {r['before']} | {r['after']} | {r['params_before']:,} | "
                 f"{r['params_after']:,} | {r['flops_before'] / 1e9:.3f} | {r['flops_after'] / 1e9:.3f} |")
  lines.append(f"\nparams {s['params_teacher']:,} -> {s['params_student']:,} ({s['dparams_pct']:+.2f}%); "
               f"forward FLOPs per sample {s['flops_teacher'] / 1e9:.1f} G -> {s['flops_student'] / 1e9:.1f} G "
               f"({s['dflops_pct']:+.2f}%)")
  return "\n".join(lines)
