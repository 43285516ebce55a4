"""`job=analyze` (stage "analyze"): how local each layer's attention is, and how heavy-tailed each block's
activations are, measured on the teacher's own sampling trajectories (the paper's locality analysis).

The teacher samples `analyze.samples` images with DDIM (`analyze.steps` steps, CFG `analyze.cfg_scale`); at
`analyze.timesteps` evenly spaced steps of every trajectory the conditional pass runs once more with its
intermediates sown. From each MHA layer's operator input ("attn_in") and its q and k weights the attention matrices are
recomputed (the fused attention kernel never materialises them) and reduced to L_k (graft_jax.evaluation.locality)
for every band in `analyze.bands`; each block's input ("block_in") and attention output ("attn_out") give variance,
max |x| and the share of entries beyond `analyze.outlier_sigma` standard deviations. The most local layers at
`analyze.band` become the suggested graft layers. Writes analysis.json, analysis.md, locality.png, activations.png.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from graft_jax import hosts, pipeline
from graft_jax.diffusion import cfg_model_fn, make_diffusion
from graft_jax.evaluation import locality
from graft_jax.files import write_atomic
from graft_jax.models.config import ParallelPairSpec

ACTIVATIONS = ("block_in", "attn_out")
STAT_NAMES = ("variance", "max_abs", "outlier_share")


def activation_stats(x: jax.Array, sigma: float) -> dict[str, jax.Array]:
  """Per sample of x (B, ...): variance, max |x| and the share of entries farther than sigma standard deviations
  from the sample's mean (a Gaussian puts 2e-9 of its mass beyond 6 sigma, so any visible share is a heavy tail)."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1)
  outliers = jnp.abs(x - mean) > sigma * jnp.sqrt(var)[:, None]
  return {"variance": var, "max_abs": jnp.abs(x).max(-1), "outlier_share": outliers.mean(-1)}


def mha_heads(config) -> dict[int, int]:
  """layer -> heads for every layer whose sequence mixer is softmax attention over all tokens."""
  return {i: layer.attn.config["num_heads"] for i, layer in enumerate(config.layers) if layer.attn.name == "mha"}


def make_trajectory(model, steps: int, cfg_scale: float, guided_channels):
  """jitted fn(params, labels, key) -> (steps, B, H, W, C): the input of every DDIM step, first step first, and
  the diffusion whose timestep_map turns a step into the model's timestep."""
  cfg = model.config
  diffusion = make_diffusion(1000, f"ddim{steps}", "learned_range" if cfg.learn_sigma else "fixed_small")

  @jax.jit
  def run(params, labels, key):
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    model_fn = cfg_model_fn(apply, labels, cfg_scale, cfg.num_classes, guided_channels)

    def body(x, i):
      t = jnp.full((x.shape[0],), i, jnp.int32)
      # eta = 0: DDIM is deterministic, so the step's noise is never used.
      return diffusion.ddim_sample(model_fn, x, t, jnp.zeros_like(x)), x

    x = jax.random.normal(key, (labels.shape[0], cfg.input_size, cfg.input_size, cfg.in_channels))
    return jax.lax.scan(body, x, jnp.arange(steps - 1, -1, -1, dtype=jnp.int32))[1]
  return run, diffusion


def make_layer_stats(model, bands, distance: str, sigma: float):
  """jitted fn(params, x, t, y) -> {"locality": {layer: (B, H, K)}, name: {layer: {stat: (B,)}}} from one forward
  pass; only these reductions leave the device, never the (B, H, N, N) attention matrices."""
  cfg = model.config
  heads = mha_heads(cfg)
  masks = jnp.asarray(locality.band_masks(cfg.num_tokens, bands, distance))

  @jax.jit
  def stats(params, x, t, y):
    _, state = model.apply({"params": params}, x, t, y, mutable=["intermediates"])
    inter = state["intermediates"]
    out = {"locality": {i: locality.band_mass(locality.attention_probs(
        inter[f"blocks_{i}"]["attn_in"][0], params[f"blocks_{i}"]["attn"], h), masks) for i, h in heads.items()}}
    for name in ACTIVATIONS:
      out[name] = {i: activation_stats(inter[f"blocks_{i}"][name][0], sigma) for i in range(cfg.depth)}
    return out
  return stats


def analysed_steps(steps: int, count: int) -> np.ndarray:
  """Positions along a trajectory (0 = the first, noisiest step), `count` of them evenly spread, both ends in."""
  return np.unique(np.linspace(0, steps - 1, max(1, min(count, steps))).round().astype(int))


