"""Channel mixers: the transformer MLP with any hidden ratio."""
from __future__ import annotations

import flax.linen as nn

from graft_jax.operators import init
from graft_jax.operators.registry import register
from graft_jax.operators.remat import kept


def _mlp_from_torch(t, dim, num_heads):
  hidden = t["fc1.weight"].shape[0]
  return {"ratio": hidden / dim}, {"fc1": init.dense_from_torch(t, "fc1"), "fc2": init.dense_from_torch(t, "fc2")}


@register("mlp", "mlp", defaults={"ratio": 4.0}, torch_modules=("fc1", "fc2"), from_torch=_mlp_from_torch)
class MLP(nn.Module):
  """Linear D -> rD, GELU (tanh approximation, as DiT), Linear rD -> D."""
  dim: int
  ratio: float = 4.0

  @nn.compact
  def __call__(self, x):
    hidden = int(round(self.dim * self.ratio))
    return init.dense(self.dim, "fc2")(kept(nn.gelu(init.dense(hidden, "fc1")(x), approximate=True)))
