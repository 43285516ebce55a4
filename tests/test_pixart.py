"""PixArt-Sigma against diffusers' PixArtTransformer2DModel with random weights, through both checkpoint layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from graft_jax.convert.pixart import pixart_from_torch
from graft_jax.convert.state_dict import ConversionError
from graft_jax.models.config import PixArtConfig, pixart_config
from graft_jax.models.embeddings import sincos_2d, timestep_embedding
from graft_jax.models.pixart import PixArt, init_params

CAPTION_CHANNELS, CAPTION_LEN = 12, 6


class SharedTimestepEmbedding(torch.nn.Module):
  """PixArt's timestep embedding is DiT's original formula (diffusers: flip_sin_to_cos, shift 0), but torch's and
  XLA's float32 sin/cos of arguments near 1000 differ by a few ulps (5e-6 of the output here), which is not what
  the model comparison is about: the reference gets our embedding, and test_timestep_embedding_matches_diffusers
  bounds the difference on its own."""

  def forward(self, timesteps):
    return torch.from_numpy(np.array(timestep_embedding(jnp.asarray(timesteps.numpy()))))


def diffusers_pixart(depth=2, heads=2, head_dim=8, size=8, patch=2, interpolation=2, seed=0):
  from diffusers import PixArtTransformer2DModel
  torch.manual_seed(seed)
  model = PixArtTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=depth,
      cross_attention_dim=heads * head_dim, sample_size=size, patch_size=patch, norm_type="ada_norm_single",
      caption_channels=CAPTION_CHANNELS, use_additional_conditions=False, interpolation_scale=interpolation).eval()
  with torch.no_grad():  # zero-initialised projections would hide half the model: randomise everything
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  model.adaln_single.emb.time_proj = SharedTimestepEmbedding()
  return model


def original_state_dict(model, null_caption):
  """The original PixArt layout (PixArtMS.py), made from the diffusers one by the map of reference/parity.md."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  renames = {"pos_embed.proj": "x_embedder.proj", "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "adaln_single.linear": "t_block.1",
             "caption_projection.linear_1": "y_embedder.y_proj.fc1",
             "caption_projection.linear_2": "y_embedder.y_proj.fc2", "proj_out": "final_layer.linear"}
  out = {f"{dst}.{leaf}": sd[f"{src}.{leaf}"] for src, dst in renames.items() for leaf in ("weight", "bias")}
  out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
  out["y_embedder.y_embedding"] = null_caption
  for i in range(len(model.transformer_blocks)):
    b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
    out[f"{o}scale_shift_table"] = sd[f"{b}scale_shift_table"]
    for leaf in ("weight", "bias"):
      out[f"{o}attn.qkv.{leaf}"] = np.concatenate([sd[f"{b}attn1.to_{c}.{leaf}"] for c in "qkv"])
      out[f"{o}cross_attn.kv_linear.{leaf}"] = np.concatenate([sd[f"{b}attn2.to_{c}.{leaf}"] for c in "kv"])
      for src, dst in [("attn1.to_out.0", "attn.proj"), ("attn2.to_q", "cross_attn.q_linear"),
                       ("attn2.to_out.0", "cross_attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")]:
        out[f"{o}{dst}.{leaf}"] = sd[f"{b}{src}.{leaf}"]
  grid = model.config.sample_size // model.config.patch_size
  table = sincos_2d(out["x_embedder.proj.weight"].shape[0], grid, base_size=grid,
                    interpolation=model.config.interpolation_scale)
  out["pos_embed"] = table.astype(np.float32)[None]  # PixArt stores its table as a buffer
  return out


def inputs(size, batch=4, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
  t = np.array([0, 1, 500, 999][:batch])
  caption = rng.standard_normal((batch, CAPTION_LEN, CAPTION_CHANNELS)).astype(np.float32)
  mask = np.ones((batch, CAPTION_LEN), np.int64)
  mask[1, 3:] = 0  # padded caption tokens
  mask[-1, 1:] = 0  # one real token
  return x, t, caption, mask


def reference(model, x, t, caption, mask):
  with torch.no_grad():
    return model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(caption), timestep=torch.from_numpy(t),
                 encoder_attention_mask=torch.from_numpy(mask)).sample.numpy()


