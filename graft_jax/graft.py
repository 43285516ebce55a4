"""Graft plans and parameter-tree surgery: (teacher config, teacher params, plan) -> (student config, params).

A plan is a list of edits. An operator edit (`kind` "operator", the default) is `{site, layers, operator, config,
init}`:
  site      "attn" (sequence mixer) or "mlp" (channel mixer)
  layers    a list of 0-based block indices or a pattern: "odd" (1, 3, ...), "even", "three_of_four" (all but
            0, 4, 8, ...), "all", "first:K", "last:K"
  operator  a registry name (graft_jax.operators.names()); config its options
  init      "fresh" (the operator's default init), "teacher" (keep the teacher's weights; only when the operator
            type and shapes are unchanged: self-grafting controls), or the path of a stage-1 export
A depth-to-width edit `{kind: "parallel_pairs", layers, init}` turns layers (i, i + 1) into one parallel pair
(graft_jax.models.dit.ParallelPair), so the student has one layer fewer per pair:
  layers    "all" (0+1, 2+3, ...), a list of [start, end) ranges of even length, or a list of pair-start indices
  init      "teacher" (each block keeps its own weights, the merge starts as [I; I]: the sum of the two updates)
            or the path of a stage-1 export
A plan with pairs swaps no operators, and its teacher is sequential, so a plan's layer numbers are always the
teacher's. Everything is validated before any weight is touched; errors are one sentence (PlanError).
A PixArt teacher (PixArtConfig) takes operator edits the same way, at its blocks' self-attention ("attn") and MLP
sites; parallel pairs are for DiT only.
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
from graft_jax.models.config import DiTConfig, OpSpec, ParallelPairSpec, PixArtConfig
from graft_jax.models.dit import PAIR, merge_init

INITS = ("fresh", "teacher")
PAIRS = "parallel_pairs"
KINDS = ("operator", PAIRS)


class PlanError(ValueError):
  """An invalid graft plan; the message is one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class Edit:
  """An operator edit (site "attn" or "mlp"), or parallel pairs (site "pair", layers = each pair's first layer)."""
  site: str
  layers: tuple[int, ...]
  op: OpSpec | None
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


def shapes(tree):
  """The tree's leaf shapes (arrays or jax.ShapeDtypeStruct alike), for comparing parameter trees."""
  return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def operator_params(spec: OpSpec, dim: int, tokens: int) -> int:
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(operator_shapes(spec, dim, tokens)))


def parse_pairs(spec: Any, depth: int) -> tuple[int, ...]:
  """The first layer of every pair, sorted: from "all", [start, end) ranges or pair starts."""
  if spec == "all":
    if depth % 2:
      raise PlanError(f"pairing 'all' layers needs an even depth, not {depth}; give [start, end) ranges instead.")
    return tuple(range(0, depth, 2))
  usage = f"pair layers must be 'all', a list of [start, end) ranges or of pair starts, got {spec!r}."
  if isinstance(spec, str) or not spec:
    raise PlanError(usage)
  try:
    if all(isinstance(r, (list, tuple)) for r in spec):
      ranges = [(int(start), int(end)) for start, end in spec]
    else:  # a pair start i is the range [i, i + 2)
      ranges = [(int(i), int(i) + 2) for i in spec]
  except (TypeError, ValueError):
    raise PlanError(usage) from None
  odd = [(start, end) for start, end in ranges if end <= start or (end - start) % 2]
  if odd:
    raise PlanError(f"pair range [{odd[0][0]}, {odd[0][1]}) must hold an even, positive number of layers.")
  starts = sorted(i for start, end in ranges for i in range(start, end, 2))
  bad = [i for i in starts if not 0 <= i < depth - 1]
  if bad:
    raise PlanError(f"pairs starting at {bad} do not fit a model of depth {depth} (a pair starts at 0 to {depth - 2}).")
  close = [b for a, b in zip(starts, starts[1:]) if b - a < 2]
  if close:
    raise PlanError(f"the pair starting at layer {close[0]} overlaps the one before it.")
  return tuple(starts)


