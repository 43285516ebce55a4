"""The benchmarks' record of the GPU's clock and power (benchmarks.common.GpuConditions), read from a stand-in
nvidia-smi on PATH, and the window benchmarks/dit.py samples."""
from __future__ import annotations

import os
import stat
import time

import pytest

from benchmarks import common, dit
from benchmarks.common import GpuConditions


def fake_nvidia_smi(directory, script: str):
  path = directory / "nvidia-smi"
  path.write_text("#!/bin/sh\n" + script)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def conditions_with(monkeypatch, directory, path: str = "") -> dict | None:
  """The summary of a block that lasts until the stand-in has written its lines (it then touches `printed`)."""
  monkeypatch.setenv("PATH", os.pathsep.join(filter(None, [str(directory), path])))
  with GpuConditions(period_ms=50) as gpu:
    deadline = time.monotonic() + 20
    while (directory / "nvidia-smi").exists() and not (directory / "printed").exists() and time.monotonic() < deadline:
      time.sleep(0.01)
  return gpu.summary()


def test_the_samples_means_and_the_capped_fraction(tmp_path, monkeypatch):
  # Like `nvidia-smi -lms`: lines until it is stopped; a field the board cannot report reads [N/A].
  fake_nvidia_smi(tmp_path, 'echo "$@" > "${0%/*}/args"\n'
                  "printf '1500, 1980, 690.5, 700.00, Active\\n1600, 1980, 680.5, 700.00, Not Active\\n'\n"
                  "printf '[N/A], 1980, [N/A], 700.00, [N/A]\\n'\n"
                  'touch "${0%/*}/printed"\nexec sleep 30\n')
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # JAX's device 0 is the machine's GPU 3
  summary = conditions_with(monkeypatch, tmp_path, os.environ["PATH"])
  assert summary == pytest.approx({"samples": 2, "sm_mhz_mean": 1550, "sm_mhz_max": 1980, "power_w_mean": 685.5,
                                   "power_limit_w": 700, "power_capped_fraction": 0.5})
  args = (tmp_path / "args").read_text().split()
  assert args[args.index("-lms") + 1] == "50" and args[args.index("-i") + 1] == "3"
  assert "--format=csv,noheader,nounits" in args


NOT_A_FIELD = "echo 'Field \"clocks.max.sm\" is not a valid field to query.'\n: > \"${0%/*}/printed\"\nexit 2\n"


@pytest.mark.parametrize("script", [None, NOT_A_FIELD], ids=["absent", "refuses the query"])
def test_no_summary_without_a_usable_nvidia_smi(tmp_path, monkeypatch, script):
  if script is not None:
    fake_nvidia_smi(tmp_path, script)
  assert conditions_with(monkeypatch, tmp_path) is None


def test_dit_timings_sample_after_the_compiling_call(monkeypatch):
  calls = []

  class Recorder:
    def __enter__(self):
      self.calls_before = len(calls)
      return self

    def __exit__(self, *exc_info):
      self.calls_within = len(calls) - self.calls_before

    def summary(self):
      return {"calls_before": self.calls_before, "calls_within": self.calls_within}

  monkeypatch.setattr(common, "GpuConditions", Recorder)
  result = dit.timings(lambda: calls.append(1))
  assert result["gpu"] == {"calls_before": 1, "calls_within": 13}  # then loop_ms: 3 warm-up calls and 10 timed


def test_sampled_loop_ms_gives_the_energy_of_a_call(monkeypatch):
  class Steady:
    def __enter__(self):
      return self

    def __exit__(self, *exc_info):
      return False

    def summary(self):
      return {"power_w_mean": 500.0}

  monkeypatch.setattr(common, "GpuConditions", Steady)
  ms, conditions = common.sampled_loop_ms(lambda: time.sleep(0.002))
  assert ms >= 2 and conditions["joules_per_call"] == pytest.approx(500.0 * ms / 1e3)