def run(config, params, x, t, caption, mask):
  """NCHW in and out, as the reference; one compiled program (eager Flax compiles every op on its own)."""
  out = jax.jit(PixArt(config).apply)({"params": params}, x.transpose(0, 2, 3, 1), t, caption, mask)
  return np.asarray(out).transpose(0, 3, 1, 2)


def rel_err(out, ref):
  assert out.shape == ref.shape
  return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def model():
  return diffusers_pixart()


@pytest.mark.parametrize("fmt", ["diffusers", "pixart"])
def test_parity_with_diffusers(model, fmt):
  x, t, caption, mask = inputs(8)
  ref = reference(model, x, t, caption, mask)
  null = np.random.default_rng(5).standard_normal((CAPTION_LEN, CAPTION_CHANNELS)).astype(np.float32)
  tensors = ({k: v.numpy() for k, v in model.state_dict().items()} if fmt == "diffusers"
             else original_state_dict(model, null))
  config, params = pixart_from_torch(tensors, fmt, num_heads=2, diffusers_config=dict(model.config))
  assert (config.depth, config.hidden_size, config.caption_channels, config.input_size) == (2, 16, 12, 8)
  assert config.pe_interpolation == 2.0 and config.learn_sigma and config.caption_length == (
      300 if fmt == "diffusers" else CAPTION_LEN)
  err = rel_err(run(config, params, x, t, caption, mask), ref)
  print(f"{fmt}: max abs error / max abs output = {err:.2e}")
  assert err < 1e-5, err


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import Timesteps
  t = np.array([0, 1, 500, 999])
  want = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(t)).numpy()
  args = t[:, None] * np.exp(-np.log(10000) * np.arange(128) / 128)
  bound = 4 * np.finfo(np.float32).eps * np.concatenate([args, args], 1) + 1e-6  # a few float32 ulps of the argument
  assert np.all(np.abs(np.asarray(timestep_embedding(jnp.asarray(t))) - want) <= bound)


