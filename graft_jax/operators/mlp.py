"""Channel mixers: the transformer MLP with any hidden ratio."""
from __future__ import annotations

import math

import flax.linen as nn

from graft_jax.operators import flops, init
from graft_jax.operators.kernels import dense_gelu
from graft_jax.operators.registry import register

GELU_KERNELS = ("auto", "xla", "mosaic")


def _mlp_from_torch(t, dim, num_heads):
  hidden = t["fc1.weight"].shape[0]
  return {"ratio": hidden / dim}, {"fc1": init.dense_from_torch(t, "fc1"), "fc2": init.dense_from_torch(t, "fc2")}


@register("mlp", "mlp", defaults={"ratio": 4.0, "gelu_kernel": "auto"}, flops=flops.mlp, torch_modules=("fc1", "fc2"),
          from_torch=_mlp_from_torch)
class MLP(nn.Module):
  """Linear D -> rD, GELU (tanh approximation, as DiT), Linear rD -> D.

  Applied by XLA, or through the Hopper kernels that fuse the GELU into fc1's matmul and, in train steps, its
  derivative into fc2's input-gradient matmul (`kernels/dense_gelu.py`). `gelu_kernel` "mosaic" takes them wherever
  fc1's inputs fit (16-bit, whole tiles; float32 calls such as init stay on XLA), "auto" only where they are also
  `supported` (Hopper GPUs), "xla" never."""
  dim: int
  ratio: float = 4.0
  # One of GELU_KERNELS (the kernels' whole-model effect: benchmarks/results/dit_xl2.json and pixart.json).
  gelu_kernel: str = "auto"

  @nn.compact
  def __call__(self, x):
    if self.gelu_kernel not in GELU_KERNELS:
      raise ValueError(f"GELU kernel {self.gelu_kernel!r} is not one of {', '.join(GELU_KERNELS)}.")
    hidden = int(round(self.dim * self.ratio))
    fc1, fc2 = init.LinearWeights(hidden, name="fc1")(x.shape[-1]), init.LinearWeights(self.dim, name="fc2")(hidden)
    x, *weights = nn.dtypes.promote_dtype(x, *fc1, *fc2)
    shape = (math.prod(x.shape[:-1]), x.shape[-1], hidden, x.dtype)
    fused = {"xla": False, "mosaic": dense_gelu.fits(*shape), "auto": dense_gelu.supported(*shape)}[self.gelu_kernel]
    if fused:
      return dense_gelu.mlp(x, *weights)
    fc1_kernel, fc1_bias, fc2_kernel, fc2_bias = weights
    return dense_gelu.reference(x, fc1_kernel, fc1_bias) @ fc2_kernel + fc2_bias
