"""Train state shared by the trainers: optimizer, EMA, LoRA factors as a tree transform, parameter casting.

A state is a plain dict, so orbax stores it and partition.param_shardings lays it out by path:
  step       int32 scalar, optimizer steps taken
  params     the model's float32 parameters (frozen when LoRA is on)
  lora       LoRA factors, present only when LoRA is on; then they, not `params`, are what trains
  opt_state  optax state of the trained tree
  ema        exponential moving average of the trained tree
  rng        raw uint32 key data (orbax stores arrays, not typed keys); each step folds in its step number
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from graft_jax.train import partition
from graft_jax.train.checkpoint import Checkpointer

State = dict[str, Any]


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Floating leaves cast to `dtype`; integer leaves (step counters, labels) left as they are."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def lr_schedule(config) -> optax.Schedule:
  """Linear warm-up to config.lr over config.warmup_steps, then constant, halved at each of config.lr_milestones."""
  warmup = max(int(config.warmup_steps), 1)
  milestones = tuple(int(m) for m in config.get("lr_milestones", ()))

  def schedule(count):
    # count + 1: the first update already moves the weights (a ramp from 0 would waste the first step).
    ramp = jnp.minimum(1.0, (count + 1) / warmup)
    halvings = sum(jnp.where(count >= m, 1.0, 0.0) for m in milestones)
    return config.lr * ramp * 0.5 ** halvings
  return schedule


def require(config, name: str, ok: Callable[[Any], bool], what: str) -> None:
  """A ValueError of one sentence unless config[name] is a number for which ok(value) holds."""
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    raise ValueError(f"{name} must be {what}, got {value!r}.")


def check_numbers(config) -> None:
  """The fields both trainers read, in range: otherwise one sentence before the run starts, rather than a
  ZeroDivisionError at the first log step (log_every 0, say)."""
  for name in ("batch_size", "log_every", "checkpoint_every"):
    require(config, name, lambda v: v >= 1, "a positive integer")
  for name in ("lr", "warmup_steps", "weight_decay"):
    require(config, name, lambda v: v >= 0, "0 or more")
  require(config, "ema_decay", lambda v: 0 <= v <= 1, "between 0 and 1")


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (torch's defaults but config's weight decay) after global-norm clipping (off when grad_clip <= 0)."""
  clip = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  return optax.chain(*clip, optax.adamw(lr_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
                                        weight_decay=config.weight_decay))


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """DiT's update: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def lora_targets(params: Any, patterns: Sequence[str]) -> list[tuple[str, ...]]:
  """Paths of the 2-D Dense kernels whose "/"-joined path matches any regex in `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(params)
  found = [path for path, leaf in flat.items()
           if path[-1] == "kernel" and leaf.ndim == 2 and any(c.search("/".join(path)) for c in compiled)]
  if not found:
    raise ValueError(f"lora_targets {list(patterns)} match no Dense kernel; kernel paths look like "
                     f"'blocks_0/attn/q/kernel'.")
  return found


def init_lora(params: Any, patterns: Sequence[str], rank: int, key: jax.Array) -> dict[str, Any]:
  """LoRA factors for every targeted kernel W (in, out): a (in, rank) ~ N(0, 1/in), b (rank, out) = 0.

  The tree mirrors the params tree down to the kernel: lora[...]["q"]["kernel"] = {"a": ..., "b": ...}. b = 0 makes
  the adapted model start exactly at the given one; a's fan-in scaling keeps x @ a at the scale of x at any width.
  """
  flat = traverse_util.flatten_dict(params)
  paths = lora_targets(params, patterns)
  factors = {}
  for path, k in zip(paths, jax.random.split(key, len(paths))):
    fan_in, fan_out = flat[path].shape
    factors[path + ("a",)] = jax.random.normal(k, (fan_in, rank), jnp.float32) / math.sqrt(fan_in)
    factors[path + ("b",)] = jnp.zeros((rank, fan_out), jnp.float32)
  return traverse_util.unflatten_dict(factors)


def merge_lora(params: Any, lora: Any, scale: float) -> Any:
  """params with every adapted kernel replaced by W + scale * a @ b (differentiable in both factors)."""
  flat = traverse_util.flatten_dict(params)
  factors = traverse_util.flatten_dict(lora)
  for path in {key[:-1] for key in factors}:
    a, b = factors[path + ("a",)], factors[path + ("b",)]
    # The product is small (in x rank x out); full precision keeps the export equal to the trained model.
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    flat[path] = flat[path] + (scale * delta).astype(flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def lora_scale(config) -> float:
  """alpha / rank; lora_alpha = 0 means alpha = rank (scale 1)."""
  rank, alpha = config.get("lora_rank", 0), config.get("lora_alpha", 0.0)
  return alpha / rank if rank and alpha else 1.0


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, lora: Any = None) -> State:
  """A fresh state; the EMA starts as a copy of the trained tree (DiT's update_ema(decay=0) at start)."""
  trained = params if lora is None else lora
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(trained),
           "ema": jax.tree.map(jnp.copy, trained), "rng": rng}
  if lora is not None:
    state["lora"] = lora
  return state


def trained_key(state: State) -> str:
  return "lora" if "lora" in state else "params"


def trainable(state: State) -> Any:
  """The tree the optimizer updates: the LoRA factors when present, otherwise the parameters."""
  return state[trained_key(state)]


def model_params(state: State, trained: Any, scale: float) -> Any:
  """Full model parameters for a value of the trained tree (the base merged with LoRA factors when present)."""
  return merge_lora(state["params"], trained, scale) if "lora" in state else trained


def export_params(state: State, scale: float, ema: bool = False) -> Any:
  """The model's float32 parameters (from the EMA when `ema`), LoRA merged in: what sampling and export use."""
  trained = state["ema"] if ema else trainable(state)
  if "lora" not in state:
    return trained
  return jax.jit(merge_lora)(state["params"], trained, scale)


def apply_gradients(state: State, grads: Any, optimizer: optax.GradientTransformation, ema_decay: float) -> State:
  """One optimizer update of the trained tree, then the EMA of the updated tree, then step + 1."""
  key = trained_key(state)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state[key])
  trained = optax.apply_updates(state[key], updates)
  return {**state, key: trained, "opt_state": opt_state, "ema": ema_update(state["ema"], trained, ema_decay),
          "step": state["step"] + 1}


def state_builder(config, optimizer: optax.GradientTransformation) -> Callable[[Any], State]:
  """params -> fresh state (with LoRA factors when config.lora_rank > 0), a pure function to jit or eval_shape."""
  lora_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  rank = config.get("lora_rank", 0)

  def build(params):
    lora = init_lora(params, config.lora_targets, rank, lora_key) if rank > 0 else None
    return init_state(params, optimizer, rng, lora)
  return build


def state_shardings(config, mesh: Mesh, tree: Any) -> Any:
  """FSDP layout of any state-like tree; leaves under config.fsdp_min_size elements stay replicated."""
  return partition.param_shardings(mesh, tree, min_size=config.fsdp_min_size)


def create_state(config, params: Any, mesh: Mesh,
                 optimizer: optax.GradientTransformation) -> tuple[State, Any]:
  """(fresh state, its shardings) on `mesh`, every leaf created directly in its shard."""
  build = state_builder(config, optimizer)
  params = jax.device_put(params, state_shardings(config, mesh, params))
  shardings = state_shardings(config, mesh, jax.eval_shape(build, params))
  return jax.jit(build, out_shardings=shardings)(params), shardings


def create_or_restore(config, params: Any, mesh: Mesh, checkpointer: Checkpointer,
                      optimizer: optax.GradientTransformation) -> tuple[State, Any, dict[str, Any] | None]:
  """(state, shardings, checkpoint extra): the latest checkpoint laid out on `mesh` when there is one (extra is then
  its JSON metadata), else create_state's fresh state (extra None)."""
  if checkpointer.latest_step() is None:
    return *create_state(config, params, mesh, optimizer), None
  abstract = jax.eval_shape(state_builder(config, optimizer), params)
  shardings = state_shardings(config, mesh, abstract)
  state, extra = checkpointer.restore(target_state=abstract, target_shardings=shardings)
  return state, shardings, extra
