"""Text-to-latent sampling from a PixArt model: DPM-Solver++ with classifier-free guidance against the learned null
caption, batched over prompts, as PixArt-Sigma samples (20 steps, cfg 4.5, all four eps channels guided).

The unconditional half keeps each prompt's mask and swaps its embeddings for the model's learned null caption
(PixArt's own sampling); `drop` in the model does the swap, so the null caption never leaves the parameters. Or it
gets the encoding of a negative prompt, with that prompt's own mask: how diffusers' pipeline guides ("" by default
there), and the only sound choice for diffusers weights, which carry no null caption.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.sample import at_compute_dtype, generate, shard_over
from graft_jax.samplers.dpm_solver import cfg_model_fn, make_dpm_solver
from graft_jax.train import partition
from graft_jax.train.conditioning import pad_caption

SIGMA_STEPS = 20
SIGMA_CFG = 4.5


def null_caption_missing(params) -> bool:
  """True when the learned null caption is all zeros: what the converter imports from diffusers weights, which carry
  none (guiding against zeros is not what the teacher was trained for; the original .pth has the real one)."""
  return not np.any(np.asarray(params["y_embedder"]["y_embedding"]))


def choose_negative_prompt(params, requested: str | None, can_encode: bool) -> tuple[str | None, str | None]:
  """(negative prompt to guide against, or None for the learned null caption; a note for the log, or None).

  Unset means the learned null caption (PixArt's own sampling), unless the weights carry none (diffusers' layout):
  then "" when a text encoder can encode it, as diffusers' pipeline guides."""
  if requested is not None or not null_caption_missing(params):
    return requested, None
  if can_encode:
    return "", ('the model has no learned null caption (diffusers weights), so guidance uses the encoding of the '
                'negative prompt "" as diffusers does.')
  return None, ("warning: the model's learned null caption is all zeros (diffusers weights carry none) and no text "
                "encoder is given to encode a negative prompt, so guidance uses zeros; convert PixArt's original "
                ".pth, or give a T5 encoder.")


def make_pixart_sampler(model, steps: int = SIGMA_STEPS, cfg_scale: float = SIGMA_CFG, order: int = 2,
                        compute_dtype: str = "bfloat16") -> Callable:
  """A jitted fn(params, caption (B, L, C), mask (B, L), key, negative=None) -> latents (B, H, W, C) at the model's
  input size. `negative`, one (caption (L', C), mask (L',)), is the unconditional half's caption for every row instead
  of the learned null caption. The model runs in `compute_dtype` (bf16 by default, as PixArt's half-precision
  inference; the solver's arithmetic stays float32)."""
  solver = make_dpm_solver(steps, order)
  cfg = model.config

  @jax.jit
  def run(params, caption, mask, key, negative=None):
    caption, mask = pad_caption(caption, mask, cfg.caption_length)
    apply_fn = at_compute_dtype(
        lambda p, x, t, c: model.apply({"params": p}, x, t, c["caption"], c["mask"], drop=c["drop"]), params,
        compute_dtype)
    b = caption.shape[0]
    cond = {"caption": caption, "mask": mask, "drop": jnp.zeros((b,), bool)}
    if negative is None:
      uncond = {**cond, "drop": jnp.ones((b,), bool)}
    else:
      neg_caption, neg_mask = pad_caption(negative[0][None], negative[1][None], cfg.caption_length)
      uncond = {"caption": jnp.broadcast_to(neg_caption, caption.shape).astype(caption.dtype),
                "mask": jnp.broadcast_to(neg_mask, mask.shape).astype(mask.dtype), "drop": cond["drop"]}
    model_fn = cfg_model_fn(apply_fn, cond, uncond, cfg_scale)
    noise = jax.random.normal(key, (b, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    return solver.sample(model_fn, noise)
  return run


def sample_latents(run: Callable, params, caption: np.ndarray, mask: np.ndarray, key: jax.Array, batch_size: int,
                   mesh=None, progress: Callable[[int, int], None] | None = None,
                   negative: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
  """Latents for every row of (caption, mask), `batch_size` rows at a time split over `mesh` (default: the local
  devices). Batch k's noise comes from fold_in(key, k * batch_size); the last batch is padded with all-padding
  captions so that one compiled program serves every batch. `negative`: see make_pixart_sampler."""
  mesh = mesh or partition.make_mesh({"data": -1}, jax.local_devices())
  partition.check_batch(mesh, batch_size)
  if len(caption) == 0:
    return np.zeros((0,), np.float32)
  # The negative caption travels with the parameters: replicated on every device.
  sharded, replicated = shard_over(lambda pn, rows, k: run(pn[0], *rows, k, pn[1]), (params, negative), mesh)
  return generate(sharded, replicated, (np.asarray(caption), np.asarray(mask)), key, batch_size, progress)
