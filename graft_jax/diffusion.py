"""DiT's Gaussian diffusion (ADM's GaussianDiffusion as DiT configures it) in JAX.

Schedules are computed in float64 NumPy and stored as float32 arrays, as ADM does. Every method takes `t` as an index
into this diffusion's own (possibly respaced) tables; the model is always called with the ORIGINAL 1000-step value
`timestep_map[t]`. Models are `model_fn(x, t) -> output` on NHWC arrays, output [eps, v] on the last axis (2C
channels) with learned-range variance, or eps alone (C channels) with a fixed variance.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
VARIANCES = ("learned_range", "fixed_small", "fixed_large")


def linear_betas(num_steps: int) -> np.ndarray:
  """ADM's linear schedule, stretched so that any step count spans the same noise levels as 1000 steps."""
  scale = 1000.0 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def _sections(num_steps: int, counts: Sequence[int]) -> list[int]:
  """Steps kept when each of len(counts) equal sections keeps counts[i] evenly spread steps, its ends included."""
  base, extra = divmod(num_steps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = base + (i < extra)
    if not 1 <= count <= size:
      raise ValueError(f"cannot keep {count} steps out of a section of {size}")
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      # ADM accumulates the stride; a running sum can round differently from i * stride, so do the same.
      position += stride
    start += size
  return kept


def space_timesteps(num_steps: int, respacing: int | str | None) -> list[int]:
  """Sorted original steps kept by ADM's `space_timesteps`: None (all), K or "K,K,..." (sections), "ddimK" (stride)."""
  if respacing is None:
    return list(range(num_steps))
  if isinstance(respacing, str) and respacing.startswith("ddim"):
    count = int(respacing[len("ddim"):])
    for stride in range(1, num_steps):
      if len(range(0, num_steps, stride)) == count:
        return list(range(0, num_steps, stride))
    raise ValueError(f"no integer stride takes exactly {count} steps out of {num_steps}")
  counts = [respacing] if isinstance(respacing, int) else [int(c) for c in respacing.split(",")]
  return _sections(num_steps, counts)


@struct.dataclass
class Diffusion:
  """Precomputed float32 tables of one (possibly respaced) diffusion; a pytree, so it can be a jit argument."""
  betas: jax.Array
  log_betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  fixed_log_variance: jax.Array
  timestep_map: jax.Array
  variance: str = struct.field(pytree_node=False, default="learned_range")

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]

  @property
  def learn_sigma(self) -> bool:
    return self.variance == "learned_range"

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0) with the given standard normal noise."""
    return _take(self.sqrt_alphas_cumprod, t, x0) * x0 + _take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

  def q_posterior(self, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    mean = _take(self.posterior_mean_coef1, t, x_t) * x0 + _take(self.posterior_mean_coef2, t, x_t) * x_t
    return mean, _take(self.posterior_variance, t, x_t), _take(self.posterior_log_variance_clipped, t, x_t)

  def predict_x0(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return _take(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _take(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

  def predict_eps(self, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    return (_take(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _take(self.sqrt_recipm1_alphas_cumprod, t, x_t)

  def model_output(self, model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """The model called with the original step values, checked for the channel count the variance type needs."""
    out = model_fn(x, self.timestep_map[t])
    channels = x.shape[-1] * (2 if self.learn_sigma else 1)
    if out.shape != x.shape[:-1] + (channels,):
      raise ValueError(f"variance {self.variance!r} needs a model output of shape {x.shape[:-1] + (channels,)}, "
                       f"got {out.shape}")
    return out

  def p_mean_variance(self, output: jax.Array, x_t: jax.Array, t: jax.Array,
                      clip_denoised: bool = False) -> dict[str, jax.Array]:
    """Mean and log variance of p(x_{t-1} | x_t) from a model output, and the x_0 it predicts."""
    channels = x_t.shape[-1]
    eps = output[..., :channels]
    if self.learn_sigma:
      min_log = _take(self.posterior_log_variance_clipped, t, x_t)
      max_log = _take(self.log_betas, t, x_t)
      frac = (output[..., channels:] + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
    else:
      log_variance = jnp.broadcast_to(_take(self.fixed_log_variance, t, x_t), x_t.shape)
    pred_x0 = self.predict_x0(x_t, t, eps)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1, 1)
    mean, _, _ = self.q_posterior(pred_x0, x_t, t)
    return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0}

  def training_losses(self, model_fn: ModelFn, x0: jax.Array, t: jax.Array,
                      noise: jax.Array) -> dict[str, jax.Array]:
    """Per-example eps MSE, variational bound in bits (learned variance only; zero otherwise) and their sum."""
    x_t = self.q_sample(x0, t, noise)
    out = self.model_output(model_fn, x_t, t)
    eps = out[..., :x0.shape[-1]]
    mse = _mean_flat((noise - eps) ** 2)
    if not self.learn_sigma:
      vb = jnp.zeros_like(mse)
    else:
      # The bound trains only the variance: the mean is left to the MSE, as in ADM's hybrid loss.
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., x0.shape[-1]:]], axis=-1)
      vb = self.vb_bits(frozen, x0, x_t, t)
    return {"loss": mse + vb, "mse": mse, "vb": vb}

  def vb_bits(self, output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """One term of the variational bound in bits: KL(q || p) for t > 0, the decoder NLL at t == 0."""
    true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
    p = self.p_mean_variance(output, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def p_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, noise: jax.Array,
               clip_denoised: bool = False) -> jax.Array:
    """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0."""
    p = self.p_mean_variance(self.model_output(model_fn, x, t), x, t, clip_denoised)
    return p["mean"] + _nonzero(t, x) * jnp.exp(0.5 * p["log_variance"]) * noise

  def ddim_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, noise: jax.Array, eta: float = 0.0,
                  clip_denoised: bool = False) -> jax.Array:
    """One DDIM step x_t -> x_{t-1} (ADM's form: eps re-derived from the possibly clipped x_0)."""
    p = self.p_mean_variance(self.model_output(model_fn, x, t), x, t, clip_denoised)
    eps = self.predict_eps(x, t, p["pred_x0"])
    abar, abar_prev = _take(self.alphas_cumprod, t, x), _take(self.alphas_cumprod_prev, t, x)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
    # Clamped because float32 rounding can push this exact-zero-at-eta-1 quantity slightly negative.
    direction = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma ** 2, 0.0))
    mean = p["pred_x0"] * jnp.sqrt(abar_prev) + direction * eps
    return mean + _nonzero(t, x) * sigma * noise

  def p_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], key: jax.Array,
                    progress: Callable[[int], None] | None = None, noise: jax.Array | None = None,
                    clip_denoised: bool = False) -> jax.Array:
    """Ancestral sampling from pure noise (`noise`, or drawn from `key`) down to x_0."""
    step = lambda x, t, z: self.p_sample(model_fn, x, t, z, clip_denoised)
    return self._loop(step, shape, key, progress, noise)

  def ddim_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], key: jax.Array, eta: float = 0.0,
                       progress: Callable[[int], None] | None = None, noise: jax.Array | None = None,
                       clip_denoised: bool = False) -> jax.Array:
    """DDIM sampling over this diffusion's steps (respace with "ddimK" for the usual strided schedule)."""
    step = lambda x, t, z: self.ddim_sample(model_fn, x, t, z, eta, clip_denoised)
    return self._loop(step, shape, key, progress, noise)

  def _loop(self, step: Callable, shape: Sequence[int], key: jax.Array,
            progress: Callable[[int], None] | None, noise: jax.Array | None) -> jax.Array:
    """Runs `step` from the last index down to 0 in one scan; the n-th step taken draws its noise from the n-th key
    of a fixed split of `key`, so a key always gives the same samples."""
    init_key, step_keys = jax.random.split(key)
    x = jax.random.normal(init_key, tuple(shape), jnp.float32) if noise is None else noise
    indices = jnp.arange(self.num_steps - 1, -1, -1, dtype=jnp.int32)

    def body(x, scan_in):
      i, step_key = scan_in
      if progress is not None:
        jax.debug.callback(progress, i)
      t = jnp.full((x.shape[0],), i, jnp.int32)
      return step(x, t, jax.random.normal(step_key, x.shape, x.dtype)), None

    x, _ = jax.lax.scan(body, x, (indices, jax.random.split(step_keys, self.num_steps)))
    return x


