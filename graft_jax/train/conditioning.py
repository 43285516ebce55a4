"""What a model is conditioned on, read from a batch: DiT takes class labels, PixArt caption embeddings and their mask.

Batches are {"x", "y"} for DiT and {"x", "caption", "mask"} for PixArt (a PixArt latent cache also carries "y", the
prompt's index, which no model reads). The trainers reach a model only through `forward` and `cond_args`, so one set
of trainers serves both; for DiT the call is exactly the one the trainers made before, so its numbers are unchanged.
Caption dropout needs no special case: PixArt swaps dropped captions for its learned null caption under the same
rng name ("label_dropout") that DiT's label dropout uses.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from graft_jax.models.config import PixArtConfig

DIT_KEYS = ("x", "y")
PIXART_KEYS = ("x", "caption", "mask")


def is_text_model(model_or_config: Any) -> bool:
  config = getattr(model_or_config, "config", model_or_config)
  return isinstance(config, PixArtConfig)


def batch_keys(model_or_config: Any) -> tuple[str, ...]:
  """The arrays a training batch must hold for this model."""
  return PIXART_KEYS if is_text_model(model_or_config) else DIT_KEYS


def pad_caption(caption, mask, length: int):
  """Captions stored shorter than the model's `length` get zero rows with mask 0. Padded tokens get no weight in
  cross-attention and the caption projection is per token, so this is exact; the full length is what the learned
  null caption needs when captions are dropped."""
  short = length - caption.shape[1]
  if short < 0:
    raise ValueError(f"captions have {caption.shape[1]} tokens, more than the model's {length}.")
  if short:
    caption = jnp.pad(caption, ((0, 0), (0, short), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, short)))
  return caption, mask


def cond_args(model: Any, batch: Mapping[str, Any]) -> tuple:
  """The positional arguments after (x, t): (y,) for DiT, (caption, mask) for PixArt."""
  if not is_text_model(model):
    return (batch["y"],)
  missing = [k for k in PIXART_KEYS[1:] if k not in batch]
  if missing:
    raise ValueError(f"a PixArt model needs batches with caption and mask; this one lacks {missing} "
                     f"(it holds {sorted(batch)}).")
  return pad_caption(batch["caption"], batch["mask"], model.config.caption_length)


def cast_batch(model: Any, batch: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
  """The batch a trainer computes on: latents (and caption embeddings) in the compute dtype, labels and masks as
  they are; keys the model does not read are left out."""
  if not is_text_model(model):
    return {"x": batch["x"].astype(dtype), "y": batch["y"]}
  return {"x": batch["x"].astype(dtype), "caption": batch["caption"].astype(dtype), "mask": batch["mask"]}


def forward(model: Any, params: Any, x, t, batch: Mapping[str, Any], **kwargs):
  """model(x, t, *conditioning of `batch`) with `params`; kwargs (train, rngs, mutable, drop) pass through."""
  return model.apply({"params": params}, x, t, *cond_args(model, batch), **kwargs)
