"""Channel mixers: the transformer MLP with any hidden ratio."""
from __future__ import annotations

import math

import flax.linen as nn

from graft_jax.operators import init
from graft_jax.operators.kernels import dense_gelu
from graft_jax.operators.registry import register

GELU_KERNELS = ("auto", "xla", "mosaic")


def _mlp_from_torch(t, dim, num_heads):
  hidden = t["fc1.weight"].shape[0]
  return {"ratio": hidden / dim}, {"fc1": init.dense_from_torch(t, "fc1"), "fc2": init.dense_from_torch(t, "fc2")}


class DenseGELU(nn.Module):
  """fc1 and its tanh GELU: a Dense's parameters and initialisation (xavier-uniform kernel, zero bias), applied by
  XLA or by the fused Hopper kernel (`kernels/dense_gelu.py`, forward only). `gelu_kernel` "mosaic" takes the kernel
  wherever the inputs fit it (16-bit, whole tiles; float32 calls such as init stay on XLA), "auto" only where it
  is also `supported` (Hopper GPUs), "xla" never."""
  features: int
  gelu_kernel: str = "auto"

  @nn.compact
  def __call__(self, x):
    if self.gelu_kernel not in GELU_KERNELS:
      raise ValueError(f"GELU kernel {self.gelu_kernel!r} is not one of {', '.join(GELU_KERNELS)}.")
    x, kernel, bias = init.dense_params(self, x, self.features)
    if self.gelu_kernel == "xla":
      return dense_gelu.reference(x, kernel, bias)
    shape = (math.prod(x.shape[:-1]), x.shape[-1], self.features, x.dtype)
    fused = dense_gelu.fits(*shape) if self.gelu_kernel == "mosaic" else dense_gelu.supported(*shape)
    return dense_gelu.dense_gelu(x, kernel, bias) if fused else dense_gelu.reference(x, kernel, bias)


@register("mlp", "mlp", defaults={"ratio": 4.0, "gelu_kernel": "auto"}, torch_modules=("fc1", "fc2"),
          from_torch=_mlp_from_torch)
class MLP(nn.Module):
  """Linear D -> rD, GELU (tanh approximation, as DiT), Linear rD -> D."""
  dim: int
  ratio: float = 4.0
  # One of GELU_KERNELS. "auto": the fused kernel in undifferentiated forwards on Hopper GPUs, XLA elsewhere
  # (the kernel's whole-model effect: benchmarks/results/dit_xl2.json and pixart.json).
  gelu_kernel: str = "auto"

  @nn.compact
  def __call__(self, x):
    hidden = int(round(self.dim * self.ratio))
    return init.dense(self.dim, "fc2")(DenseGELU(hidden, self.gelu_kernel, name="fc1")(x))