def make_diffusion(num_steps: int = 1000, respacing: int | str | None = None,
                   variance: str = "learned_range") -> Diffusion:
  """DiT's diffusion: linear betas over `num_steps`, optionally respaced; model output layout set by `variance`."""
  if variance not in VARIANCES:
    raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
  full_abar = np.cumprod(1.0 - linear_betas(num_steps))
  kept = space_timesteps(num_steps, respacing)
  abar = full_abar[kept]
  abar_prev = np.append(1.0, abar[:-1])
  # Respaced betas make the kept steps' cumulative products equal the original ones.
  betas = 1.0 - abar / abar_prev
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  # Posterior variance is 0 at t=0; ADM substitutes the t=1 value so its log stays finite.
  posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  fixed_log_variance = {
      "learned_range": posterior_log_variance,
      "fixed_small": posterior_log_variance,
      "fixed_large": np.log(np.append(posterior_variance[1], betas[1:])),
  }[variance]
  tables = {
      "betas": betas,
      "log_betas": np.log(betas),
      "alphas_cumprod": abar,
      "alphas_cumprod_prev": abar_prev,
      "sqrt_alphas_cumprod": np.sqrt(abar),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
      "posterior_variance": posterior_variance,
      "posterior_log_variance_clipped": posterior_log_variance,
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
      "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
      "fixed_log_variance": fixed_log_variance,
  }
  return Diffusion(**{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()},
                   timestep_map=jnp.asarray(kept, jnp.int32), variance=variance)


