"""Stage 1: activation distillation. Every scion learns its own site from the teacher, all sites in one jitted step.

For each grafted (layer, site), the scion maps the teacher operator's input (after adaLN modulation) to the teacher
operator's output (before the gate). Inputs always come from the teacher, never from other scions (teacher forcing),
so the sites are independent problems that share one teacher forward per batch. Data are noised latents
z_t = q_sample(x0, t, noise) with t ~ U{0..999} and the true conditioning: DiT's labels, or a PixArt teacher's caption
embeddings and mask (graft_jax.train.conditioning), never dropped.

A parallel pair (site "pair", depth to width) is a site too: the whole pair (both blocks and the merge) maps the
teacher's input of its first block, with the teacher's conditioning, to the residual update of the teacher's two
blocks in sequence; prediction and target are updates (output minus input), so the relative error is not swamped
by the residual stream.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from graft_jax import hosts
from graft_jax.diffusion import make_diffusion
from graft_jax.models.config import DiTConfig, check_compute_dtype
from graft_jax.models.dit import PAIR, DiT, ParallelPair, capture
from graft_jax.train import conditioning, metrics, partition, state as train_state
from graft_jax.train.checkpoint import Checkpointer

LOSSES = ("l1", "l2", "huber")


def default_config() -> ml_collections.ConfigDict:
  """The paper's stage 1: AdamW lr 1e-4, batch 64, 200 epochs over 8k samples; L1 for attention, L2 for MLPs.

  `schedule="released"` switches to the released code's recipe: lr 5e-4 halved at epochs 50/100/150, clip 10.
  """
  return ml_collections.ConfigDict(dict(
      epochs=200, steps=0,  # steps > 0 overrides epochs
      batch_size=64, schedule="paper", lr=1e-4, warmup_steps=0, grad_clip=0.0, weight_decay=0.0, lr_milestones=(),
      loss=dict(attn="l1", mlp="l2", pair="l1"), huber_delta=1.0, regress_gated=False,
      ema_decay=0.0, compute_dtype="float32", seed=0, mesh=dict(data=-1, fsdp=1), fsdp_min_size=2**14,
      log_every=50, checkpoint_every=1000))


def resolve_schedule(config, steps_per_epoch: int) -> ml_collections.ConfigDict:
  """The optimizer fields for config.schedule ("paper" or "released"), and the total step count."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.schedule == "released":
    c.lr, c.grad_clip = 5e-4, 10.0
    c.lr_milestones = tuple(e * steps_per_epoch for e in (50, 100, 150))
  elif c.schedule != "paper":
    raise ValueError(f"stage-1 schedule must be 'paper' or 'released', got {c.schedule!r}.")
  if c.steps <= 0:
    c.steps = c.epochs * steps_per_epoch
  return c


def check_config(config) -> None:
  """A ValueError of one sentence for a setting out of range: run_distill's first step (on the resolved config),
  and the pipeline's for a listed stage before any stage runs (on the config as written)."""
  train_state.require(config, "steps", lambda v: v >= 0, "0 (use epochs) or more")
  if config.steps == 0:
    train_state.require(config, "epochs", lambda v: v >= 1, "a positive integer")
  resolve_schedule(config, 1)  # its schedule names
  for site, kind in config.loss.items():
    if kind not in LOSSES:
      raise ValueError(f"stage-1 loss.{site} must be one of {LOSSES}, got {kind!r}.")
  train_state.require(config, "huber_delta", lambda v: v > 0, "positive")
  check_compute_dtype(config.compute_dtype)
  train_state.check_numbers(config)


