"""Helpers for tests that run the real command line or load a config file as `--config` would."""
import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, cwd) -> subprocess.CompletedProcess:
  """`python -m graft_jax.main ARGS` on the machine's one CPU device (not the 8 fake devices of in-process tests)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "graft_jax.main", *args], capture_output=True, text=True, cwd=cwd,
                        env=env)


def load_config(name: str, arg: str | None = None):
  """configs/NAME.py's get_config(arg)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)