def cfg_model_fn(apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], y: jax.Array, scale: float,
                 num_classes: int, channels: int | None = 3) -> ModelFn:
  """Classifier-free guidance around `apply_fn(x, t, y)`: one doubled batch (labels y, then the null label
  `num_classes`); eps = uncond + scale * (cond - uncond) on the first `channels` output channels (3 is DiT's official
  choice; None guides all), every other channel taken from the conditional half."""
  return guided_model_fn(apply_fn, y, jnp.full_like(y, num_classes), scale, channels)


def guided_model_fn(apply_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any,
                    scale: float, channels: int | None = 3) -> ModelFn:
  """Classifier-free guidance around `apply_fn(x, t, context)`: one doubled batch (the conditional context, then the
  unconditional one; matching pytrees with the batch on axis 0 of every leaf), guided on `channels` (see `guide`).
  At scale 1 guidance is the conditional output itself, so the unconditional half is not computed."""
  if scale == 1.0:
    return lambda x, t: apply_fn(x, t, cond)

  def model_fn(x, t):
    context = jax.tree.map(lambda u, v: jnp.concatenate([u, v]), cond, uncond)
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), context)
    return guide(*jnp.split(out, 2), scale, channels)
  return model_fn


def guide(cond: jax.Array, uncond: jax.Array, scale: float, channels: int | None = 3) -> jax.Array:
  """uncond + scale * (cond - uncond) on the first `channels` channels (None: all); the rest from `cond`."""
  k = cond.shape[-1] if channels is None else channels
  guided = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
  return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """ADM's tanh approximation of the standard normal CDF (kept, rather than erf, to match its bound exactly)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """Log probability of x in [-1, 1] under a Gaussian discretised into 256 bins, the outer bins open-ended."""
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _take(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """table[t] shaped (B, 1, ..., 1) to broadcast against x."""
  return table[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _nonzero(t: jax.Array, x: jax.Array) -> jax.Array:
  return (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))