def parse_plan(entries: Sequence[Mapping[str, Any]], teacher: DiTConfig) -> tuple[Edit, ...]:
  edits, seen = [], {}
  for n, entry in enumerate(entries):
    entry = dict(entry)
    where = f"graft plan entry {n}"
    kind = entry.pop("kind", "operator")
    if kind not in KINDS:
      raise PlanError(f"{where}: kind must be one of {KINDS}, got {kind!r}.")
    edit = (pair_edit if kind == PAIRS else operator_edit)(entry, teacher, where)
    # A pair rewrites both sites of both its layers.
    touched = ([(j, s) for i in edit.layers for j in (i, i + 1) for s in operators.SITES] if edit.site == PAIR
               else [(i, edit.site) for i in edit.layers])
    for i, site in touched:
      if (i, site) in seen:
        raise PlanError(f"{where}: layer {i} {site} is already edited by entry {seen[i, site]}.")
      seen[i, site] = n
    edits.append(edit)
  if len({e.site == PAIR for e in edits}) > 1:
    raise PlanError("a plan with parallel_pairs cannot also swap operators; graft them in separate runs.")
  return tuple(edits)


def pair_edit(entry: dict, teacher: DiTConfig, where: str) -> Edit:
  unknown = set(entry) - {"layers", "init"}
  if unknown:
    raise PlanError(f"{where} has unknown field(s) {sorted(unknown)}.")
  if not isinstance(teacher, DiTConfig):
    raise PlanError(f"{where}: parallel_pairs is a DiT edit; {teacher.TITLE} teacher can only swap operators.")
  if teacher.num_pairs:
    raise PlanError(f"{where}: parallel_pairs needs a sequential teacher, and this one already has parallel pairs.")
  init = str(entry.get("init", "teacher"))
  if init != "teacher" and not pathlib.Path(init).exists():
    raise PlanError(f"{where}: init of parallel pairs must be 'teacher' or an existing stage-1 folder; {init!r} is "
                    f"neither.")
  return Edit(PAIR, parse_pairs(entry.get("layers", "all"), teacher.depth), None, init)


def operator_edit(entry: dict, teacher: DiTConfig, where: str) -> Edit:
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
  pairs = [i for i in layers if isinstance(teacher.layers[i], ParallelPairSpec)]
  if pairs:
    raise PlanError(f"{where}: layer {pairs[0]} is a parallel pair, whose operators a plan cannot swap.")
  for i in layers:
    before = teacher.layers[i].site(site)
    if init == "teacher" and (before.name != op.name or shapes(operator_shapes(
        before, teacher.hidden_size, teacher.num_tokens)) != shapes(operator_shapes(op, teacher.hidden_size,
                                                                                      teacher.num_tokens))):
      raise PlanError(f"{where}: init 'teacher' needs the teacher's operator with the same shapes at layer {i} "
                      f"{site}, but the teacher has {before.name} there.")
  return Edit(site, layers, op, init)


def pair_starts(edits: Sequence[Edit]) -> list[int]:
  return sorted(i for e in edits if e.site == PAIR for i in e.layers)


def layer_groups(depth: int, starts: Sequence[int]) -> list[tuple[int, ...]]:
  """The teacher layers behind each student layer: (i, i + 1) for a pair starting at i, (i,) otherwise."""
  groups, i = [], 0
  while i < depth:
    groups.append((i, i + 1) if i in starts else (i,))
    i += len(groups[-1])
  return groups


def student_config(teacher: DiTConfig, edits: Sequence[Edit]) -> DiTConfig:
  config = teacher
  for edit in edits:
    for i in edit.layers if edit.site != PAIR else ():
      config = config.with_layer(i, edit.site, edit.op)
  groups = layer_groups(teacher.depth, pair_starts(edits))
  return config.replace(layers=tuple(ParallelPairSpec(*(config.layers[j] for j in g)) if len(g) == 2
                                     else config.layers[g[0]] for g in groups))


