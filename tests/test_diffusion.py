"""DiT diffusion against float64 NumPy restatements of ADM's formulas and against diffusers' schedulers."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from graft_jax import diffusion as dif

SHAPE = (4, 4, 4, 3)  # B, H, W, C: NHWC latents


# ---- float64 NumPy reference: ADM's GaussianDiffusion + SpacedDiffusion, written out independently ----

def ref_tables(kept):
  betas_full = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  abar_full = np.cumprod(1 - betas_full)
  betas, last = [], 1.0
  for s in kept:
    betas.append(1 - abar_full[s] / last)
    last = abar_full[s]
  betas = np.array(betas)
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  return {
      "betas": betas, "abar": abar, "abar_prev": abar_prev, "post_var": post_var,
      "post_logvar": np.log(np.concatenate([post_var[1:2], post_var[1:]])),
      "coef1": betas * np.sqrt(abar_prev) / (1 - abar),
      "coef2": (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
  }


def bcast(v, t):
  return v[t][:, None, None, None]


def ref_p_mean_variance(r, out, x_t, t):
  c = x_t.shape[-1]
  eps, v = out[..., :c], out[..., c:]
  x0 = x_t / np.sqrt(bcast(r["abar"], t)) - np.sqrt(1 / bcast(r["abar"], t) - 1) * eps
  frac = (v + 1) / 2
  logvar = frac * np.log(bcast(r["betas"], t)) + (1 - frac) * bcast(r["post_logvar"], t)
  mean = bcast(r["coef1"], t) * x0 + bcast(r["coef2"], t) * x_t
  return mean, logvar, x0


def ref_cdf(x):
  return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_vb_bits(r, out, x0, x_t, t):
  true_mean = bcast(r["coef1"], t) * x0 + bcast(r["coef2"], t) * x_t
  true_logvar = bcast(r["post_logvar"], t)
  mean, logvar, _ = ref_p_mean_variance(r, out, x_t, t)
  kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
  inv_std = np.exp(-0.5 * logvar)
  hi, lo = ref_cdf(inv_std * (x0 - mean + 1 / 255)), ref_cdf(inv_std * (x0 - mean - 1 / 255))
  logp = np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)),
                  np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))))
  kl_bits = kl.mean(axis=(1, 2, 3)) / np.log(2)
  nll_bits = -logp.mean(axis=(1, 2, 3)) / np.log(2)
  return np.where(t == 0, nll_bits, kl_bits)


def ref_space_timesteps(num_steps, count):
  """ADM's single-section rule, as its code runs it: a running sum of the fractional stride, rounded."""
  stride, pos, kept = (num_steps - 1) / (count - 1), 0.0, []
  for _ in range(count):
    kept.append(round(pos))
    pos += stride
  return kept


def toy_model(x, t):
  """Deterministic [eps, v] output that depends on both x and the (original) step value."""
  phase = np.sin(np.asarray(t, np.float64) / 137.0)[:, None, None, None]
  eps = 0.7 * x + phase
  v = np.tanh(0.5 * x - phase)
  return np.concatenate([eps, v], axis=-1)


def jax_toy_model(x, t):
  phase = jnp.sin(t.astype(jnp.float32) / 137.0)[:, None, None, None]
  return jnp.concatenate([0.7 * x + phase, jnp.tanh(0.5 * x - phase)], axis=-1)


def randn(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape)


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ---- schedule and respacing ----

def test_schedule_matches_diffusers_ddpm():
  d = dif.make_diffusion()
  s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
  np.testing.assert_allclose(d.betas, s.betas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(d.alphas_cumprod, s.alphas_cumprod.numpy(), rtol=2e-4)
  post = np.array([float(s._get_variance(t)) for t in range(1, 1000)])
  # diffusers forms 1 - alphas_cumprod in float32, which cancels badly near t = 0: hence the looser tolerance.
  np.testing.assert_allclose(d.posterior_variance[1:], post, rtol=1e-3)
  np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


@pytest.mark.parametrize("respacing", [None, 250, "ddim50"])
def test_tables_match_float64(respacing):
  d = dif.make_diffusion(respacing=respacing)
  r = ref_tables(np.asarray(d.timestep_map))
  for ours, ref in [(d.betas, "betas"), (d.alphas_cumprod, "abar"), (d.alphas_cumprod_prev, "abar_prev"),
                    (d.posterior_variance, "post_var"), (d.posterior_log_variance_clipped, "post_logvar"),
                    (d.posterior_mean_coef1, "coef1"), (d.posterior_mean_coef2, "coef2")]:
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, r[ref], rtol=1e-6, atol=1e-30, err_msg=ref)


