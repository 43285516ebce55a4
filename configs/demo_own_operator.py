"""Graft an operator of your own: the demo (configs/demo.py) with its odd attention layers swapped for the linear
attention defined below, a sequence mixer the package does not ship.

python -m graft_jax.main --config=configs/demo_own_operator.py --workdir=runs/own
Arguments: shrink=1 (a few steps of everything: the test's version).

Registering is all an operator needs: a Flax module mapping (B, N, D) -> (B, N, D), built as Module(dim=D,
**options), with its site ("attn" for a sequence mixer, "mlp" for a channel mixer), its options' defaults and a
forward FLOP formula for the graft summary. Defining it here registers it whenever this config is loaded; code
that loads the exported student elsewhere (`checkpoints.load`) imports this file, or the module holding the
operator, first.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from graft_jax import operators
from graft_jax.experiment import demo_experiment, parse_arg
from graft_jax.operators import flops
from graft_jax.operators.init import dense


def linear_attention_flops(config, dim, tokens):
  """q, k, v and output projections, plus each head's (d_h x d_h) key-value summary and its readout per token."""
  head = dim // config["num_heads"]
  return flops.dense(tokens, dim, 3 * dim) + 2 * 2 * tokens * dim * head + flops.dense(tokens, dim, dim)


@operators.register("linear_attention", "attn", defaults={"num_heads": 4}, flops=linear_attention_flops)
class LinearAttention(nn.Module):
  """Non-causal linear attention (Katharopoulos et al., 2020): softmax(q k^T) v becomes
  phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j)) with phi = elu + 1, O(N) in the tokens."""
  dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    q, k, v = (a.reshape(b, n, self.num_heads, -1) for a in jnp.split(dense(3 * self.dim, "qkv")(x), 3, axis=-1))
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    summary = jnp.einsum("bnhd,bnhe->bhde", k, v)
    norm = jnp.einsum("bnhd,bhd->bnh", q, k.sum(axis=1))
    out = jnp.einsum("bnhd,bhde->bnhe", q, summary) / norm[..., None]
    return dense(self.dim, "proj")(out.reshape(b, n, self.dim))


def get_config(arg=None):
  if set(parse_arg(arg)) - {"shrink"}:
    raise ValueError(f"demo_own_operator takes shrink=1 only (its operator is linear_attention), got {arg!r}.")
  c = demo_experiment(arg)
  c.graft = [dict(c.graft[0], operator="linear_attention", config={"num_heads": 4})]
  return c
