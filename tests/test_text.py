"""Prompt tokenisation (against transformers' T5Tokenizer on a sentencepiece model trained here), jitted batch
encoding, and precomputed embedding files."""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

from graft_jax import text  # noqa: E402
from graft_jax.models import t5  # noqa: E402

CORPUS = ["A photo of a cat sitting on a red sofa.", "An astronaut riding a horse on the moon, digital art.",
          "a small house by the lake at sunset", "Two dogs playing in the snow", "A bowl of fruit on a wooden table."]
PROMPTS = ["A cat on the moon!", "  Two  dogs\tplaying in the SNOW ", "", "a small house by the lake at sunset, " * 4]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
  """A tiny sentencepiece model with T5's special ids (pad 0, EOS 1, unk 2), saved as spiece.model in a folder."""
  folder = tmp_path_factory.mktemp("tokenizer")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=60,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  (folder / "spiece.model").write_bytes(model.getvalue())
  return folder / "spiece.model"


@pytest.mark.parametrize("lowercase", [False, True])
def test_tokenizer_matches_transformers(spiece, lowercase):
  transformers = pytest.importorskip("transformers")
  ours = text.T5Tokenizer(spiece, lowercase=lowercase)
  ref = transformers.T5Tokenizer.from_pretrained(str(spiece.parent))
  for max_length in (6, 16, 300):
    ids, mask = ours(PROMPTS, max_length)
    assert ids.shape == mask.shape == (len(PROMPTS), max_length) and ids.dtype == np.int32 and mask.dtype == bool
    # diffusers' PixArtSigmaPipeline lowercases and strips before calling the tokenizer; PixArt's scripts only strip.
    prompts = [p.strip().lower() if lowercase else p.strip() for p in PROMPTS]
    expected = ref(prompts, max_length=max_length, padding="max_length", truncation=True, add_special_tokens=True)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"], bool))
  ids, mask = ours(PROMPTS, 300)
  assert ids[2, 0] == text.EOS_ID and mask[2].sum() == 1  # the empty prompt (diffusers' CFG negative) is just EOS
  assert np.all(ids[~mask] == text.PAD_ID)


def test_tokenizer_against_sentencepiece(spiece):
  ids, mask = text.T5Tokenizer(spiece)(PROMPTS[0], 300)
  pieces = spm.SentencePieceProcessor(model_file=str(spiece)).encode(PROMPTS[0])
  assert list(ids[0, :mask[0].sum()]) == pieces + [1]
  with pytest.raises(FileNotFoundError):
    text.T5Tokenizer(spiece.parent / "missing.model")


def test_encode_prompts_batches_and_matches_apply(spiece):
  config = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=1,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
  encoder, params = t5.T5Encoder(config), t5.init_params(config, jax.random.key(0))
  tokenizer = text.T5Tokenizer(spiece)
  emb, mask = text.encode_prompts(PROMPTS[:3], tokenizer, encoder, params, max_length=24, batch_size=2)
  ids, ref_mask = tokenizer(PROMPTS[:3], 24)
  ref = jax.jit(encoder.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(ref_mask))
  assert emb.shape == (3, 24, 16) and emb.dtype == np.float32
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
  assert text.encode_tokens(encoder, params, ids[:0], ref_mask[:0]).shape == (0, 24, 16)


def test_embedding_files_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  emb, mask = rng.standard_normal((3, 5, 4)).astype(np.float32), rng.random((3, 5)) > 0.5
  text.save_prompt_embeddings(tmp_path / "batch.npz", emb, mask)
  # One prompt in PixArt's extract_features.py layout: float16 (1, L, D) and int16 mask.
  np.savez(tmp_path / "pixart.npz", caption_feature=emb[:1].astype(np.float16),
           attention_mask=mask[:1].astype(np.int16))
  text.save_prompt_embeddings(tmp_path / "single.npz", emb[2], mask[2])
  loaded, loaded_mask = text.load_prompt_embeddings([tmp_path / "batch.npz", tmp_path / "pixart.npz",
                                                     tmp_path / "single.npz"])
  assert loaded.shape == (5, 5, 4) and loaded.dtype == np.float32 and loaded_mask.dtype == bool
  np.testing.assert_array_equal(loaded[:3], emb)
  np.testing.assert_allclose(loaded[3], emb[0], atol=1e-2)
  np.testing.assert_array_equal(loaded_mask, np.concatenate([mask, mask[:1], mask[2:]]))
  np.savez(tmp_path / "other.npz", x=emb)
  with pytest.raises(ValueError, match="not embeddings/mask"):
    text.load_prompt_embeddings(tmp_path / "other.npz")
  np.savez(tmp_path / "wide.npz", embeddings=np.zeros((1, 5, 8)), mask=np.ones((1, 5)))
  with pytest.raises(ValueError, match="disagree"):
    text.load_prompt_embeddings([tmp_path / "batch.npz", tmp_path / "wide.npz"])
  with pytest.raises(ValueError, match="are not"):
    text.save_prompt_embeddings(tmp_path / "bad.npz", emb, mask[:, :4])
