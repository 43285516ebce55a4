"""Sequence and channel mixers for DiT layers, looked up by name.

`build(name, dim, **config)` returns the Flax module; `names()` lists what is registered. Importing this package
registers every operator family.
"""
from graft_jax.operators.registry import SITES, Operator, build, get, match_torch_modules, names, register
from graft_jax.operators import attention, hyena, kv_compress, mlp, ssm  # noqa: F401  (registration side effects)

__all__ = ["SITES", "Operator", "build", "get", "match_torch_modules", "names", "register"]
