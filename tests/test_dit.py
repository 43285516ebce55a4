"""DiT against diffusers' DiTTransformer2DModel with random weights, through both checkpoint formats."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from graft_jax.convert.dit import dit_from_torch
from graft_jax.models import DiT, dit_config, init_params
from graft_jax.models.embeddings import sincos_1d, sincos_2d, timestep_embedding


def diffusers_dit(patch, depth=2, heads=2, head_dim=8, size=8, in_ch=4, seed=0):
  from diffusers import DiTTransformer2DModel
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_ch,
                                out_channels=2 * in_ch, num_layers=depth, sample_size=size, patch_size=patch,
                                num_embeds_ada_norm=10).eval()
  with torch.no_grad():  # adaLN-Zero leaves the output identically zero: randomise everything
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
    # The per-block embedder copies are one module in a real checkpoint: make them equal.
    emb0 = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(emb0.state_dict())
  for block in model.transformer_blocks:
    block.norm1.emb.time_proj = SharedTimestepEmbedding()
  return model


class SharedTimestepEmbedding(torch.nn.Module):
  """Diffusers' DiT divides the frequency exponent by half - 1, the original DiT by half. The reference gets the
  original formula, computed by the same function as ours: sin/cos of float32 arguments near t = 1000 differ by
  a few ulps between exp implementations (1e-5 of the output), which is not what this test is about; the
  embedding itself is checked against float64 numpy in test_embedding_functions_match_numpy."""

  def forward(self, timesteps):
    return torch.from_numpy(np.array(timestep_embedding(jnp.asarray(timesteps.numpy()))))


def original_state_dict(model):
  """The original DiT layout, made from the diffusers one with the key map of reference/parity.md."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
         "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
         "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
         "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
  e = "transformer_blocks.0.norm1.emb."
  for src, dst in [("timestep_embedder.linear_1", "t_embedder.mlp.0"), ("timestep_embedder.linear_2",
                                                                      "t_embedder.mlp.2")]:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{e}{src}.weight"], sd[f"{e}{src}.bias"]
  out["y_embedder.embedding_table.weight"] = sd[f"{e}class_embedder.embedding_table.weight"]
  for i in range(len(model.transformer_blocks)):
    b = f"transformer_blocks.{i}."
    for leaf in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([sd[f"{b}attn1.to_{c}.{leaf}"] for c in "qkv"])
      for src, dst in [("norm1.linear", "adaLN_modulation.1"), ("attn1.to_out.0", "attn.proj"),
                       ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")]:
        out[f"blocks.{i}.{dst}.{leaf}"] = sd[f"{b}{src}.{leaf}"]
  grid = model.config.sample_size // model.config.patch_size
  out["pos_embed"] = sincos_2d(out["x_embedder.proj.weight"].shape[0], grid).astype(np.float32)[None]
  return out


def inputs(size, batch=5, classes=10, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
  t = np.array([0, 1, 250, 999, 500][:batch])
  y = np.array([0, classes, 3, 9, classes][:batch])  # includes the null class
  return x, t, y


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("fmt", ["diffusers", "dit"])
def test_parity_with_diffusers(patch, fmt):
  model = diffusers_dit(patch)
  x, t, y = inputs(8)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
  tensors = {k: v.numpy() for k, v in model.state_dict().items()} if fmt == "diffusers" else original_state_dict(model)
  config, params = dit_from_torch(tensors, fmt, num_heads=None if fmt == "diffusers" else 2,
                                  diffusers_config=dict(model.config))
  assert config.depth == 2 and config.patch_size == patch and config.num_classes == 10 and config.learn_sigma
  out = DiT(config).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape == (5, 8, 8, 8)
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err < 1e-5, err


def test_embedding_functions_match_numpy():
  t = np.array([0, 3, 999])
  half = 128
  freqs = np.exp(-np.log(10000) * np.arange(half) / half)
  args = t[:, None] * freqs[None]
  want = np.concatenate([np.cos(args), np.sin(args)], 1)
  # Like the original, the arguments are float32: allow a few float32 ulps of the argument, nothing more.
  bound = 4 * np.finfo(np.float32).eps * np.concatenate([args, args], 1) + 1e-6
  assert np.all(np.abs(np.asarray(timestep_embedding(jnp.asarray(t))) - want) <= bound)
  pos = np.arange(5.0)
  omega = 1 / 10000 ** (np.arange(4) / 4)
  np.testing.assert_array_equal(sincos_1d(8, pos), np.concatenate([np.sin(np.outer(pos, omega)),
                                                                   np.cos(np.outer(pos, omega))], 1))
  table = sincos_2d(16, 3)
  h, w = np.divmod(np.arange(9), 3)  # row-major tokens
  np.testing.assert_array_equal(table, np.concatenate([sincos_1d(8, w), sincos_1d(8, h)], 1))


def test_dit_xl2_parameter_count():
  model = DiT(dit_config("DiT-XL/2"))
  x, i = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, i, i)["params"]
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert n == 674_834_720
  assert n + 256 * 1152 == 675_129_632  # with the fixed pos-embed table the original stores as a parameter


def test_label_dropout_and_cfg():
  config = dit_config("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
  model = DiT(config)
  x = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
  t, y = np.array([10, 20, 10, 20]), np.array([1, 2, 10, 10])
  params = init_params(config, jax.random.key(1))
  rng = np.random.default_rng(2)  # adaLN-Zero starts as the identity: perturb every weight
  params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape, np.float32), params)
  # Dropping every label equals asking for the null class.
  config_all = config.replace(class_dropout_prob=1.0)
  dropped = jax.jit(lambda p, x, t, y, k: DiT(config_all).apply({"params": p}, x, t, y, train=True,
                                                                rngs={"label_dropout": k}))
  forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  with_cfg = jax.jit(lambda p, x, t, y, channels: model.apply({"params": p}, x, t, y, 4.0, channels,
                                                              method=DiT.forward_with_cfg), static_argnums=4)
  np.testing.assert_allclose(dropped(params, x, t, y, jax.random.key(3)), forward(params, x, t, np.full_like(y, 10)),
                             atol=1e-6)
  # CFG: first 3 channels guided, the rest from each half unchanged.
  xx = np.concatenate([x[:2], x[:2]])
  out, raw = np.asarray(with_cfg(params, xx, t, y, 3)), np.asarray(forward(params, xx, t, y))
  cond, uncond = raw[:2], raw[2:]
  np.testing.assert_allclose(out[:2, ..., :3], uncond[..., :3] + 4.0 * (cond[..., :3] - uncond[..., :3]), atol=1e-5)
  np.testing.assert_allclose(out[2:, ..., :3], out[:2, ..., :3])
  np.testing.assert_allclose(out[..., 3:], raw[..., 3:])
  guided = np.asarray(with_cfg(params, xx, t, y, None))[:2]
  np.testing.assert_allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
