"""job=analyze: L_k against brute force on hand-built attention, the layer suggestion, and the shrunk job's output."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli import ROOT, load_config, run_main
from graft_jax.evaluation import analysis, locality
from graft_jax.operators.attention import MultiHeadAttention


def brute_force_locality(probs: np.ndarray, k: int, grid: bool) -> float:
  """(1/N) sum_ij A_ij [dist(i, j) <= k] with explicit loops, for one (N, N) matrix."""
  n = probs.shape[0]
  side = int(round(np.sqrt(n)))
  total = 0.0
  for i in range(n):
    for j in range(n):
      d = max(abs(i // side - j // side), abs(i % side - j % side)) if grid else abs(i - j)
      total += probs[i, j] * (d <= k)
  return total / n


@pytest.mark.parametrize("distance", locality.DISTANCES)
def test_band_mass_matches_brute_force(distance):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 16, 16)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  bands = (0, 1, 3, 15)
  got = np.asarray(locality.band_mass(jnp.asarray(probs), jnp.asarray(locality.band_masks(16, bands, distance))))
  want = np.array([[[brute_force_locality(probs[b, h], k, distance == "grid") for k in bands] for h in range(3)]
                   for b in range(2)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.allclose(got[..., -1], 1.0)  # every key lies within N - 1 of every query


def test_uniform_attention_has_the_closed_form_locality():
  n, k = 256, 32
  pairs = n + 2 * sum(n - d for d in range(1, k + 1))  # |i - j| <= k on a sequence of n
  assert analysis.uniform_locality(n, (k,), "flat")[str(k)] == pytest.approx(pairs / n ** 2)


def test_attention_probs_are_the_matrix_mha_applies():
  """softmax(q k^T) from the operator's input and its q, k params, applied to v and projected, gives the module's own
  output: the parameter names and the head split match MultiHeadAttention."""
  dim, heads, n = 16, 2, 12
  module = MultiHeadAttention(dim, num_heads=heads, backend="xla")
  x = jax.random.normal(jax.random.key(0), (2, n, dim))
  params = module.init(jax.random.key(1), x)["params"]
  probs = locality.attention_probs(x, params, heads)
  assert probs.shape == (2, heads, n, n)
  v = (x @ params["v"]["kernel"] + params["v"]["bias"]).reshape(2, n, heads, -1)
  y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, n, dim)
  want = module.apply({"params": params}, x)
  np.testing.assert_allclose(y @ params["proj"]["kernel"] + params["proj"]["bias"], want, atol=1e-5)


def hand_built_attention(n: int, sharpness: float) -> tuple[jax.Array, dict]:
  """One head on n tokens whose logits are -sharpness * (i - j)^2 * sqrt(d): q_i = [2i, -i^2, 1] and
  k_j = [j, 1, -j^2] give q_i . k_j = -(i - j)^2. Token i's input is [i, i^2, 1]; the q and k kernels map it."""
  pos = np.arange(n, dtype=np.float64)
  x = np.stack([pos, pos ** 2, np.ones(n)], -1)[None]  # (1, n, 3)
  d = 3
  c = sharpness * np.sqrt(d)
  wq = c * np.array([[2, 0, 0], [0, -1, 0], [0, 0, 1]], np.float64)  # rows: input features; cols: q features
  wk = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64)
  linear = lambda w: {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.zeros(d)}
  return jnp.asarray(x, jnp.float32), {"q": linear(wq), "k": linear(wk)}