def test_respacing_kept_indices():
  kept = dif.space_timesteps(1000, 250)
  assert kept == [round(i * 999 / 249) for i in range(250)]
  assert kept[:4] == [0, 4, 8, 12] and kept[-1] == 999 and len(set(kept)) == 250
  assert dif.space_timesteps(1000, "250") == kept
  assert dif.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert dif.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
  # 21 steps: ADM's running sum rounds one step differently from round(i * 999 / 20); follow ADM.
  assert dif.space_timesteps(1000, 21) == ref_space_timesteps(1000, 21)
  assert dif.space_timesteps(1000, 21) != [round(i * 999 / 20) for i in range(21)]
  assert dif.space_timesteps(1000, "10,10") == ref_space_timesteps(500, 10) + [500 + s for s in
                                                                                 ref_space_timesteps(500, 10)]
  with pytest.raises(ValueError):
    dif.space_timesteps(1000, "ddim3000")
  with pytest.raises(ValueError):
    dif.space_timesteps(10, 11)
  with pytest.raises(ValueError):
    dif.make_diffusion(variance="learned")


def test_respaced_betas_keep_original_noise_levels():
  full, spaced = dif.make_diffusion(), dif.make_diffusion(respacing=250)
  np.testing.assert_allclose(spaced.alphas_cumprod, np.asarray(full.alphas_cumprod)[spaced.timestep_map], rtol=1e-5)


# ---- forward process, posterior, model distribution ----