def collect(model, params, a) -> tuple[list[dict], np.ndarray]:
  """Per analysed trajectory position: the stats of every sample (batches concatenated); and the model timesteps."""
  trajectory, diffusion = make_trajectory(model, a.steps, a.cfg_scale, a.guided_channels)
  stats = make_layer_stats(model, tuple(a.bands), a.distance, a.outlier_sigma)
  positions = analysed_steps(a.steps, a.timesteps)
  timesteps = np.asarray(diffusion.timestep_map)[a.steps - 1 - positions]
  labels = np.random.default_rng(a.seed).integers(0, model.config.num_classes, a.samples).astype(np.int32)
  per_batch = []
  for start in range(0, a.samples, a.batch_size):
    chunk = labels[start:start + a.batch_size]
    y = jnp.asarray(np.pad(chunk, (0, a.batch_size - len(chunk))))  # one program for every batch; padding dropped
    xs = trajectory(params, y, jax.random.fold_in(jax.random.key(a.seed), start))
    rows = [stats(params, xs[p], jnp.full((a.batch_size,), t, jnp.int32), y) for p, t in zip(positions, timesteps)]
    per_batch.append(jax.tree.map(lambda v: np.asarray(v)[:len(chunk)], jax.device_get(rows)))
  merged = [jax.tree.map(lambda *vs: np.concatenate(vs), *(batch[p] for batch in per_batch))
            for p in range(len(positions))]
  return merged, timesteps


def summarise(rows: list[dict], model, a) -> list[dict]:
  """Averages over samples and timesteps (max |x| takes the maximum) into the JSON's per-layer entries."""
  bands, k = [int(b) for b in a.bands], list(a.bands).index(a.band)
  heads = mha_heads(model.config)
  layers = []
  for i, spec in enumerate(model.config.layers):
    entry = {"layer": i, "operator": spec.attn.name, "locality": None}
    if i in heads:
      loc = np.stack([r["locality"][i] for r in rows])  # (T, B, H, K)
      entry.update(locality={str(b): float(loc[..., j].mean()) for j, b in enumerate(bands)},
                   locality_per_head=loc[..., k].mean((0, 1)).tolist(),
                   locality_by_timestep=loc[..., k].mean((1, 2)).tolist())
    entry["activations"] = {}
    for name in ACTIVATIONS:
      s = {stat: np.stack([r[name][i][stat] for r in rows]) for stat in STAT_NAMES}
      entry["activations"][name] = {"variance": float(s["variance"].mean()), "max_abs": float(s["max_abs"].max()),
                                    "outlier_share": float(s["outlier_share"].mean())}
    layers.append(entry)
  return layers


def uniform_locality(n: int, bands, distance: str) -> dict[str, float]:
  """L_k of attention spread evenly over all tokens: the score of a layer with no locality at all."""
  masks = locality.band_masks(n, bands, distance)
  return {str(b): float(m.sum() / (n * n)) for b, m in zip(bands, masks)}


