"""Shared configs and a comparison trained once per session (3 optimizers x 3 seeds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gradguard.compare import CompareResult, run_compare

TARGET = 0.85
"""A digits accuracy some runs reach within 30 steps and others do not."""


def digits_config(steps: int = 30, eval_every: int = 10, **train: Any) -> dict[str, Any]:
    """A tiny digits run: one thread, synchronous checkpoints, frequent recorder records."""
    return {
        "run": {"threads": 1},
        "workload": {"name": "digits"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"steps": steps, "batch_size": 64, "eval_every": eval_every, **train},
        "recorder": {"every": 5, "full_every": 50},
        "checkpoint": {"async_save": False, "keep_last": 2},
    }


@pytest.fixture(scope="session")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> CompareResult:
    """adagrad, adam, sgd (lr 0.1) x seeds 0, 1, 2 on digits, 30 steps; read only."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    return run_compare(digits_config(), optimizers="adagrad,adam,sgd",
                       variants=["sgd:optimizer.lr=0.1"], seeds=3, output=out, workers=1,
                       target=TARGET, log=None)


def metric_series(run_dir: Path, name: str) -> dict[int, float]:
    """``step -> value`` of one run-wide metric in metrics.jsonl (the last record per step)."""
    import json

    series: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["group"] == "all" and name in record["metrics"]:
            series[record["step"]] = float(record["metrics"][name])
    return series


def kill_cli_when(args: Sequence[str], ready: Callable[[], bool], what: str, late: str,
                  poll: float) -> None:
    """Run ``python -m gradguard ARGS`` in a new session; once ``ready()`` holds (checked
    every ``poll`` s, at most 100 s), SIGKILL its whole process group (workers
    included: no goodbye) and reap it.

    Fails with "``what`` ended before it could be killed" if it finishes first, and
    with ``late`` if ``ready()`` does not hold in time.
    """
    proc = subprocess.Popen([sys.executable, "-m", "gradguard", *args],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 100
        while not ready():
            assert proc.poll() is None, f"{what} ended before it could be killed"
            assert time.monotonic() < deadline, late
            time.sleep(poll)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