def test_other_resolution_interpolates_pos_embed(model):
  """A 12 x 16 latent (grid 6 x 8 against base 4): diffusers recomputes its table the same way."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 4, 12, 16)).astype(np.float32)
  _, t, caption, mask = inputs(8, batch=2)
  ref = reference(model, x, t, caption, mask)
  config, params = pixart_from_torch({k: v.numpy() for k, v in model.state_dict().items()},
                                     diffusers_config=dict(model.config))
  err = rel_err(run(config, params, x, t, caption, mask), ref)
  print(f"12x16 latent: max abs error / max abs output = {err:.2e}")
  assert err < 1e-5, err


def test_null_caption_dropout_and_cfg(model):
  x, t, caption, mask = inputs(8)
  null = np.random.default_rng(5).standard_normal((CAPTION_LEN, CAPTION_CHANNELS)).astype(np.float32)
  config, params = pixart_from_torch(original_state_dict(model, null), num_heads=2)
  x = x.transpose(0, 2, 3, 1)
  net = PixArt(config)
  forward = jax.jit(lambda x, t, c, m, drop=None: net.apply({"params": params}, x, t, c, m, drop=drop))
  nulls = np.broadcast_to(null, caption.shape)
  # Forcing the null caption equals passing y_embedding as the caption; the mask is kept.
  np.testing.assert_allclose(forward(x, t, caption, mask, np.array([True, False, True, False])),
                             forward(x, t, np.where(np.array([1, 0, 1, 0])[:, None, None], nulls, caption), mask),
                             rtol=1e-5, atol=1e-5)
  # Dropout with probability 1 in training is the same.
  all_dropped = jax.jit(lambda x, t, c, m, key: PixArt(config.replace(caption_dropout_prob=1.0)).apply(
      {"params": params}, x, t, c, m, train=True, rngs={"label_dropout": key}))
  np.testing.assert_allclose(all_dropped(x, t, caption, mask, jax.random.key(0)), forward(x, t, nulls, mask),
                             rtol=1e-5, atol=1e-5)
  # CFG: [cond; uncond] halves, all 4 eps channels guided, the sigma channels from each half.
  xx = np.concatenate([x[:2], x[:2]])
  with_cfg = jax.jit(lambda x, t, c, m: net.apply({"params": params}, x, t, c, m, 3.0, method=PixArt.forward_with_cfg))
  out = np.asarray(with_cfg(xx, t, caption, mask))
  raw = np.asarray(forward(xx, t, np.concatenate([caption[:2], nulls[2:]]), mask))
  cond, uncond = raw[:2], raw[2:]
  np.testing.assert_allclose(out[:2, ..., :4], uncond[..., :4] + 3.0 * (cond[..., :4] - uncond[..., :4]), atol=1e-5)
  np.testing.assert_allclose(out[2:, ..., :4], out[:2, ..., :4])
  np.testing.assert_allclose(out[..., 4:], raw[..., 4:], atol=1e-5)


def test_sites_are_sown_and_swappable():
  config = pixart_config(256, depth=2, hidden_size=32, num_heads=2, caption_channels=8, caption_length=5)
  assert config.input_size == 32 and config.pe_interpolation == 0.5
  config = config.replace(input_size=8).with_layer(1, "attn", config.layers[0].attn.make("hyena_x"))
  assert PixArtConfig.from_json(config.to_json()) == config and config.to_json()["model"] == "pixart"
  params = init_params(config, jax.random.key(0))
  assert set(params["blocks_1"]["attn"]) == {"in_proj", "short_filter", "out_proj"}
  x = jnp.ones((2, 8, 8, 4))
  out, state = jax.jit(lambda p: PixArt(config).apply({"params": p}, x, jnp.array([3, 7]), jnp.ones((2, 5, 8)),
                                                      jnp.ones((2, 5)), mutable=["intermediates"]))(params)
  inter = state["intermediates"]
  assert out.shape == (2, 8, 8, 8)
  for i in range(2):
    for name in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
      assert inter[f"blocks_{i}"][name][0].shape == (2, 16, 32)
    assert inter[f"blocks_{i}"]["attn_gate"][0].shape == (2, 1, 32)


def test_conversion_errors(model):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  with pytest.raises(ConversionError, match="not a PixArt"):
    pixart_from_torch({"encoder.conv_in.weight": np.zeros((1,))})
  with pytest.raises(ConversionError, match=r"extra\.weight \(3,\)"):
    pixart_from_torch({**sd, "extra.weight": np.zeros(3)}, diffusers_config=dict(model.config))
  with pytest.raises(ConversionError, match="micro-conditions"):
    pixart_from_torch({**sd, "adaln_single.emb.resolution_embedder.linear_1.weight": np.zeros(3)})
  original = original_state_dict(model, np.zeros((CAPTION_LEN, CAPTION_CHANNELS), np.float32))
  with pytest.raises(ConversionError, match="pos_embed is not PixArt's"):
    pixart_from_torch({**original, "pos_embed": original["pos_embed"] * 1.1}, num_heads=2)
  del sd["transformer_blocks.1.attn2.to_v.bias"]
  with pytest.raises(ConversionError, match="block 1 lacks some of attn2"):
    pixart_from_torch(sd, diffusers_config=dict(model.config))


@pytest.mark.parametrize("src", ["diffusers", "pixart.pth"])
def test_cli_convert_and_load(model, tmp_path, src):
  """Through tools/convert_torch_weights.py's main: a diffusers folder, or a PixArt training file {"state_dict"}."""
  from graft_jax import checkpoints
  from graft_jax.convert.cli import main
  if src == "diffusers":
    model.save_pretrained(tmp_path / src)
    extra = []
  else:
    null = np.zeros((CAPTION_LEN, CAPTION_CHANNELS), np.float32)
    sd = {k: torch.from_numpy(v) for k, v in original_state_dict(model, null).items()}
    torch.save({"state_dict": sd}, tmp_path / src)
    extra = ["--num-heads", "2"]
  assert main([str(tmp_path / src), str(tmp_path / "out"), *extra]) == 0
  net, params = checkpoints.load(tmp_path / "out")
  assert isinstance(net, PixArt) and net.config.pe_interpolation == 2.0
  x, t, caption, mask = inputs(8)
  assert rel_err(run(net.config, params, x, t, caption, mask), reference(model, x, t, caption, mask)) < 1e-5


