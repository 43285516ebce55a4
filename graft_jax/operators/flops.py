"""Analytic forward FLOPs (2 x multiply-adds) of each operator on a (1, N, D) input, for the graft summary.

Element-wise work (softmax, gates, activations) is left out, as in the usual transformer FLOP counts; what is counted
is every matrix product, convolution tap and scan update. Each operator's formula is given to `registry.register`
with the operator; these are the built-in operators' formulas and the pieces to write one.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

Flops = Callable[[Mapping[str, Any], int, int], int]


def dense(n: int, d_in: int, d_out: int) -> int:
  """A Linear from d_in to d_out features over n tokens."""
  return 2 * n * d_in * d_out


def attention(keys_per_query: Callable[[Mapping[str, Any], int], int]) -> Flops:
  """DiT's attention (q, k, v and output projections) where each query meets keys_per_query(config, n) keys."""
  def flops(c, d, n):
    return dense(n, d, 3 * d) + 2 * 2 * n * keys_per_query(c, n) * d + dense(n, d, d)
  return flops


def window_keys(c, n):
  """Keys a query meets in SWA's window: 2w + 1 on the sequence, (2w + 1)^2 on a grid, at most all n."""
  side = 2 * c["window"] + 1
  return min(n, side * side if c.get("grid") else side)


def kv_compress(c, d, n):
  """Keys and values pooled by a depthwise r x r conv before attention over n / r^2 of them."""
  kept = n // c["sr_ratio"] ** 2
  return dense(n, d, 3 * d) + 2 * 2 * n * d + 2 * 2 * n * kept * d + dense(n, d, d)


def hyena(short: bool, inner: bool) -> Flops:
  """Hyena's projections, with the featurizer convs on q, k, v (`short`) and the inner conv (`inner`)."""
  def flops(c, d, n):
    k = c["kernel_size"]
    return (dense(n, d, 3 * d) + short * 2 * k * n * 3 * d + inner * 2 * k * n * d + dense(n, d, d))
  return flops


def mamba2(c, d, n):
  inner = c["expand"] * d
  heads, state = inner // c["headdim"], c["d_state"]
  conv_channels = inner + 2 * state
  scan = 2 * 2 * n * inner * state * (2 if c.get("bidirectional") else 1)  # state update + readout per token
  return (dense(n, d, 2 * inner + 2 * state + heads) + 2 * c["d_conv"] * n * conv_channels + scan
          + dense(n, inner, d))


def mlp(c, d, n):
  hidden = int(round(c["ratio"] * d))
  return dense(n, d, hidden) + dense(n, hidden, d)


def mlp_hyena_x(c, d, n):
  hidden = int(round(c["ratio"] * d))
  return dense(n, d, 3 * hidden) + 2 * c["kernel_size"] * n * 3 * hidden + dense(n, hidden, d)
