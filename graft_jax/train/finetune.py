"""Stage 2: end-to-end fine-tuning of a (grafted) DiT or PixArt model.

The loss is DiT's diffusion loss (eps MSE + VLB for the learned variance), a match to the frozen teacher's output on
the same noisy input (all 2C channels), or their weighted sum. One jitted, sharded, donated step does the update,
the EMA, label dropout (PixArt: caption dropout to its learned null caption) and the bfloat16 cast of the float32
parameters; LoRA, when on, trains only the factors. Batches carry DiT's labels or PixArt's captions
(graft_jax.train.conditioning).
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from graft_jax.diffusion import Diffusion, ModelFn, make_diffusion
from graft_jax.models.config import check_compute_dtype
from graft_jax.train import conditioning, partition
from graft_jax.train.checkpoint import Checkpointer
from graft_jax.train.metrics import DataSource, Reporter, train_loop
from graft_jax.train.state import (State, apply_gradients, cast_floating, check_numbers, create_or_restore,
                                   export_params, lora_scale, lr_schedule, make_optimizer, model_params, require,
                                   state_shardings, trainable)

LOSSES = ("diffusion", "teacher", "diffusion+teacher")


def default_config() -> ml_collections.ConfigDict:
  """The paper's stage-2 settings for DiT-XL/2 (10% of ImageNet, 50k steps, batch 256); configs override fields."""
  return ml_collections.ConfigDict({
      "steps": 50_000,
      "batch_size": 256,             # global, over all processes
      "lr": 1e-4,
      "warmup_steps": 1000,          # the paper's; the released code used 4000
      "lr_milestones": (),           # steps where the lr halves (depth-to-width used (75_000, 150_000))
      "grad_clip": 10.0,             # global norm; 0 turns clipping off
      "weight_decay": 0.0,
      "ema_decay": 0.9999,
      "loss": "diffusion",           # one of LOSSES
      "teacher_weight": 1.0,         # multiplies the teacher term
      "compute_dtype": "bfloat16",   # parameters stay float32
      "lora_rank": 0,                # 0: full fine-tuning
      "lora_alpha": 0.0,             # LoRA scale alpha / rank; 0 means alpha = rank
      "lora_targets": (r"attn/(q|k|v|proj)/",),  # regexes on Dense kernel paths such as blocks_3/attn/q/kernel
      "log_every": 100,
      "checkpoint_every": 1000,
      "keep_checkpoints": 3,
      "seed": 0,
      "mesh": {"data": -1, "fsdp": 1},
      "fsdp_min_size": 2**14,        # leaves with fewer elements are replicated rather than sharded
  })


def check_config(config) -> None:
  """A ValueError of one sentence for a setting out of range: run_finetune's first step, and the pipeline's for a
  listed stage before any stage runs."""
  if config.loss not in LOSSES:
    raise ValueError(f"finetune loss {config.loss!r} is unknown; use one of {LOSSES}.")
  check_compute_dtype(config.compute_dtype)
  for name in ("steps", "keep_checkpoints"):
    require(config, name, lambda v: v >= 1, "a positive integer")
  require(config, "lora_rank", lambda v: v >= 0, "0 (off) or more")
  check_numbers(config)


def diffusion_for(model: nn.Module) -> Diffusion:
  """DiT's 1000-step diffusion; a model without learned variance gets ADM's fixed-large variance, as in DiT."""
  return make_diffusion(variance="learned_range" if model.config.learn_sigma else "fixed_large")