def test_q_sample_posterior_and_p_mean_variance():
  d = dif.make_diffusion(respacing=250)
  r = ref_tables(np.asarray(d.timestep_map))
  t = np.array([0, 1, 120, 249])
  x0, noise, x_t = randn(0), randn(1), randn(2)
  ours = d.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  ref = np.sqrt(bcast(r["abar"], t)) * x0 + np.sqrt(1 - bcast(r["abar"], t)) * noise
  assert rel_err(ours, ref) < 1e-5
  mean, var, logvar = d.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  assert rel_err(mean, bcast(r["coef1"], t) * x0 + bcast(r["coef2"], t) * x_t) < 1e-5
  np.testing.assert_allclose(var[:, 0, 0, 0], r["post_var"][t], rtol=1e-6)
  np.testing.assert_allclose(logvar[:, 0, 0, 0], r["post_logvar"][t], rtol=1e-6)
  out = np.concatenate([randn(3), np.tanh(randn(4))], axis=-1)
  p = d.p_mean_variance(jnp.asarray(out, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  ref_mean, ref_logvar, ref_x0 = ref_p_mean_variance(r, out, x_t, t)
  assert rel_err(p["mean"], ref_mean) < 1e-5
  assert rel_err(p["log_variance"], ref_logvar) < 1e-6
  assert rel_err(p["pred_x0"], ref_x0) < 1e-5


def test_fixed_variances():
  small, large = dif.make_diffusion(variance="fixed_small"), dif.make_diffusion(variance="fixed_large")
  r = ref_tables(np.arange(1000))
  x_t, t = jnp.asarray(randn(5), jnp.float32), jnp.array([0, 1, 500, 999])
  out = jnp.asarray(randn(6), jnp.float32)
  logvar = np.asarray(small.p_mean_variance(out, x_t, t)["log_variance"])[:, 0, 0, 0]
  np.testing.assert_allclose(logvar, r["post_logvar"][[0, 1, 500, 999]], rtol=1e-6)
  logvar = np.asarray(large.p_mean_variance(out, x_t, t)["log_variance"])[:, 0, 0, 0]
  np.testing.assert_allclose(logvar, np.log([r["post_var"][1], *r["betas"][[1, 500, 999]]]), rtol=1e-6)
  with pytest.raises(ValueError, match="needs a model output"):
    small.model_output(jax_toy_model, x_t, t)


# ---- training loss ----

@pytest.mark.parametrize("respacing", [None, 250])
def test_training_losses_match_float64(respacing):
  d = dif.make_diffusion(respacing=respacing)
  r = ref_tables(np.asarray(d.timestep_map))
  kept = np.asarray(d.timestep_map)
  t = np.array([0, 0, 1, d.num_steps // 3, d.num_steps - 1, 0])
  shape = (6,) + SHAPE[1:]
  # Data partly beyond +-0.999 so the decoder NLL's open-ended edge bins are exercised at t == 0.
  x0 = np.random.default_rng(7).uniform(-1.1, 1.1, shape)
  noise = randn(8, shape)
  losses = jax.jit(lambda a, b, c: d.training_losses(jax_toy_model, a, b, c))(
      jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  x_t = np.sqrt(bcast(r["abar"], t)) * x0 + np.sqrt(1 - bcast(r["abar"], t)) * noise
  out = toy_model(x_t, kept[t])  # the model sees the ORIGINAL step values
  mse = ((noise - out[..., :3]) ** 2).mean(axis=(1, 2, 3))
  vb = ref_vb_bits(r, out, x0, x_t, t)
  assert all(v.shape == (6,) for v in losses.values())
  np.testing.assert_allclose(losses["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(losses["vb"], vb, rtol=5e-5)
  np.testing.assert_allclose(losses["loss"], mse + vb, rtol=5e-5)
  assert np.all(vb[t == 0] > 0.1) and np.all(np.isfinite(vb))


def test_vb_trains_only_the_variance():
  d = dif.make_diffusion()
  r = ref_tables(np.arange(1000))
  t = np.array([0, 3, 400, 999])
  x0, noise = np.clip(randn(9), -1, 1), randn(10)
  out0 = np.concatenate([noise + 0.3 * randn(11), np.tanh(randn(12))], axis=-1)

  def total(out, fn="loss"):
    losses = d.training_losses(lambda x, tt: out, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                               jnp.asarray(noise, jnp.float32))
    return jnp.sum(losses[fn])

  grad = np.asarray(jax.jit(jax.grad(total))(jnp.asarray(out0, jnp.float32)), np.float64)
  n = np.prod(SHAPE[1:])
  np.testing.assert_allclose(grad[..., :3], 2 * (out0[..., :3] - noise) / n, rtol=1e-4, atol=1e-9)
  # v's gradient is the bound's: a central difference of the float64 reference along a random direction.
  x_t = np.sqrt(bcast(r["abar"], t)) * x0 + np.sqrt(1 - bcast(r["abar"], t)) * noise
  direction = np.concatenate([np.zeros(SHAPE), randn(13)], axis=-1)
  h = 1e-6
  fd = (ref_vb_bits(r, out0 + h * direction, x0, x_t, t).sum()
        - ref_vb_bits(r, out0 - h * direction, x0, x_t, t).sum()) / (2 * h)
  assert abs(np.sum(grad * direction) - fd) < 1e-3 * abs(fd)
  # Without the stop-gradient the bound would push on eps too: the test above could fail.
  args = jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
  unstopped = jax.jit(jax.grad(lambda o: jnp.sum(d.vb_bits(o, *args))))(jnp.asarray(out0, jnp.float32))
  assert np.max(np.abs(unstopped[..., :3])) > 1e-4


# ---- sampling steps against diffusers ----

def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def from_torch(x):
  return np.transpose(x.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_matches_diffusers(variance):
  d = dif.make_diffusion(variance=variance)
  s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                    variance_type=variance, clip_sample=False)
  r = ref_tables(np.arange(1000))
  x = randn(14, (1,) + SHAPE[1:]).astype(np.float32)
  p_sample = jax.jit(lambda out, xx, t, z: d.p_sample(lambda *_: out, xx, t, z))
  vs_diffusers, vs_float64 = 0.0, 0.0
  for step in [999, 500, 20, 1, 0]:
    out = toy_model(x, [step]).astype(np.float32)
    if variance == "fixed_small":
      out[..., 3:] = -1.0  # v = -1 selects the posterior variance: the float64 reference then is fixed_small's
    model_out = out if variance == "learned_range" else out[..., :3]
    ref = s.step(to_torch(model_out), step, to_torch(x), generator=torch.Generator().manual_seed(step)).prev_sample
    noise = from_torch(torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(step)))
    ours = p_sample(jnp.asarray(model_out), jnp.asarray(x), jnp.array([step]), jnp.asarray(noise))
    mean, logvar, _ = ref_p_mean_variance(r, out.astype(np.float64), x.astype(np.float64), np.array([step]))
    vs_float64 = max(vs_float64, rel_err(ours, mean + (step > 0) * np.exp(0.5 * logvar) * noise))
    vs_diffusers = max(vs_diffusers, rel_err(ours, from_torch(ref).astype(np.float64)))
  assert vs_float64 < 1e-6
  # diffusers does its schedule arithmetic in float32: about 5e-5 off the float64 answer at t = 1.
  assert vs_diffusers < 1e-4


def test_ddim_step_and_loop_match_diffusers():
  d = dif.make_diffusion(respacing="ddim50")
  s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                    clip_sample=False, set_alpha_to_one=True)
  s.set_timesteps(50)
  kept = np.asarray(d.timestep_map)
  np.testing.assert_array_equal(s.timesteps.numpy(), kept[::-1])
  x_T = randn(15, (2,) + SHAPE[1:]).astype(np.float32)
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(x_T, (0, 3, 1, 2))))
  for step in s.timesteps:
    eps = toy_model(from_torch(x), [int(step)] * 2)[..., :3].astype(np.float32)
    x = s.step(to_torch(eps), int(step), x, eta=0.0).prev_sample
  ref = from_torch(x).astype(np.float64)
  loop = jax.jit(lambda z: d.ddim_sample_loop(jax_toy_model, x_T.shape, jax.random.key(0), noise=z))
  ours = loop(jnp.asarray(x_T))
  assert rel_err(ours, ref) < 1e-5
  # One step from a shared state, tighter; and DDIM with eta = 1 is the ancestral step with posterior variance.
  i = 30
  eps = toy_model(x_T, [kept[i]] * 2)[..., :3].astype(np.float32)
  ref_step = s.step(to_torch(eps), int(kept[i]), to_torch(x_T), eta=0.0).prev_sample
  noise = jnp.asarray(randn(17, x_T.shape), jnp.float32)

  @jax.jit
  def steps(x, t, z):
    fixed = dif.make_diffusion(respacing="ddim50", variance="fixed_small")
    eps_only = lambda xx, tt: jax_toy_model(xx, tt)[..., :3]
    return (d.ddim_sample(jax_toy_model, x, t, jnp.zeros_like(x)), d.ddim_sample(jax_toy_model, x, t, z, eta=1.0),
            fixed.p_sample(eps_only, x, t, z))

  ours_step, ddim_eta1, ancestral = steps(jnp.asarray(x_T), jnp.array([i, i]), noise)
  assert rel_err(ours_step, from_torch(ref_step).astype(np.float64)) < 1e-5
  assert rel_err(ddim_eta1, np.asarray(ancestral, np.float64)) < 1e-5


# ---- loops and guidance ----

def test_p_sample_loop_is_jitted_and_deterministic():
  d = dif.make_diffusion(respacing=8)
  shape = (2, 4, 4, 3)
  seen = []
  # A Diffusion is a pytree: it passes through jit as an argument.
  loop = jax.jit(lambda diff, key: diff.p_sample_loop(jax_toy_model, shape, key,
                                                      progress=lambda i: seen.append(int(i))))
  a, b = loop(d, jax.random.key(1)), loop(d, jax.random.key(1))
  c = loop(d, jax.random.key(2))
  jax.effects_barrier()
  assert a.shape == shape and np.all(np.isfinite(a))
  np.testing.assert_array_equal(a, b)
  assert np.max(np.abs(a - c)) > 1e-2
  assert seen[:8] == list(range(7, -1, -1)) and len(seen) == 24


@pytest.mark.parametrize("channels", [3, None])
def test_cfg_mixes_only_the_guided_channels(channels):
  num_classes = 10
  x = jnp.asarray(randn(16, (2, 2, 2, 3)), jnp.float32)
  t, y = jnp.array([5, 900]), jnp.array([1, 7])

  def apply_fn(xx, tt, yy):
    label = yy.astype(jnp.float32)[:, None, None, None]
    base = jnp.concatenate([xx, xx], axis=-1) * jnp.arange(1, 7, dtype=jnp.float32)
    return base + label + tt.astype(jnp.float32)[:, None, None, None] / 1000

  out = dif.cfg_model_fn(apply_fn, y, 4.0, num_classes, channels)(x, t)
  cond = apply_fn(x, t, y)
  uncond = apply_fn(x, t, jnp.full_like(y, num_classes))
  k = 6 if channels is None else 3
  np.testing.assert_allclose(out[..., :k], uncond[..., :k] + 4.0 * (cond[..., :k] - uncond[..., :k]), atol=1e-5)
  np.testing.assert_array_equal(out[..., k:], cond[..., k:])
  assert np.max(np.abs(out[..., :k] - cond[..., :k])) > 1.0
  scale_one = dif.cfg_model_fn(apply_fn, y, 1.0, num_classes, channels)(x, t)
  np.testing.assert_allclose(scale_one, cond, atol=1e-6)


def test_discretized_log_likelihood_approaches_density():
  # Narrow bins: the probability of a bin is about the density times its width (2/255).
  x, mean, log_scale = jnp.array([0.1, -0.3]), jnp.array([0.05, -0.2]), jnp.log(jnp.array([0.5, 0.4]))
  ll = dif.discretized_gaussian_log_likelihood(x, mean, log_scale)
  scale = np.exp(np.asarray(log_scale, np.float64))
  density = np.exp(-0.5 * ((np.asarray(x) - np.asarray(mean)) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
  np.testing.assert_allclose(ll, np.log(density * 2 / 255), atol=2e-3)