def site_loss(pred: jax.Array, target: jax.Array, kind: str, delta: float = 1.0) -> jax.Array:
  """Mean over every element, in float32."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l1":
    return jnp.abs(diff).mean()
  if kind == "l2":
    return jnp.square(diff).mean()
  if kind == "huber":
    a = jnp.abs(diff)
    return jnp.where(a <= delta, 0.5 * jnp.square(diff), delta * (a - 0.5 * delta)).mean()
  raise ValueError(f"stage-1 loss must be one of {LOSSES}, got {kind!r}.")


def site_name(layer: int, site: str) -> str:
  return f"blocks_{layer}/{site}"


def scion_params(params, sites: Sequence[tuple[int, str]]) -> dict:
  """The trained tree of stage 1: {"blocks_i": {site: params}} for the grafted sites only; a pair's whole layer
  {"blocks_i": {"block_0", "block_1", "merge"}}."""
  out: dict = {}
  for i, s in sites:
    if s == PAIR:
      out[f"blocks_{i}"] = params[f"blocks_{i}"]
    else:
      out.setdefault(f"blocks_{i}", {})[s] = params[f"blocks_{i}"][s]
  return out


def noised_batch(x0, key):
  """(z_t, t) with t ~ U{0..999}: what the teacher sees during DiT training and sampling. Noised in float32 and
  returned in x0's dtype, the compute dtype: the schedule's float32 coefficients would otherwise promote a bf16
  batch, and with it the whole teacher forward and every scion, to float32 (half the speed on a GPU)."""
  t_key, n_key = jax.random.split(key)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, 1000)
  noise = jax.random.normal(n_key, x0.shape, jnp.float32)
  return make_diffusion().q_sample(x0.astype(jnp.float32), t, noise).astype(x0.dtype), t


def teacher_site(student: DiTConfig, layer: int, site: str) -> tuple[int, str]:
  """Where a student site learns from: a pair from the teacher's blocks it replaces (the teacher is sequential),
  an operator from the same layer (an operator plan keeps the numbering)."""
  return (student.first_block(layer), site) if site == PAIR else (layer, site)


def site_outputs(teacher: DiT, student: DiTConfig, teacher_params, scions, x, t, cond, sites, regress_gated: bool):
  """{site name: (scion prediction, teacher target)} from one teacher forward on (x, t, *cond); `cond` is DiT's
  labels or a tuple such as PixArt's (caption, mask)."""
  where = {teacher_site(student, i, s): (i, s) for i, s in sites}
  _, acts = capture(teacher, teacher_params, x, t, cond, list(where))
  out = {}
  for key, (inp, target, context) in acts.items():
    i, s = where[key]
    inp, target = jax.lax.stop_gradient(inp), jax.lax.stop_gradient(target)
    if s == PAIR:
      pair = ParallelPair(student.hidden_size, student.layers[i], update_only=True)
      pred = pair.apply({"params": scions[f"blocks_{i}"]}, inp, jax.lax.stop_gradient(context))
    else:
      module = student.layers[i].site(s).build(student.hidden_size)
      pred = module.apply({"params": scions[f"blocks_{i}"][s]}, inp)
      if regress_gated:
        pred, target = context * pred, context * target
    out[site_name(i, s)] = (pred, target)
  return out


def make_loss_fn(teacher: DiT, student: DiTConfig, sites, config):
  """scions, teacher params, batch, key -> (total loss, {site: loss}); the total is the sum of independent losses,
  so each scion's gradient is that of its own loss."""
  def loss_fn(scions, teacher_params, batch, key):
    z_t, t = noised_batch(batch["x"], key)
    outs = site_outputs(teacher, student, teacher_params, scions, z_t, t, conditioning.cond_args(teacher, batch),
                        sites, config.regress_gated)
    losses = {name: site_loss(p, q, config.loss[name.rsplit("/", 1)[1]], config.huber_delta)
              for name, (p, q) in outs.items()}
    return sum(losses.values()), losses
  return loss_fn


def relative_errors(teacher: DiT, student: DiTConfig, teacher_params, scions, batch, key, sites, regress_gated):
  """{site: ||pred - target|| / ||target||} on one batch: the held-out metric that is comparable across sites."""
  z_t, t = noised_batch(batch["x"], key)
  outs = site_outputs(teacher, student, teacher_params, scions, z_t, t, conditioning.cond_args(teacher, batch), sites,
                      regress_gated)
  return {name: jnp.linalg.norm((p - q).astype(jnp.float32)) / jnp.linalg.norm(q.astype(jnp.float32))
          for name, (p, q) in outs.items()}


