"""Prompts to T5 conditioning for PixArt-Sigma: tokenising, encoding in jitted batches, and precomputed embeddings.

Tokenisation follows Hugging Face's T5Tokenizer as PixArt calls it (padding="max_length", truncation=True): the
sentencepiece ids of the prompt, cut to max_length - 1, then EOS (id 1), then padding (id 0); the mask is 1 on the
prompt and its EOS. The sentencepiece model file (T5's `spiece.model`) is supplied by the user: nothing is downloaded.

Preprocessing differs between the two reference pipelines: PixArt's own scripts only strip the prompt, diffusers'
PixArtSigmaPipeline also lowercases it (when caption cleaning is off). `lowercase` picks; stripping is always done.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax.files import write_atomic
from graft_jax.models.t5 import T5Encoder

PIXART_SIGMA_MAX_LENGTH = 300
PAD_ID = 0
EOS_ID = 1


class T5Tokenizer:
  """`tokenizer(prompts, max_length)` -> (ids (N, max_length) int32, mask (N, max_length) bool)."""

  def __init__(self, model_file: str | pathlib.Path, lowercase: bool = False):
    import sentencepiece  # only prompt encoding needs it

    path = pathlib.Path(model_file)
    if not path.is_file():
      raise FileNotFoundError(f"{path} does not exist; pass T5's sentencepiece model (spiece.model).")
    self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if (self.processor.pad_id(), self.processor.eos_id()) != (PAD_ID, EOS_ID):
      raise ValueError(f"{path} numbers pad and EOS as {self.processor.pad_id()} and {self.processor.eos_id()}, "
                       f"but T5 uses {PAD_ID} and {EOS_ID}.")
    self.lowercase = lowercase

  def __call__(self, prompts: Sequence[str] | str,
               max_length: int = PIXART_SIGMA_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      prompts = [prompts]
    if max_length < 1:
      raise ValueError(f"max_length must leave room for the EOS token, got {max_length}.")
    ids = np.full((len(prompts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), max_length), bool)
    for row, prompt in enumerate(prompts):
      text = prompt.strip().lower() if self.lowercase else prompt.strip()
      # Truncation keeps room for EOS, as transformers does for a sequence with one special token.
      tokens = self.processor.encode(text)[:max_length - 1] + [EOS_ID]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = True
    return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _encode(encoder: T5Encoder, params, ids, mask):
  return encoder.apply({"params": params}, ids, mask)


def encode_tokens(encoder: T5Encoder, params, ids: np.ndarray, mask: np.ndarray,
                  batch_size: int = 8) -> np.ndarray:
  """(N, L, d_model) float32 last hidden states, run `batch_size` rows at a time; the last batch is padded up to
  `batch_size` so that one compiled program serves every batch."""
  ids, mask = np.asarray(ids), np.asarray(mask)
  if ids.shape != mask.shape or ids.ndim != 2:
    raise ValueError(f"ids and mask must both be (N, L); got {ids.shape} and {mask.shape}.")
  outputs = []
  for start in range(0, len(ids), batch_size):
    chunk_ids, chunk_mask = ids[start:start + batch_size], mask[start:start + batch_size]
    short = batch_size - len(chunk_ids)
    if short:
      chunk_ids = np.concatenate([chunk_ids, np.full((short, ids.shape[1]), PAD_ID, ids.dtype)])
      chunk_mask = np.concatenate([chunk_mask, np.zeros((short, ids.shape[1]), mask.dtype)])
    out = _encode(encoder, params, jnp.asarray(chunk_ids, jnp.int32), jnp.asarray(chunk_mask, jnp.int32))
    outputs.append(np.asarray(out, np.float32)[:batch_size - short])
  if not outputs:
    return np.zeros((0, ids.shape[1], encoder.config.d_model), np.float32)
  return np.concatenate(outputs)


def encode_prompts(prompts: Sequence[str], tokenizer: T5Tokenizer, encoder: T5Encoder, params,
                   max_length: int = PIXART_SIGMA_MAX_LENGTH, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings (N, max_length, d_model) float32, mask (N, max_length) bool) for the prompts. Padded positions hold
  whatever the encoder computes there (as in PixArt's saved features); consumers must apply the mask."""
  ids, mask = tokenizer(prompts, max_length)
  return encode_tokens(encoder, params, ids, mask, batch_size), mask


# Key spellings of precomputed conditioning: ours, and PixArt's extract_features.py (one prompt per file, float16).
_KEYS = (("embeddings", "mask"), ("caption_feature", "attention_mask"))


def save_prompt_embeddings(path: str | pathlib.Path, embeddings: np.ndarray, mask: np.ndarray) -> pathlib.Path:
  """Writes (N, L, D) embeddings and their (N, L) mask (or one prompt's (L, D), (L,)) to an .npz."""
  embeddings, mask = _check(np.asarray(embeddings), np.asarray(mask), str(path))
  return write_atomic(path, lambda f: np.savez(f, embeddings=embeddings, mask=mask))


def load_prompt_embeddings(paths: str | pathlib.Path | Sequence[str | pathlib.Path]) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings (N, L, D) float32, mask (N, L) bool) from one .npz or several, concatenated in order. Each file holds
  embeddings/mask or PixArt's caption_feature/attention_mask, for one prompt ((L, D) or (1, L, D)) or many."""
  paths = [paths] if isinstance(paths, (str, pathlib.Path)) else list(paths)
  if not paths:
    raise ValueError("no embedding files were given.")
  embeddings, masks = [], []
  for path in paths:
    with np.load(path) as data:
      keys = next((k for k in _KEYS if all(name in data for name in k)), None)
      if keys is None:
        raise ValueError(f"{path} holds {sorted(data.files)}, not embeddings/mask or caption_feature/attention_mask.")
      emb, mask = _check(data[keys[0]], data[keys[1]], str(path))
    embeddings.append(emb)
    masks.append(mask)
  if len({e.shape[1:] for e in embeddings}) > 1:
    raise ValueError(f"the embedding files disagree on (length, width): {sorted({e.shape[1:] for e in embeddings})}.")
  return np.concatenate(embeddings), np.concatenate(masks)


def _check(embeddings: np.ndarray, mask: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Batched float32 embeddings and bool mask, or a one-sentence error naming `where`."""
  if embeddings.ndim == 2:
    embeddings = embeddings[None]
  if mask.ndim == 1:
    mask = mask[None]
  if embeddings.ndim != 3 or mask.shape != embeddings.shape[:2]:
    raise ValueError(f"{where}: embeddings {embeddings.shape} and mask {mask.shape} are not (N, L, D) and (N, L).")
  return embeddings.astype(np.float32), mask.astype(bool)
