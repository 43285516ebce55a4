"""One process of a multi-process run: `python tests/multihost_worker.py RECORD MAIN_ARGS...` runs graft_jax.main with
MAIN_ARGS and writes to RECORD (JSON) what this process did: every file or folder it created or opened for writing
(seen through Python's audit hooks) and the loss of every training step it computed."""
from __future__ import annotations

import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def main() -> None:
  record_path, args = sys.argv[1], sys.argv[2:]
  written, losses = [], []

  def audit(event, event_args):
    if event == "open":
      path, mode, flags = event_args
      if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
        written.append(os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path))
    elif event in ("os.mkdir", "os.rename", "os.replace", "shutil.rmtree"):
      # rename and replace name (src, dst, ...): the destination is what appears; the others name the path first.
      written.append(os.fsdecode(event_args[1] if event in ("os.rename", "os.replace") else event_args[0]))

  sys.addaudithook(audit)
  from absl import app
  from graft_jax import main as graft_main
  from graft_jax.train import metrics

  add = metrics.Reporter.add

  def add_and_record(self, step, step_metrics):
    # float() of the replicated loss reads this process's own copy of the global result.
    losses.append([self.name, step, float(step_metrics["loss"])])
    add(self, step, step_metrics)

  metrics.Reporter.add = add_and_record
  sys.argv = ["graft_jax.main", *args]
  try:
    app.run(graft_main.main)
  finally:
    with open(record_path, "w") as f:
      json.dump({"written": written, "losses": losses}, f)


if __name__ == "__main__":
  main()