def stage_analyze(config, workdir: pathlib.Path) -> dict:
  a = config.analyze
  if a.band not in a.bands:
    raise pipeline.UserError(f"analyze.band ({a.band}) must be one of analyze.bands {list(a.bands)}.")
  if a.distance not in locality.DISTANCES:
    raise pipeline.UserError(f"analyze.distance must be one of {locality.DISTANCES}, got {a.distance!r}.")
  model, params = pipeline.load_teacher(config)
  if any(isinstance(layer, ParallelPairSpec) for layer in model.config.layers):
    raise pipeline.UserError("analyze needs a sequential DiT; this model has parallel pairs.")
  if not mha_heads(model.config):
    raise pipeline.UserError("analyze found no layer with full softmax attention (mha) to measure.")
  rows, timesteps = collect(model, params, a)
  layers = summarise(rows, model, a)
  band = str(a.band)
  scores = [None if e["locality"] is None else e["locality"][band] for e in layers]
  suggested = locality.suggest_layers(scores, a.suggest_fraction, a.suggest_count)
  rule = (f"the {a.suggest_count} layers" if a.suggest_count > 0 else f"the top {a.suggest_fraction:.0%} of layers") \
      + f" with the highest L_{a.band}"
  result = {
      "teacher": config.model.checkpoint or config.model.preset, "tokens": model.config.num_tokens,
      "distance": a.distance, "bands": [int(b) for b in a.bands], "band": int(a.band),
      "samples": int(a.samples), "sampler": {"name": "ddim", "steps": int(a.steps), "cfg_scale": float(a.cfg_scale)},
      "timesteps": [int(t) for t in timesteps],
      "note": "attention of the conditional pass at the trajectory's states; L_k averaged over heads, samples and "
              "the analysed timesteps; activation variance and outlier share averaged per sample, max |x| the max",
      "uniform_locality": uniform_locality(model.config.num_tokens, a.bands, a.distance),
      "layers_over_half": sum(s is not None and s > 0.5 for s in scores),
      "layers": layers,
      "suggested": {"layers": suggested, "rule": rule, "plan_entry": {"site": "attn", "layers": suggested}},
  }
  if hosts.is_writer():  # with several processes each analyses the same samples; process 0 writes
    write_atomic(workdir / "analysis.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    write_atomic(workdir / "analysis.md", lambda f: f.write(render(result).encode()))
    plot(result, workdir)
  print(render(result), flush=True)
  return {"analysis": "analysis.json", "suggested_layers": suggested}


def render(r: dict) -> str:
  k = r["band"]
  lines = [f"# Attention locality and activations of {r['teacher']}", "",
           f"{r['samples']} samples, DDIM {r['sampler']['steps']} steps, CFG {r['sampler']['cfg_scale']}, analysed at "
           f"timesteps {r['timesteps']}; {r['tokens']} tokens, {r['distance']} distance. {r['note']}.", "",
           "| layer | operator | " + " | ".join(f"L_{b}" for b in r["bands"]) +
           " | block_in var | block_in max abs | block_in outliers | attn_out var | attn_out outliers |",
           "|---|---|" + "---|" * (len(r["bands"]) + 5)]
  for e in r["layers"]:
    loc = " | ".join("-" if e["locality"] is None else f"{e['locality'][str(b)]:.3f}" for b in r["bands"])
    x, o = e["activations"]["block_in"], e["activations"]["attn_out"]
    lines.append(f"| {e['layer']} | {e['operator']} | {loc} | {x['variance']:.3g} | {x['max_abs']:.3g} | "
                 f"{x['outlier_share']:.2e} | {o['variance']:.3g} | {o['outlier_share']:.2e} |")
  lines += ["", f"Uniform attention would score L_{k} = {r['uniform_locality'][str(k)]:.3f}. "
            f"{r['layers_over_half']} layer(s) keep more than half their attention mass within {k} tokens "
            f"(DiT-XL/2 in the paper: 15 of 28 at k = 32).", "",
            f"Suggested layers to graft ({r['suggested']['rule']}): {r['suggested']['layers']}.", "",
            "The paper found the most local half a worse choice than interleaved layers for Hyena-X (FID 3.02 vs "
            "2.74), so treat this as one candidate plan to compare, not a replacement for the interleaved default.",
            "", "Plots: locality.png, activations.png.", ""]
  return "\n".join(lines)


def plot(r: dict, workdir: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  def save(fig, name):
    write_atomic(workdir / name, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

  measured = [e for e in r["layers"] if e["locality"] is not None]
  fig, ax = plt.subplots(figsize=(8, 4))
  for b in r["bands"]:
    line, = ax.plot([e["layer"] for e in measured], [e["locality"][str(b)] for e in measured], "o-", label=f"k={b}")
    ax.axhline(r["uniform_locality"][str(b)], color=line.get_color(), ls=":", lw=0.8)
  picked = [e for e in measured if e["layer"] in r["suggested"]["layers"]]
  ax.scatter([e["layer"] for e in picked], [e["locality"][str(r["band"])] for e in picked], s=120,
             facecolors="none", edgecolors="k", label=f"suggested (L_{r['band']})")
  ax.set(title="attention locality L_k per layer (dotted: uniform attention)", xlabel="layer", ylabel="L_k",
         ylim=(0, 1.02))
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=8)
  fig.tight_layout()
  save(fig, "locality.png")

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  layer_ids = [e["layer"] for e in r["layers"]]
  for ax, stat in zip(axes, STAT_NAMES):
    for name in ACTIVATIONS:
      ax.plot(layer_ids, [e["activations"][name][stat] for e in r["layers"]], "o-", label=name)
    ax.set(title=stat.replace("_", " "), xlabel="layer")
    # Outlier shares can be exactly zero, which a log axis cannot show; symlog is linear below 1e-6.
    if stat == "outlier_share":
      ax.set_yscale("symlog", linthresh=1e-6)
      ax.set_ylim(bottom=0)
    else:
      ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
  fig.tight_layout()
  save(fig, "activations.png")


STAGES = {"analyze": stage_analyze}