def sites(edits: Sequence[Edit]) -> list[tuple[int, str]]:
  """The grafted (student layer, site) pairs in layer order; site "pair" for a parallel pair."""
  starts = pair_starts(edits)
  # Every earlier pair moves a layer one place forward in the student.
  return sorted((i - starts.index(i) if e.site == PAIR else i, e.site) for e in edits for i in e.layers)


def _stage1_params(path: str):
  from graft_jax.train.distill import load_scions  # stage 1 writes the format it reads
  return load_scions(path)


def graft(teacher: DiTConfig, teacher_params, edits: Sequence[Edit], key: jax.Array):
  """(student config, student params): untouched subtrees are the teacher's arrays; each grafted site gets fresh
  params (its own key, folded from `key` by layer), the teacher's (init "teacher") or stage-1 weights (a path).
  Parallel pairs: see pair_params."""
  config = student_config(teacher, edits)
  if pair_starts(edits):
    return config, pair_params(teacher, teacher_params, edits)
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
        if shapes(new) != shapes(want):
          raise PlanError(f"stage-1 weights for layer {i} {edit.site} in {edit.init} do not fit {edit.op.name}.")
      else:
        new = init_operator(edit.op, teacher.hidden_size, teacher.num_tokens,
                            jax.random.fold_in(key, 2 * i + (edit.site == "mlp")))
      block[edit.site] = new
      params[f"blocks_{i}"] = block
  return config, params


def pair_params(teacher: DiTConfig, teacher_params, edits: Sequence[Edit]) -> dict:
  """The teacher's tree with its blocks renumbered into the student's layers: a pair holds its two teacher blocks
  as block_0 and block_1 and the merge at [I; I], zero bias (init "teacher"), or its whole stage-1 subtree."""
  d = teacher.hidden_size
  # Device arrays, as the operators' fresh weights are: a jitted call copies a host (numpy) leaf in on every call
  # (DiT-XL/2's 14 merges: 74 MB in bf16, 1.5 ms of every batch-2 forward on an H200).
  merge = {"kernel": merge_init(None, (2 * d, d)), "bias": jnp.zeros((d,), jnp.float32)}
  params = {k: v for k, v in teacher_params.items() if not k.startswith("blocks_")}
  inits = {i: e.init for e in edits for i in e.layers}
  loaded = {init: _stage1_params(init) for init in set(inits.values()) if init != "teacher"}
  for n, group in enumerate(layer_groups(teacher.depth, pair_starts(edits))):
    blocks = [teacher_params[f"blocks_{i}"] for i in group]
    if len(group) == 1:
      params[f"blocks_{n}"] = blocks[0]
      continue
    pair = {"block_0": blocks[0], "block_1": blocks[1], "merge": merge}
    init = inits[group[0]]
    if init != "teacher":
      new = loaded[init].get(f"blocks_{n}")
      if new is None or shapes(new) != shapes(pair):
        raise PlanError(f"stage-1 folder {init} holds no parallel pair fitting layer {n} (teacher layers {group}).")
      pair = new
    params[f"blocks_{n}"] = pair
  return params


def init_operator(spec: OpSpec, dim: int, tokens: int, key: jax.Array):
  module = spec.build(dim)
  return jax.jit(module.init)(key, jnp.zeros((1, tokens, dim)))["params"]


def model_flops(config: DiTConfig) -> int:
  """Forward FLOPs per sample: every operator plus embedders, adaLN, parallel-pair merges and the final layer."""
  d, n, p = config.hidden_size, config.num_tokens, config.patch_size
  ops = sum(block.site(s).flops(d, n) for block in config.blocks for s in operators.SITES)
  embed = 2 * n * p * p * config.in_channels * d + 2 * (256 * d + d * d)
  if isinstance(config, PixArtConfig):
    return ops + embed + pixart_flops(config) + 2 * n * d * p * p * config.out_channels
  adaln = 2 * d * 6 * d * len(config.blocks) + 2 * d * 2 * d
  merges = config.num_pairs * 2 * n * 2 * d * d
  return ops + embed + adaln + merges + 2 * n * d * p * p * config.out_channels


