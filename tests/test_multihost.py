"""Several processes (hosts) on one machine: two CPU processes joined by jax.distributed (a coordinator on
127.0.0.1, gloo collectives) run the shrunk main job together. They must compute the same loss at every step (one
global batch assembled from each process's rows) and only process 0 may write the run's files; orbax writes the
train checkpoints from every process by design. Also the per-process split of the data."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cli import ROOT
from graft_jax.data.arrays import host_iterator


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(tmp_path, count: int, timeout: float = 300) -> list[dict]:
  """Starts `count` workers of the shrunk Hyena-X job on one workdir; returns each one's record."""
  port, workdir = _free_port(), tmp_path / "run"
  # Two CPU devices per process: the mesh spans four devices of two processes.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs, logs = [], []
  for i in range(count):
    log = open(tmp_path / f"process{i}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(tmp_path / f"record{i}.json"),
         f"--config={ROOT}/configs/dit_xl2_hyena_x.py:shrink=1", f"--workdir={workdir}",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         f"--config.distributed.num_processes={count}", f"--config.distributed.process_id={i}",
         # Both trainers (stage 1 writes an export that stage 2 reads back), two steps each; sampling runs on each
         # process's own devices and adds nothing multi-host.
         "--config.stages=('distill', 'finetune')", "--config.distill.steps=2", "--config.finetune.steps=2"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:  # one that failed leaves the other waiting at a barrier
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i}:\n" + (tmp_path / f"process{i}.log").read_text()[-4000:]
  return [json.loads((tmp_path / f"record{i}.json").read_text()) for i in range(count)]


def test_two_processes_agree_and_only_process_0_writes(tmp_path):
  first, second = _run_processes(tmp_path, 2)
  stages = {name for name, _, _ in first["losses"]}
  assert stages == {"stage 1", "finetune"}, stages
  assert first["losses"] == second["losses"]
  assert all(np.isfinite(loss) for _, _, loss in first["losses"])
  run = tmp_path / "run"
  for name in ("graft_summary.md", "config.json", "stage1/results.json", "student/config.json",
               "stages/finetune.json", "finetune/metrics/metrics.jsonl"):
    assert (run / name).exists(), name
  in_run = lambda paths: [p for p in paths if p.startswith(str(run)) and "/checkpoints" not in p]
  assert in_run(first["written"])
  assert in_run(second["written"]) == []


def test_host_iterator_gives_each_process_its_own_rows():
  rows = np.arange(19)
  parts = [host_iterator({"row": rows}, 6, seed=0, process_index=p, process_count=3) for p in range(3)]
  batches = [next(part)["row"] for part in parts]
  assert [len(b) for b in batches] == [2, 2, 2]
  # Process p holds rows p, p + 3, ...: disjoint, the 19th row left out so that all hold the same number.
  seen = np.concatenate([np.concatenate([next(part)["row"] for _ in range(2)] + [b]) for part, b in
                         zip(parts, batches)])
  assert sorted(seen) == list(range(18))
  assert all(set(b % 3) == {p} for p, b in enumerate(batches))
  with pytest.raises(ValueError, match="not divisible by the 4 processes"):
    host_iterator({"row": rows}, 6, process_index=0, process_count=4)
