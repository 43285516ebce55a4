"""What a layer keeps for its backward pass (config `remat`: one of REMAT, or elementwise with SITE_INPUTS added).

- none: everything autodiff saves. In bf16 a DiT layer then keeps six tensors of 4 x width per token (fc1's
  output, the tanh GELU's intermediates and its output) and float32 LayerNorm intermediates: the batch-256
  DiT-XL/2 step peaks at 101 GB on an H200.
- elementwise: matmul outputs, cuDNN attention's outputs (with its softmax statistics, so the backward kernel runs
  without a second forward) and the results tagged `kept` (the GELU output, and on the MLP's Hopper kernels its
  derivative; LayerNorm's per-token statistics; attention's q with its bias; a DiT block's residual sum after
  attention, which the MLP norm's backward reads). Norms, modulation, the other residual adds and, on XLA's MLP,
  the GELU's derivative are recomputed inside the backward fusions that read their inputs anyway (the same step:
  77 GB, the benchmark holding a float32 copy of the parameters besides).
- elementwise+attn_in, elementwise+mlp_in, elementwise+attn_in+mlp_in: also the input of that operator site (a
  block's normalised, modulated activations, `site_input`), which the site's weight gradients read whole: the
  backward then reads it where `elementwise` runs the norm again. Width values a token a layer each (DiT-XL/2's
  batch-256 step: 151 MB a site a layer, 4.2 GB over 28 layers).
- dots: matmul outputs only; attention and all elementwise work are recomputed.
- full: only the layer's input.
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

REMAT = ("none", "elementwise", "dots", "full")
SITE_INPUTS = ("attn_in", "mlp_in")  # what `elementwise+NAME` keeps besides (`site_input`)
_KEPT = "kept"
# The primitives jax.nn.dot_product_attention binds for cuDNN's forward kernel (jax/_src/cudnn). Should JAX rename
# them, attention is recomputed in the backward pass: slower, still correct.
_CUDNN_ATTENTION = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")


def kept(x: jax.Array) -> jax.Array:
  """Tags x as worth saving under `elementwise` remat: an attention output (XLA's softmax attention is not a plain
  matmul) or a tensor a matmul's backward reads whole (the GELU output, fc2's input), which recomputing would only
  write out again."""
  return checkpoint_name(x, _KEPT)


def site_input(x: jax.Array, site: str) -> jax.Array:
  """Tags an operator site's input ("attn" or "mlp") for `elementwise+{site}_in`."""
  return checkpoint_name(x, f"{site}_in")


def parse(remat: str) -> tuple[str, tuple[str, ...]]:
  """A remat value as (one of REMAT, the SITE_INPUTS it adds); a ValueError in one sentence otherwise."""
  base, *inputs = remat.split("+")
  if base not in REMAT:
    raise ValueError(f"remat {remat!r} is not one of {', '.join(REMAT)}.")
  if inputs and (base != "elementwise" or len(set(inputs)) < len(inputs) or not set(inputs) <= set(SITE_INPUTS)):
    raise ValueError(f"remat {remat!r}: only elementwise takes additions, each once, from {', '.join(SITE_INPUTS)} "
                     "(e.g. elementwise+mlp_in).")
  return base, tuple(inputs)


def _cudnn_attention(prim, *_, **__) -> bool:
  return prim.name in _CUDNN_ATTENTION


def policy(remat: str):
  """The jax.checkpoint policy of a remat value other than "none" (None = save nothing but the inputs)."""
  base, inputs = parse(remat)
  policies = jax.checkpoint_policies
  dots = policies.dots_with_no_batch_dims_saveable
  elementwise = policies.save_from_both_policies(
      policies.save_from_both_policies(dots, policies.save_only_these_names(_KEPT, *inputs)), _cudnn_attention)
  return {"elementwise": elementwise, "dots": dots, "full": None}[base]