def finetune_losses(config, diffusion: Diffusion, student_fn: ModelFn, teacher_fn: ModelFn | None,
                    x0: jax.Array, t: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
  """Batch means: "loss" (what is minimised) and its terms "mse" and "vb" (diffusion) and "teacher_mse"."""
  terms = config.loss.split("+")
  x_t = diffusion.q_sample(x0, t, noise)
  out = diffusion.model_output(student_fn, x_t, t)
  metrics, loss = {}, 0.0
  if "diffusion" in terms:
    # training_losses re-derives this x_t from (x0, t, noise); giving it the output already computed there lets the
    # teacher term share the student's one forward pass.
    per_example = diffusion.training_losses(lambda *_: out, x0, t, noise)
    metrics |= {"mse": per_example["mse"].mean(), "vb": per_example["vb"].mean()}
    loss = per_example["loss"].mean()
  if "teacher" in terms:
    target = jax.lax.stop_gradient(diffusion.model_output(teacher_fn, x_t, t))
    metrics["teacher_mse"] = jnp.mean(jnp.square(out - target))
    loss = loss + config.teacher_weight * metrics["teacher_mse"]
  return {"loss": loss, **metrics}


def model_fn(model: nn.Module, params: Any, cond: Any, dropout_key: jax.Array, dtype: Any) -> ModelFn:
  """(x, t) -> float32 output of the model in training mode, its input cast to the compute dtype. `cond` is the
  batch (labels "y", or "caption" and "mask") as conditioning.cast_batch gives it."""
  def fn(x, t):
    out = conditioning.forward(model, params, x.astype(dtype), t, cond, train=True,
                               rngs={"label_dropout": dropout_key})
    return out.astype(jnp.float32)
  return fn


def make_train_step(config, model: nn.Module, diffusion: Diffusion, optimizer: optax.GradientTransformation,
                    teacher_model: nn.Module | None = None) -> Callable[..., tuple[State, dict[str, jax.Array]]]:
  """step(state, batch[, teacher_params]) -> (state, metrics); batch = {"x": (B, H, W, C), "y": (B,)}, or for PixArt
  {"x", "caption": (B, L, C_text), "mask": (B, L)}.

  teacher_params are expected already in the compute dtype (see place_teacher). Metrics: the loss terms, grad_norm
  (before clipping) and lr; `param_norm` is the trainer's, at log steps only.
  """
  dtype = jnp.dtype(config.compute_dtype)
  scale = lora_scale(config)
  schedule = lr_schedule(config)

  def train_step(state, batch, teacher_params=None):
    t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), 3)
    x0 = batch["x"].astype(jnp.float32)
    t = jax.random.randint(t_key, x0.shape[:1], 0, diffusion.num_steps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    cond = conditioning.cast_batch(model, batch, dtype)
    # The teacher gets the student's dropout key, so both models drop the same labels (or captions).
    teacher_fn = (None if teacher_model is None else
                  model_fn(teacher_model, teacher_params, cond, dropout_key, dtype))

    def loss_fn(trained):
      params = cast_floating(model_params(state, trained, scale), dtype)
      student_fn = model_fn(model, params, cond, dropout_key, dtype)
      metrics = finetune_losses(config, diffusion, student_fn, teacher_fn, x0, t, noise)
      return metrics["loss"], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable(state))
    new_state = apply_gradients(state, grads, optimizer, config.ema_decay)
    return new_state, {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
  return train_step


@jax.jit
def param_norm(state: State) -> dict[str, jax.Array]:
  """The norm of the trained tree (the LoRA factors when LoRA is on), logged at log steps (`train_loop`)."""
  return {"param_norm": optax.tree.norm(trainable(state))}


def place_teacher(config, params: Any, mesh: Mesh) -> tuple[Any, Any]:
  """The frozen teacher's parameters cast once to the compute dtype and FSDP-sharded; (params, shardings)."""
  dtype = jnp.dtype(config.compute_dtype)
  params = jax.device_put(params, state_shardings(config, mesh, params))
  shardings = state_shardings(config, mesh, jax.eval_shape(lambda p: cast_floating(p, dtype), params))
  return jax.jit(lambda p: cast_floating(p, dtype), out_shardings=shardings)(params), shardings


def run_finetune(config, model: nn.Module, params: Any, data: DataSource, workdir: str | pathlib.Path,
                 teacher: tuple[nn.Module, Any] | None = None, mesh: Mesh | None = None) -> dict[str, Any]:
  """Fine-tunes `params` of `model` for config.steps steps, resuming from <workdir>/finetune/checkpoints if any.

  `data` yields this process's rows of each global batch and can save/restore its position; `teacher` is
  (model, params), needed by the teacher loss. Metrics go to <workdir>/finetune/metrics. Returns {"params", "ema"}
  (float32, LoRA merged), "step" and the raw train "state".
  """
  check_config(config)
  uses_teacher = "teacher" in config.loss
  if uses_teacher and teacher is None:
    raise ValueError(f"finetune loss {config.loss!r} needs the teacher: pass teacher=(model, params).")
  if teacher is not None and not uses_teacher:
    logging.warning("finetune loss is %r: the teacher given is not used.", config.loss)
  mesh = partition.make_mesh(config.mesh) if mesh is None else mesh
  partition.check_batch(mesh, config.batch_size)
  optimizer = make_optimizer(config)
  teacher_model, args, extra_shardings = None, (), ()
  if uses_teacher:
    teacher_model, teacher_params = teacher
    teacher_params, teacher_shardings = place_teacher(config, teacher_params, mesh)
    args, extra_shardings = (teacher_params,), (teacher_shardings,)
  root = pathlib.Path(workdir).absolute() / "finetune"
  with Checkpointer(root / "checkpoints", max_to_keep=config.keep_checkpoints) as checkpointer, \
       Reporter(root / "metrics", config.steps, config.log_every, "finetune", checkpointer) as reporter:
    state, shardings, extra = create_or_restore(config, params, mesh, checkpointer, optimizer)
    if extra is not None:
      data.restore(extra["data"])
      logging.info("finetune resumes at step %d from %s.", int(state["step"]), checkpointer.directory)
    step_fn = partition.jit_step(make_train_step(config, model, diffusion_for(model), optimizer, teacher_model),
                                 shardings, mesh, extra_shardings=extra_shardings)
    state = train_loop(step_fn, state, data, mesh=mesh, reporter=reporter, checkpointer=checkpointer,
                       total_steps=config.steps, checkpoint_every=config.checkpoint_every, stage="finetune",
                       args=args, state_metrics=param_norm)
  scale = lora_scale(config)
  return {"params": export_params(state, scale), "ema": export_params(state, scale, ema=True),
          "step": int(state["step"]), "state": state}