def save_scions(path, scions, results: dict | None = None) -> pathlib.Path:
  """A stage-1 export: the scion tree (orbax) and a JSON of per-site results; written atomically."""
  out = pathlib.Path(path).absolute()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    with hosts.local_checkpointer() as ckptr:
      ckptr.save(tmp / "scions", jax.tree.map(np.asarray, scions))
    (tmp / "results.json").write_text(json.dumps(results or {}, indent=1))
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def load_scions(path) -> Any:
  scions = pathlib.Path(path).absolute() / "scions"
  if not scions.exists():
    raise FileNotFoundError(f"{path} is not a stage-1 export (no scions/ inside).")
  with hosts.local_checkpointer() as ckptr:
    return ckptr.restore(scions)


def run_distill(config, teacher: DiT, teacher_params, student: DiTConfig, student_params, sites, data, heldout,
                workdir, mesh=None) -> tuple[Any, dict]:
  """Trains every scion of `sites` (its start: `student_params`) for config.steps steps; resumes from
  workdir/checkpoints. `data` is a DataSource of {"x", "y"} batches ({"x", "caption", "mask"} for a PixArt
  teacher); `heldout` a list of such batches.
  Returns (scions, {site: held-out relative error}), and writes metrics under workdir. `mesh` defaults to the
  one config.mesh describes over all devices."""
  check_config(config)
  workdir = pathlib.Path(workdir)
  mesh = partition.make_mesh(config.mesh) if mesh is None else mesh
  partition.check_batch(mesh, config.batch_size)
  optimizer = train_state.make_optimizer(config)
  loss_fn = make_loss_fn(teacher, student, sites, config)
  dtype = jnp.dtype(config.compute_dtype)
  teacher_params = jax.device_put(train_state.cast_floating(teacher_params, dtype),
                                  partition.param_shardings(mesh, teacher_params))

  def step_fn(state, batch, teacher_params):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    batch = conditioning.cast_batch(teacher, batch, dtype)
    compute = lambda p: loss_fn(train_state.cast_floating(p, dtype), teacher_params, batch, key)
    (total, losses), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
    new_state = train_state.apply_gradients(state, grads, optimizer, config.ema_decay)
    return new_state, {"loss": total, **{f"loss/{k}": v for k, v in losses.items()},
                       "grad_norm": optax.tree.norm(grads)}

  with Checkpointer(workdir / "checkpoints", save_interval_steps=config.checkpoint_every) as ckpt:
    state, shardings, extra = train_state.create_or_restore(config, scion_params(student_params, sites), mesh, ckpt,
                                                            optimizer)
    if extra is not None:
      data.restore(extra["data"])
    step = partition.jit_step(step_fn, shardings, mesh, extra_shardings=(partition.param_shardings(mesh,
                                                                                                  teacher_params),))
    with metrics.Reporter(workdir / "metrics", config.steps, config.log_every, "stage 1", ckpt) as reporter:
      state = metrics.train_loop(step, state, data, mesh=mesh, reporter=reporter, checkpointer=ckpt,
                                 total_steps=config.steps, checkpoint_every=config.checkpoint_every, stage="distill",
                                 args=(teacher_params,))
  scions = hosts.fetch(state["params"])
  # The teacher is an argument, not a closure: a jit may not close over arrays that span other hosts' devices. The
  # held-out batches are whole on every process, so they go in replicated, as host arrays (only those may be put on
  # a multi-host mesh); so does the batch number that seeds the noise.
  evaluate = jax.jit(lambda tp, s, b, n: relative_errors(teacher, student, tp, s, b, jax.random.key(1000 + n), sites,
                                                         config.regress_gated))
  on_mesh = lambda tree: jax.device_put(tree, partition.replicated(mesh))
  errors = [jax.device_get(evaluate(teacher_params, on_mesh(scions), on_mesh(b), on_mesh(np.int32(n))))
            for n, b in enumerate(heldout)]
  return scions, {k: float(np.mean([e[k] for e in errors])) for k in errors[0]}

