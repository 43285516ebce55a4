"""DPM-Solver++ (multistep, data prediction) as diffusers' DPMSolverMultistepScheduler runs it for PixArt-Sigma.

The settings of PixArt-Sigma's diffusers scheduler: algorithm "dpmsolver++", solver order 2 ("midpoint" form),
20 steps, "linspace" timestep spacing, lower order at the final step, final sigma zero, over DiT's discrete VP schedule
(1000 linear betas, 1e-4 .. 0.02). Concretely:
  - the model is called at the integer steps round(linspace(0, 999, N + 1))[::-1][:-1] (999, 949, 899, ... 50 for
    N = 20), at the noise level of exactly that step;
  - step i goes from step i's noise level to step i + 1's, and the last step to sigma = 0, i.e. it returns the data
    prediction of the last model call;
  - the first step is first order (no history yet), the last is first order too (a second-order step to sigma = 0 is
    undefined, and diffusers' lower_order_final asks for it anyway), the rest second order.
PixArt's own DPM-Solver (its diffusion/model/dpm_solver.py) differs in two ways, see `PIXART_ORIGINAL_DIFFERENCES`.

Every coefficient is computed once, in float64, at construction; the loop is a `lax.scan` of
x <- a_i x + b_i m_i + c_i (m_i - m_{i-1}), with m_i the data prediction (x - sigma_i eps) / alpha_i.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from graft_jax.diffusion import guided_model_fn, linear_betas

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

PIXART_ORIGINAL_DIFFERENCES = """\
PixArt's original sampler (DPM-Solver v2 code, skip_type "time_uniform") works in continuous time t in [1/N, 1] over
the piecewise-linear interpolation of log alpha between the discrete steps (step n at t = (n + 1) / N), and calls the
model with the FLOAT time (t - 1/N) * 1000: 999, 949.05, 899.1, ... 49.95 for 20 steps, at the interpolated noise
levels. It also stops at t = 1/N (the noise level of step 0, sigma = 0.01) and returns x there instead of the last data
prediction. diffusers rounds the same linspace to integer steps (999, 949, 899, ... 50) and ends at sigma = 0. The
order pattern (first, second, ..., second, first) is the same in both."""


@struct.dataclass
class DPMSolver:
  """Per-step tables of one N-step DPM-Solver++ run; a pytree, so it can be a jit argument."""
  timesteps: jax.Array  # (N,) int32: what the model is called with
  alphas: jax.Array     # (N,) alpha at each model call (sqrt of alphas_cumprod)
  sigmas: jax.Array     # (N,) sigma at each model call (sqrt of 1 - alphas_cumprod)
  a: jax.Array          # (N,) coefficient of x
  b: jax.Array          # (N,) coefficient of the current data prediction
  c: jax.Array          # (N,) coefficient of its difference to the previous one (0 on first-order steps)
  orders: jax.Array     # (N,) int32, for inspection only

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  def data_prediction(self, model_fn: ModelFn, x: jax.Array, i: jax.Array) -> jax.Array:
    """x_0 predicted from the model's eps at step i; a learned-sigma output (2C channels) is cut to its first C."""
    t = jnp.broadcast_to(self.timesteps[i], (x.shape[0],))
    out = model_fn(x, t)
    channels = x.shape[-1]
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (channels, 2 * channels):
      raise ValueError(f"the model must return eps ({channels} channels) or eps and variance ({2 * channels}) "
                       f"in the shape of x {x.shape}, got {out.shape}")
    eps = out[..., :channels].astype(x.dtype)
    return (x - self.sigmas[i] * eps) / self.alphas[i]

  def sample(self, model_fn: ModelFn, noise: jax.Array,
             progress: Callable[[int], None] | None = None) -> jax.Array:
    """Runs every step from `noise` (the sample at the first step's noise level; DPM-Solver starts from plain
    standard normal noise, without scaling) and returns the final sample."""

    def body(carry, i):
      x, previous = carry
      if progress is not None:
        jax.debug.callback(progress, i)
      current = self.data_prediction(model_fn, x, i)
      x = self.a[i] * x + self.b[i] * current + self.c[i] * (current - previous)
      return (x, current), None

    # On the first step c = 0, so the placeholder history is never used.
    (x, _), _ = jax.lax.scan(body, (noise, jnp.zeros_like(noise)), jnp.arange(self.num_steps))
    return x


def timesteps_linspace(num_steps: int, num_train_steps: int = 1000) -> np.ndarray:
  """diffusers' "linspace" spacing: N integer steps from num_train_steps - 1 down, ending one interval above 0."""
  return np.linspace(0, num_train_steps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def make_dpm_solver(num_steps: int = 20, order: int = 2, num_train_steps: int = 1000,
                    alphas_cumprod: np.ndarray | None = None) -> DPMSolver:
  """DPM-Solver++ over DiT's linear-beta schedule (alphas_cumprod in float64), or over a given alphas_cumprod table.

  `order` 1 is DDIM in data-prediction form; 2 is PixArt-Sigma's setting."""
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}.")
  if num_steps < 1 or num_steps > num_train_steps:
    raise ValueError(f"num_steps must be between 1 and {num_train_steps}, got {num_steps}.")
  if alphas_cumprod is None:
    alphas_cumprod = np.cumprod(1.0 - linear_betas(num_train_steps))
  abar = np.asarray(alphas_cumprod, np.float64)[timesteps_linspace(num_steps, len(alphas_cumprod))]
  # Noise levels of the model calls, then the final point sigma = 0 (lambda = +inf).
  alpha = np.append(np.sqrt(abar), 1.0)
  sigma = np.append(np.sqrt(1.0 - abar), 0.0)
  lam = np.log(alpha[:-1]) - np.log(sigma[:-1])
  a, b, c = np.zeros(num_steps), np.zeros(num_steps), np.zeros(num_steps)
  orders = np.ones(num_steps, np.int64)
  for i in range(num_steps):
    if i == num_steps - 1:
      # To sigma = 0: x = x_0 prediction exactly (the general form's limit h -> inf).
      a[i], b[i] = 0.0, 1.0
      continue
    h = lam[i + 1] - lam[i]
    a[i] = sigma[i + 1] / sigma[i]
    b[i] = -alpha[i + 1] * np.expm1(-h)
    if order == 2 and i > 0:
      r = (lam[i] - lam[i - 1]) / h
      c[i] = 0.5 * b[i] / r
      orders[i] = 2
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return DPMSolver(timesteps=jnp.asarray(timesteps_linspace(num_steps, len(alphas_cumprod)), jnp.int32),
                   alphas=f32(alpha[:-1]), sigmas=f32(sigma[:-1]), a=f32(a), b=f32(b), c=f32(c),
                   orders=jnp.asarray(orders, jnp.int32))


def cfg_model_fn(apply_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any,
                 scale: float) -> ModelFn:
  """Classifier-free guidance as PixArt does it: one doubled batch (conditional inputs, then the caller's
  unconditional ones, e.g. the null caption's or the empty prompt's embeddings and mask), guided on ALL output
  channels. `cond` and `uncond` are matching pytrees with the batch on axis 0 of every leaf."""
  return guided_model_fn(apply_fn, cond, uncond, scale, channels=None)
