"""Prompt files and their caption embeddings for PixArt's stages (teacher-generated data, samples).

A prompt file is UTF-8 text with one prompt per line (blank lines are skipped). Its embeddings come from, in order:
  - a precomputed .npz (graft_jax.text.load_prompt_embeddings), one row per prompt in file order;
  - `t5 = "random"`: a seeded random embedding per prompt (its own sha256), with a mask over its word count plus EOS:
    for tiny test models, which have no real encoder;
  - a converted T5 encoder folder (graft_jax.checkpoints) and T5's sentencepiece model (`spiece`, default
    <t5>/spiece.model), tokenised to the model's caption length as PixArt-Sigma does.
Every problem a user can fix is a DataError with one sentence.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Sequence

import numpy as np

from graft_jax.data.latents import DataError

RANDOM = "random"


def read_prompts(path: str | pathlib.Path, what: str = "prompt file") -> list[str]:
  path = pathlib.Path(path) if path else None
  if path is None or not path.is_file():
    raise DataError(f"the {what} {str(path or '(none given)')!r} does not exist; give a text file with one prompt "
                    f"per line.")
  prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not prompts:
    raise DataError(f"the {what} {path} holds no prompt; write one prompt per line.")
  return prompts


def spiece_path(text: Any) -> pathlib.Path:
  return pathlib.Path(text.spiece) if text.get("spiece") else pathlib.Path(text.t5) / "spiece.model"


def check_text(text: Any, embeddings: str = "") -> None:
  """Fails early, before any model loads, when the encoder, its tokeniser or the embeddings file is missing."""
  if embeddings:
    if not pathlib.Path(embeddings).is_file():
      raise DataError(f"the embeddings file {embeddings} does not exist; write one with "
                      f"graft_jax.text.save_prompt_embeddings or use a T5 encoder (text.t5).")
    return
  if text.t5 == RANDOM:
    return
  if not text.t5:
    raise DataError("no text encoder is given: name a converted T5 encoder folder (text.t5, --t5) or precomputed "
                    "embeddings.")
  if not (pathlib.Path(text.t5) / "config.json").is_file():
    raise DataError(f"the T5 encoder folder {text.t5} does not exist or holds no config.json; convert T5 first with "
                    f"`python tools/convert_torch_weights.py SRC {text.t5}`.")
  if not spiece_path(text).is_file():
    raise DataError(f"T5's tokeniser {spiece_path(text)} does not exist; set text.spiece to T5's spiece.model.")


def random_embeddings(prompts: Sequence[str], length: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Stand-in conditioning for tiny random models: the same prompt always gets the same rows."""
  emb = np.zeros((len(prompts), length, channels), np.float32)
  mask = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    emb[row] = np.random.default_rng(seed).standard_normal((length, channels))
    mask[row, :min(len(prompt.split()) + 1, length)] = True
  return emb, mask


def embed_prompts(text: Any, prompts: Sequence[str], length: int, channels: int,
                  embeddings: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(embeddings (N, <= length, channels) float32, mask (N, <= length) bool) for the prompts; `text` is the config's
  text block (t5, spiece, lowercase, batch_size), `embeddings` an optional precomputed .npz for these prompts."""
  check_text(text, embeddings)
  if embeddings:
    from graft_jax.text import load_prompt_embeddings
    try:
      emb, mask = load_prompt_embeddings(embeddings)
    except (ValueError, OSError) as e:
      raise DataError(f"{embeddings} is not a usable embeddings file: {e}") from None
    if len(emb) != len(prompts):
      raise DataError(f"{embeddings} holds {len(emb)} embeddings but there are {len(prompts)} prompts; they must "
                      f"match row for row.")
  elif text.t5 == RANDOM:
    emb, mask = random_embeddings(prompts, length, channels)
  else:
    emb, mask = _encode_t5(text, prompts, length)
  if emb.shape[2] != channels or emb.shape[1] > length:
    raise DataError(f"the caption embeddings are (tokens {emb.shape[1]}, width {emb.shape[2]}) but the model takes "
                    f"at most {length} tokens of width {channels}.")
  return emb, mask


def encode_negative(text: Any, params: Any, requested: str | None, length: int,
                    channels: int) -> tuple[str | None, tuple[np.ndarray, np.ndarray] | None, str | None]:
  """(negative prompt, its (caption (L, C), mask (L,)), a note for the log): the prompt
  samplers.pixart.choose_negative_prompt picks for a PixArt model's `params`, encoded as embed_prompts does; all None
  but the note when guidance keeps the learned null caption. A DataError when it cannot be encoded."""
  from graft_jax.samplers.pixart import choose_negative_prompt  # jax and the model stack: only for PixArt
  prompt, note = choose_negative_prompt(params, requested, bool(text.t5))
  if prompt is None:
    return None, None, note
  caption, mask = embed_prompts(text, [prompt], length, channels)
  return prompt, (caption[0], mask[0]), note


def _encode_t5(text: Any, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  from graft_jax import checkpoints  # orbax: imported only when an encoder is loaded
  from graft_jax.models.t5 import T5Encoder
  from graft_jax.text import T5Tokenizer, encode_prompts
  encoder, params = checkpoints.load(text.t5)
  if not isinstance(encoder, T5Encoder):
    raise DataError(f"{text.t5} holds {type(encoder).__name__}, not a T5 encoder.")
  try:
    tokenizer = T5Tokenizer(spiece_path(text), lowercase=bool(text.get("lowercase", False)))
  except (ValueError, OSError, RuntimeError) as e:
    raise DataError(f"{spiece_path(text)} is not T5's sentencepiece model: {e}") from None
  return encode_prompts(prompts, tokenizer, encoder, params, max_length=length,
                        batch_size=int(text.get("batch_size", 8)))


def describe(text: Any, embeddings: str = "") -> dict[str, Any]:
  """Where the conditioning came from, for metadata."""
  if embeddings:
    return {"embeddings": str(pathlib.Path(embeddings).absolute())}
  if text.t5 == RANDOM:
    return {"t5": RANDOM}
  return {"t5": str(pathlib.Path(text.t5).absolute()), "spiece": str(spiece_path(text).absolute()),
          "lowercase": bool(text.get("lowercase", False))}