def test_kv_compressed_attention_and_its_import(model):
  """PixArt-Sigma's AttentionKVCompress (conv sampling), written out in torch, against the registry operator; and a
  checkpoint whose block 1 holds attn.sr / attn.norm imports that block as it."""
  import torch.nn.functional as F
  from graft_jax import operators
  d, heads, r, side = 16, 2, 2, 4
  rng = np.random.default_rng(7)
  w = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.3
  t = {"qkv.weight": w(3 * d, d), "qkv.bias": w(3 * d), "proj.weight": w(d, d), "proj.bias": w(d),
       "sr.weight": w(d, 1, r, r), "sr.bias": w(d), "norm.weight": 1 + w(d), "norm.bias": w(d)}
  x = w(2, side * side, d)
  tt = {k: torch.from_numpy(v) for k, v in t.items()}
  q, k, v = F.linear(torch.from_numpy(x), tt["qkv.weight"], tt["qkv.bias"]).chunk(3, dim=-1)

  def compress(u):  # tokens (B, N, D) -> grid (B, D, h, w) -> strided depthwise conv -> tokens -> LayerNorm
    u = u.transpose(1, 2).reshape(2, d, side, side)
    u = F.conv2d(u, tt["sr.weight"], tt["sr.bias"], stride=r, groups=d).flatten(2).transpose(1, 2)
    return F.layer_norm(u, (d,), tt["norm.weight"], tt["norm.bias"], eps=1e-5)
  heads_first = lambda u: u.reshape(2, -1, heads, d // heads).transpose(1, 2)
  y = F.scaled_dot_product_attention(heads_first(q), heads_first(compress(k)), heads_first(compress(v)))
  ref = F.linear(y.transpose(1, 2).reshape(2, -1, d), tt["proj.weight"], tt["proj.bias"]).numpy()

  op = operators.match_torch_modules("attn", frozenset(k.split(".")[0] for k in t))
  config, params = op.from_torch(t, d, heads)
  assert op.name == "mha_kv_compress" and config["sr_ratio"] == r
  out = np.asarray(jax.jit(operators.build(op.name, d, **config).apply)({"params": params}, x))
  err = rel_err(out, ref)
  print(f"KV compression: max abs error / max abs output = {err:.2e}")
  assert err < 1e-5, err

  sd = original_state_dict(model, np.zeros((CAPTION_LEN, CAPTION_CHANNELS), np.float32))
  sd.update({f"blocks.1.attn.{k}": v for k, v in t.items() if k.startswith(("sr.", "norm."))})
  config, params = pixart_from_torch(sd, num_heads=2)
  assert [layer.attn.name for layer in config.layers] == ["mha", "mha_kv_compress"]
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["sr"]["kernel"], t["sr.weight"].transpose(2, 3, 1, 0))


def test_graft_plan_on_pixart():
  """The paper's PixArt-Sigma graft (Hyena-X for the self-attention of layers 8, 10, ..., 18 and 20-27: the paper says
  15 layers, its list names 14) plans and summarises at 2K; the surgery itself runs on a tiny model."""
  from graft_jax import graft
  layers = [8, 10, 12, 14, 16, 18] + list(range(20, 28))
  full = pixart_config(2048)
  edits = graft.parse_plan([dict(site="attn", layers=layers, operator="hyena_x")], full)
  s = graft.summary(full, graft.student_config(full, edits))
  assert len(s["rows"]) == 14 and s["params_student"] - s["params_teacher"] == 14 * (5_330_304 - 5_313_024)
  assert s["flops_student"] < 0.7 * s["flops_teacher"]  # attention dominates at 16,384 tokens
  with pytest.raises(graft.PlanError, match="DiT edit"):
    graft.parse_plan([dict(kind="parallel_pairs", layers="all")], full)

  teacher = pixart_config(64, depth=2, hidden_size=32, num_heads=2, caption_channels=8, caption_length=5)
  params = jax.eval_shape(lambda k: init_params(teacher, k), jax.random.key(0))  # surgery only moves subtrees
  edits = graft.parse_plan([dict(site="attn", layers=[1], operator="hyena_x")], teacher)
  student, new = graft.graft(teacher, params, edits, jax.random.key(1))
  assert isinstance(student, PixArtConfig) and student.layers[1].attn.name == "hyena_x"
  assert new["blocks_0"] is params["blocks_0"] and new["blocks_1"]["cross_attn"] is params["blocks_1"]["cross_attn"]
  assert set(new["blocks_1"]["attn"]) == {"in_proj", "short_filter", "out_proj"}
