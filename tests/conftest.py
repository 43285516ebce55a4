"""Test-wide JAX settings: CPU with 8 fake devices (for sharding tests) and exact float32 matmuls (for parity)."""
import os
import sys

# torch's CUDA build brings triton, whose extension bundles its own LLVM; imported (by diffusers, through
# torch._dynamo) into a process where jaxlib's LLVM is already loaded, it can segfault. The suite runs on CPU, where
# torch never needs triton, and torch treats a missing triton as "no triton".
sys.modules.setdefault("triton", None)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Compiling dominates this suite on CPU; tests and the command lines they start share compiled programs on disk.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