def pixart_flops(config: PixArtConfig) -> int:
  """What PixArt adds to the shared parts: the one t_block, the caption projection, and per block the
  cross-attention to the caption (q and output projections on image tokens, k and v on caption tokens)."""
  d, n, length = config.hidden_size, config.num_tokens, config.caption_length
  caption = 2 * length * (config.caption_channels * d + d * d)
  cross = 2 * n * d * d * 2 + 2 * length * d * 2 * d + 2 * 2 * n * length * d
  return 2 * d * 6 * d + caption + cross * config.depth


def model_params(config: DiTConfig | PixArtConfig) -> int:
  if isinstance(config, PixArtConfig):
    from graft_jax.models.pixart import init_params
  else:
    from graft_jax.models.dit import init_params
  shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def summary(teacher: DiTConfig, student: DiTConfig) -> dict:
  """Per changed site: operator before/after, params and FLOPs; per new parallel pair (layer "i+j", teacher
  numbering): its two blocks in sequence against the pair with its merge. Totals with the paper's dParam and
  dFLOPs in %."""
  d, n = teacher.hidden_size, teacher.num_tokens
  rows, i = [], 0
  for after in student.layers:
    before = teacher.layers[i]
    if isinstance(after, ParallelPairSpec) and not isinstance(before, ParallelPairSpec):
      rows.append(_pair_row(i, after, d, n))
      i += 2
      continue
    for s in operators.SITES if before != after else ():
      a, b = before.site(s), after.site(s)
      if a != b:
        rows.append({"layer": i, "site": s, "before": a.name, "after": b.name,
                     "params_before": operator_params(a, d, n), "params_after": operator_params(b, d, n),
                     "flops_before": a.flops(d, n), "flops_after": b.flops(d, n)})
    i += 1
  p0, p1 = model_params(teacher), model_params(student)
  f0, f1 = model_flops(teacher), model_flops(student)
  return {"rows": rows, "params_teacher": p0, "params_student": p1, "flops_teacher": f0, "flops_student": f1,
          "dparams_pct": 100.0 * (p1 - p0) / p0, "dflops_pct": 100.0 * (f1 - f0) / f0}


def _pair_row(first: int, pair: ParallelPairSpec, d: int, n: int) -> dict:
  """Two blocks (operators and adaLN) in sequence, then the same in parallel plus the (2D -> D) merge."""
  params = sum(operator_params(b.site(s), d, n) for b in pair.blocks for s in operators.SITES) + 2 * (6 * d * d + 6 * d)
  flops = sum(b.site(s).flops(d, n) for b in pair.blocks for s in operators.SITES)
  flops += 2 * 2 * d * 6 * d
  return {"layer": f"{first}+{first + 1}", "site": "pair", "before": "sequential", "after": "parallel_pair",
          "params_before": params, "params_after": params + 2 * d * d + d,
          "flops_before": flops, "flops_after": flops + 2 * n * 2 * d * d}


def format_summary(s: dict) -> str:
  lines = ["| layer | site | before | after | params before | params after | GFLOPs before | GFLOPs after |",
           "|---|---|---|---|---|---|---|---|"]
  for r in s["rows"]:
    lines.append(f"| {r['layer']} | {r['site']} | {r['before']} | {r['after']} | {r['params_before']:,} | "
                 f"{r['params_after']:,} | {r['flops_before'] / 1e9:.3f} | {r['flops_after'] / 1e9:.3f} |")
  lines.append(f"\nparams {s['params_teacher']:,} -> {s['params_student']:,} ({s['dparams_pct']:+.2f}%); "
               f"forward FLOPs per sample {s['flops_teacher'] / 1e9:.4g} G -> {s['flops_student'] / 1e9:.4g} G "
               f"({s['dflops_pct']:+.2f}%)")
  return "\n".join(lines)
