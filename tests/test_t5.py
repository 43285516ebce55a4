"""T5 v1.1 encoder: parity with transformers' T5EncoderModel (random weights, from a config), and the converter."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from graft_jax.convert.state_dict import ConversionError  # noqa: E402
from graft_jax.convert.t5 import convert_t5_encoder  # noqa: E402
from graft_jax.models import t5  # noqa: E402

TINY = dict(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=12)


def torch_encoder(seed=0, **overrides):
  config = transformers.T5Config(**(TINY | overrides), feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                 is_encoder_decoder=False, use_cache=False)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    # Norm scales start at one and would hide a missing or misplaced scale: randomise them.
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model


def state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for length, num_buckets, max_distance in [(512, 32, 128), (40, 8, 12), (300, 16, 64)]:
    ours = t5.relative_position_buckets(length, length, num_buckets, max_distance)
    pos = torch.arange(length)
    ref = bucket(pos[None, :] - pos[:, None], bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_encoder_matches_transformers_with_padding():
  model = torch_encoder()
  config, params = convert_t5_encoder(state_dict(model), max_distance=TINY["relative_attention_max_distance"])
  assert config == t5.T5Config(**TINY)
  rng = np.random.default_rng(0)
  length = 20  # beyond max_distance, so the shared last bucket is exercised
  ids = rng.integers(2, TINY["vocab_size"], (3, length))
  mask = np.ones((3, length), np.int64)
  mask[1, 7:] = 0
  mask[2, 15:] = 0
  ids[mask == 0] = 0
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  ours = jax.jit(t5.T5Encoder(config).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  ours = np.asarray(ours, np.float64)
  valid = mask.astype(bool)
  # Padded rows are computed too (and meaningless); compare them as well, since transformers computes them alike.
  err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert err < 1e-5, err
  assert np.max(np.abs(ours[valid] - ref[valid])) / np.max(np.abs(ref)) < 1e-5
  # The mask matters: without it the short prompt's outputs change.
  unmasked = jax.jit(t5.T5Encoder(config).apply)({"params": params}, jnp.asarray(ids), None)
  assert np.max(np.abs(np.asarray(unmasked)[1, :7] - ref[1, :7])) > 1e-3


def test_bfloat16_compute_is_close():
  model = torch_encoder(seed=1)
  config, params = convert_t5_encoder(state_dict(model), max_distance=TINY["relative_attention_max_distance"])
  ids = jnp.asarray(np.random.default_rng(1).integers(2, 96, (2, 9)))
  full = jax.jit(t5.T5Encoder(config).apply)({"params": params}, ids)
  half = jax.jit(t5.T5Encoder(config, dtype=jnp.bfloat16).apply)({"params": params}, ids)
  assert half.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(half - full)) / jnp.max(jnp.abs(full))) < 5e-2


def test_init_params_match_converted_tree():
  model = torch_encoder()
  config, params = convert_t5_encoder(state_dict(model), max_distance=TINY["relative_attention_max_distance"])
  init = jax.eval_shape(lambda key: t5.init_params(config, key), jax.random.key(0))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert shapes(init) == shapes(params)
  assert t5.T5Config.from_json(config.to_json()) == config
  hf = transformers.T5Config(**TINY, feed_forward_proj="gated-gelu").to_dict()
  assert t5.T5Config.from_hf(hf) == config
  with pytest.raises(ValueError, match="gated-gelu"):
    t5.T5Config.from_hf(transformers.T5Config(**TINY).to_dict())


def test_save_and_load_round_trip(tmp_path):
  from graft_jax import checkpoints
  config, params = convert_t5_encoder(state_dict(torch_encoder()), max_distance=TINY["relative_attention_max_distance"])
  checkpoints.save(tmp_path / "t5", config, params)
  model, loaded = checkpoints.load(tmp_path / "t5")
  assert isinstance(model, t5.T5Encoder) and model.config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_converter_errors():
  tensors = state_dict(torch_encoder())
  # Tied embedding: either key alone converts; both must agree.
  for key in ("shared.weight", "encoder.embed_tokens.weight"):
    convert_t5_encoder({k: v for k, v in tensors.items() if k != key})
  with pytest.raises(ConversionError, match="differ"):
    convert_t5_encoder(tensors | {"shared.weight": tensors["shared.weight"] + 1})
  with pytest.raises(ConversionError, match="not used: extra.weight"):
    convert_t5_encoder(tensors | {"extra.weight": np.zeros(3)})
  missing = {k: v for k, v in tensors.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
  with pytest.raises(ConversionError, match="missing encoder.block.1.layer.1.DenseReluDense.wo.weight"):
    convert_t5_encoder(missing)
  decoder = tensors | {"decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 32)),
                       "lm_head.weight": np.zeros((96, 32))}
  with pytest.raises(ConversionError, match="not used"):
    convert_t5_encoder(decoder)
  convert_t5_encoder(decoder, drop_decoder=True)
  with pytest.raises(ConversionError, match="v1.0"):
    convert_t5_encoder(tensors | {"encoder.block.0.layer.1.DenseReluDense.wi.weight": np.zeros((48, 32))})
  bad = tensors | {"encoder.block.1.layer.0.SelfAttention.o.weight": np.zeros((32, 16))}
  with pytest.raises(ConversionError, match="expected"):
    convert_t5_encoder(bad)


def test_converter_command_reads_a_saved_transformers_folder(tmp_path):
  """tools/convert_torch_weights.py on what T5EncoderModel.save_pretrained writes: the same encoder comes back."""
  from graft_jax import checkpoints
  from graft_jax.convert import cli
  model = torch_encoder(seed=2)
  model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded, as T5-XXL is
  assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
  assert cli.main([str(tmp_path / "hf"), str(tmp_path / "t5")]) == 0
  ours, params = checkpoints.load(tmp_path / "t5")
  assert ours.config == t5.T5Config(**TINY)  # max distance and norm epsilon read from its config.json
  ids = np.arange(2, 14).reshape(2, 6)
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  out = np.asarray(ours.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
