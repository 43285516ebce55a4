"""DPM-Solver++ against diffusers' DPMSolverMultistepScheduler (PixArt-Sigma's settings), driven by a toy model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from graft_jax.samplers import dpm_solver as dpm  # noqa: E402

# diffusers' set_timesteps trips a NumPy 2 deprecation of its own; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (2, 4, 4, 4)
MU, STD = 0.3, 0.5  # the toy data distribution N(MU, STD^2) per element
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def scheduler(num_steps):
  s = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            lower_order_final=True, prediction_type="epsilon")
  s.set_timesteps(num_steps)
  return s


def toy_eps(x, t, wobble=0.05):
  """The exact eps of Gaussian data at step t (a linear function of x), plus a small nonlinear t-dependent term."""
  abar = ABAR[np.asarray(t)].reshape(-1, 1, 1, 1)
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  phase = np.sin(np.asarray(t, np.float64) / 137.0).reshape(-1, 1, 1, 1)
  return sigma * (x - alpha * MU) / (abar * STD ** 2 + 1 - abar) + wobble * phase * np.tanh(x)


def jax_toy_eps(x, t, wobble=0.05):
  abar = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, 1, 1, 1)
  alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1 - abar)
  phase = jnp.sin(t.astype(jnp.float32) / 137.0).reshape(-1, 1, 1, 1)
  return sigma * (x - alpha * MU) / (abar * STD ** 2 + 1 - abar) + wobble * phase * jnp.tanh(x)


def diffusers_sample(num_steps, x_T):
  s = scheduler(num_steps)
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(x_T, (0, 3, 1, 2))))
  seen = []
  for t in s.timesteps:
    seen.append(int(t))
    eps = toy_eps(np.transpose(x.numpy(), (0, 2, 3, 1)).astype(np.float64), [int(t)] * x.shape[0])
    eps = torch.from_numpy(np.ascontiguousarray(np.transpose(eps, (0, 3, 1, 2)).astype(np.float32)))
    x = s.step(eps, t, x).prev_sample
  return np.transpose(x.numpy(), (0, 2, 3, 1)).astype(np.float64), seen, s


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def run():
  return jax.jit(lambda solver, x: solver.sample(jax_toy_eps, x))


@pytest.mark.parametrize("num_steps", [20, 1, 2])
def test_matches_diffusers(run, num_steps):
  x_T = np.random.default_rng(num_steps).standard_normal(SHAPE).astype(np.float32)
  ref, seen, s = diffusers_sample(num_steps, x_T)
  np.testing.assert_array_equal(dpm.timesteps_linspace(num_steps), seen)
  # diffusers forms alphas_cumprod by a float32 cumprod (about 1e-4 off at t = 999); on ITS table the solver agrees
  # to float32 rounding, on the float64 table (the default, as DiT and PixArt's own code build it) to about 1e-4.
  same_table = dpm.make_dpm_solver(num_steps, alphas_cumprod=s.alphas_cumprod.numpy())
  np.testing.assert_array_equal(same_table.timesteps, seen)
  # With one or two steps the result is (x - sigma eps) / alpha at step 999 (alpha = 0.0064): the float32 rounding of
  # the two toy models' eps (about one ulp apart) is magnified some 150-fold there, hence the looser bound.
  assert rel_err(run(same_table, jnp.asarray(x_T)), ref) < (1e-5 if num_steps >= 20 else 3e-5)
  assert rel_err(run(dpm.make_dpm_solver(num_steps), jnp.asarray(x_T)), ref) < 1e-3


def test_pixart_sigma_schedule():
  solver = dpm.make_dpm_solver()
  assert list(np.asarray(solver.timesteps)) == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350,
                                                300, 250, 200, 150, 100, 50]
  assert list(np.asarray(solver.orders)) == [1] + [2] * 18 + [1]
  np.testing.assert_allclose(solver.sigmas, np.sqrt(1 - ABAR[np.asarray(solver.timesteps)]), rtol=1e-6)
  for n in (1, 2, 7, 50):
    np.testing.assert_array_equal(dpm.timesteps_linspace(n), scheduler(n).timesteps.numpy())
  assert list(np.asarray(dpm.make_dpm_solver(2).orders)) == [1, 1]
  with pytest.raises(ValueError):
    dpm.make_dpm_solver(order=3)


def test_converges_to_the_exact_ode_solution(run):
  # Without the wobble the model is the exact eps of N(MU, STD^2) data: the probability-flow ODE maps x at step 999
  # to MU + STD * (x - alpha MU) / sqrt(alpha^2 STD^2 + sigma^2).
  x_T = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE), jnp.float32)
  exact_run = jax.jit(lambda solver, x: solver.sample(lambda xx, t: jax_toy_eps(xx, t, 0.0), x))
  abar = ABAR[999]
  exact = MU + STD * (np.asarray(x_T, np.float64) - np.sqrt(abar) * MU) / np.sqrt(abar * STD ** 2 + 1 - abar)
  errors = {n: rel_err(exact_run(dpm.make_dpm_solver(n), x_T), exact) for n in (10, 20, 50)}
  # 20 time-uniform steps leave about 4% (the first steps are long in log-SNR); the error falls fast with more.
  assert errors[10] > errors[20] > errors[50] and errors[50] < 1e-3
  first_order = rel_err(exact_run(dpm.make_dpm_solver(20, order=1), x_T), exact)
  assert errors[20] < 0.5 * first_order


def test_learned_sigma_output_and_guidance(run):
  solver = dpm.make_dpm_solver(4)
  x_T = jnp.asarray(np.random.default_rng(4).standard_normal(SHAPE), jnp.float32)
  with_variance = lambda x, t: jnp.concatenate([jax_toy_eps(x, t), jnp.full_like(x, 7.0)], axis=-1)
  np.testing.assert_array_equal(run(solver, x_T), jax.jit(lambda s, x: s.sample(with_variance, x))(solver, x_T))
  with pytest.raises(ValueError, match="eps"):
    solver.sample(lambda x, t: x[..., :3], x_T)

  # CFG on all channels, the caller's unconditional context in the second half of one doubled batch.
  seen = []

  def apply_fn(x, t, context):
    emb, mask = context
    seen.append(x.shape[0])
    shift = (emb * mask[..., None]).sum(axis=(1, 2))[:, None, None, None]
    out = jax_toy_eps(x, t) + 0.1 * shift
    return jnp.concatenate([out, 2 * out], axis=-1)

  cond = (jnp.ones((2, 3, 5)), jnp.array([[1, 1, 0], [1, 0, 0]]))
  uncond = (jnp.zeros((2, 3, 5)), jnp.array([[1, 0, 0], [1, 0, 0]]))
  t = jnp.array([999, 999])
  guided, c_out, u_out = jax.jit(lambda x: (dpm.cfg_model_fn(apply_fn, cond, uncond, 4.5)(x, t),
                                            apply_fn(x, t, cond), apply_fn(x, t, uncond)))(x_T)
  np.testing.assert_allclose(guided, u_out + 4.5 * (c_out - u_out), rtol=1e-5, atol=1e-5)
  assert seen[0] == 4
  sample = jax.jit(lambda s, x: s.sample(dpm.cfg_model_fn(apply_fn, cond, uncond, 4.5), x))(solver, x_T)
  assert sample.shape == SHAPE and np.all(np.isfinite(sample))
