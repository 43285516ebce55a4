"""Entry point: `python -m graft_jax.main --config=configs/demo.py --workdir=runs/demo`.

Parses flags only; `graft_jax.pipeline.run` does the work. A user error (a missing checkpoint, an invalid plan) ends
with one sentence and exit status 2.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from graft_jax import pipeline
from graft_jax.train import partition

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics, samples and the report go")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointing(logging.Filter):
  """orbax logs every file operation at INFO; the run's own progress lines are what a user needs to see."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _parse_flags(argv):
  """absl's parsing and its usage errors, plus one it leaves as a traceback: an override (`--config.a.b=v`) of a
  field the config does not have, which ml_collections raises as an AttributeError around a KeyError."""
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as e:
    missing = e.args[0] if e.args and isinstance(e.args[0], KeyError) else None
    if missing is None:
      raise
    name, *hint_lines = str(missing.args[0]).splitlines()  # the field's repr, then a did-you-mean if there is one
    field = name.strip("'\"")
    culprit = next((a for a in argv[1:] if a.startswith("--config.") and field in a.split("=")[0].split(".")), None)
    where, hint = (f"{culprit}: " if culprit else ""), " ".join(hint_lines)
    hint = f"; {hint[:1].lower()}{hint[1:]}" if hint else "."
    print(f"error: {where}the config has no field {field!r}{hint}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  logging.getLogger("absl").addFilter(_QuietCheckpointing())
  # First, before any device is touched: joins the other processes of a multi-host run (a no-op for one process).
  partition.maybe_initialize_distributed(_CONFIG.value.get("distributed"))
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except pipeline.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
