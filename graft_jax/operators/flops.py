"""Analytic forward FLOPs (2 x multiply-adds) of each operator on a (1, N, D) input, for the graft summary.

Element-wise work (softmax, gates, activations) is left out, as in the usual transformer FLOP counts; what is counted
is every matrix product, convolution tap and scan update.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

Flops = Callable[[Mapping[str, Any], int, int], int]


def _dense(n: int, d_in: int, d_out: int) -> int:
  return 2 * n * d_in * d_out


def _attention(keys_per_query: Callable[[Mapping[str, Any], int], int]) -> Flops:
  def flops(c, d, n):
    return _dense(n, d, 3 * d) + 2 * 2 * n * keys_per_query(c, n) * d + _dense(n, d, d)
  return flops


def _swa_keys(c, n):
  side = 2 * c["window"] + 1
  return min(n, side * side if c.get("grid") else side)


def _kv_compress(c, d, n):
  """Keys and values pooled by a depthwise r x r conv before attention over n / r^2 of them."""
  kept = n // c["sr_ratio"] ** 2
  return _dense(n, d, 3 * d) + 2 * 2 * n * d + 2 * 2 * n * kept * d + _dense(n, d, d)


def _hyena(short: bool, inner: bool) -> Flops:
  def flops(c, d, n):
    k = c["kernel_size"]
    return (_dense(n, d, 3 * d) + short * 2 * k * n * 3 * d + inner * 2 * k * n * d + _dense(n, d, d))
  return flops


def _mamba2(c, d, n):
  inner = c["expand"] * d
  heads, state = inner // c["headdim"], c["d_state"]
  conv_channels = inner + 2 * state
  scan = 2 * 2 * n * inner * state * (2 if c.get("bidirectional") else 1)  # state update + readout per token
  return (_dense(n, d, 2 * inner + 2 * state + heads) + 2 * c["d_conv"] * n * conv_channels + scan
          + _dense(n, inner, d))


def _mlp(c, d, n):
  hidden = int(round(c["ratio"] * d))
  return _dense(n, d, hidden) + _dense(n, hidden, d)


def _mlp_hyena_x(c, d, n):
  hidden = int(round(c["ratio"] * d))
  return _dense(n, d, 3 * hidden) + 2 * c["kernel_size"] * n * 3 * hidden + _dense(n, hidden, d)


FLOPS: dict[str, Flops] = {
    "mha": _attention(lambda c, n: n),
    "swa": _attention(_swa_keys),
    "mha_kv_compress": _kv_compress,
    "hyena_x": _hyena(True, False),
    "hyena_y": _hyena(False, True),
    "hyena_se": _hyena(True, True),
    "mamba2": _mamba2,
    "mlp": _mlp,
    "mlp_hyena_x": _mlp_hyena_x,
}


def operator_flops(name: str, config: Mapping[str, Any], dim: int, tokens: int) -> int:
  try:
    return FLOPS[name](config, dim, tokens)
  except KeyError:
    raise ValueError(f"no FLOP formula for operator {name!r}; add one to graft_jax/operators/flops.py") from None