def test_locality_of_hand_built_attention():
  n = 16
  x, attn = hand_built_attention(n, sharpness=50.0)  # so sharp that each token attends only to itself
  probs = locality.attention_probs(x, attn, 1)
  np.testing.assert_allclose(np.asarray(probs[0, 0]), np.eye(n), atol=1e-6)
  masks = jnp.asarray(locality.band_masks(n, (0, 1, 4), "flat"))
  np.testing.assert_allclose(locality.band_mass(probs, masks)[0, 0], [1.0, 1.0, 1.0], atol=1e-6)

  x, attn = hand_built_attention(n, sharpness=0.3)  # a soft Gaussian band: mass leaks past k = 0 and 1
  probs = np.asarray(locality.attention_probs(x, attn, 1)[0, 0], np.float64)
  d2 = (np.arange(n)[:, None] - np.arange(n)[None, :]) ** 2
  want = np.exp(-0.3 * d2) / np.exp(-0.3 * d2).sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, want, atol=1e-4)
  got = locality.band_mass(jnp.asarray(probs)[None], masks)[0]
  np.testing.assert_allclose(got, [brute_force_locality(probs, k, False) for k in (0, 1, 4)], atol=1e-5)
  assert 0.3 < got[0] < got[1] < got[2] < 1.0


def test_suggest_layers():
  scores = [0.1, 0.9, None, 0.5, 0.7]
  assert locality.suggest_layers(scores, 0.5) == [1, 4]  # half of the 4 measured layers, in layer order
  assert locality.suggest_layers(scores, 0.5, count=3) == [1, 3, 4]
  assert locality.suggest_layers(scores, 0.01) == [1]  # at least one
  assert locality.suggest_layers(scores, 1.0, count=9) == [0, 1, 3, 4]  # never a layer without attention
  assert locality.suggest_layers([0.5, 0.5, 0.5], 0.5) == [0, 1]  # ties: earlier layers; round(1.5) = 2
  assert locality.suggest_layers([None, None], 0.5) == []


def test_activation_stats_count_outliers():
  x = np.zeros((2, 10, 100), np.float32)
  x[0, 3, 7] = 1000.0  # one spike in 1000 entries lies far beyond 6 sigma of its sample
  x[1] = np.random.default_rng(0).normal(size=(10, 100))
  s = jax.tree.map(np.asarray, analysis.activation_stats(jnp.asarray(x), 6.0))
  np.testing.assert_allclose(s["outlier_share"], [1e-3, 0.0])
  np.testing.assert_allclose(s["max_abs"], [1000.0, np.abs(x[1]).max()], rtol=1e-6)
  np.testing.assert_allclose(s["variance"], [x[0].var(), x[1].var()], rtol=1e-4)


def test_analyze_config_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="shrink"):
    load_config("analyze", "ratio=50")
  assert load_config("analyze").analyze.band in load_config("analyze").analyze.bands


def test_shrunk_analyze_job(tmp_path):
  proc = run_main(f"--config={ROOT}/configs/analyze.py:shrink=1", f"--workdir={tmp_path}/run", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  for name in ("analysis.json", "analysis.md", "locality.png", "activations.png", "stages/analyze.json"):
    assert (run / name).exists(), name
  r = json.loads((run / "analysis.json").read_text())
  assert r["bands"] == [2, 4, 8] and r["band"] == 4 and r["tokens"] == 64 and r["samples"] == 4
  assert len(r["timesteps"]) == 2 and r["timesteps"][-1] == 0  # the first and the last DDIM step
  assert [e["layer"] for e in r["layers"]] == [0, 1, 2, 3]
  for e in r["layers"]:
    values = [e["locality"][str(k)] for k in r["bands"]]
    assert all(0 < v <= 1 for v in values) and values == sorted(values)  # a wider band holds more mass
    assert len(e["locality_per_head"]) == 2 and len(e["locality_by_timestep"]) == 2
    for name in analysis.ACTIVATIONS:
      stats = e["activations"][name]
      assert stats["variance"] > 0 and stats["max_abs"] > 0 and 0 <= stats["outlier_share"] <= 1
  scores = [e["locality"]["4"] for e in r["layers"]]
  assert r["suggested"]["layers"] == locality.suggest_layers(scores, 0.5) and len(r["suggested"]["layers"]) == 2
  assert r["suggested"]["plan_entry"] == {"site": "attn", "layers": r["suggested"]["layers"]}
  assert r["layers_over_half"] == sum(s > 0.5 for s in scores)
  assert "Suggested layers" in (run / "analysis.md").read_text()
