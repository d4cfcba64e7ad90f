"""Shared configs and a comparison trained once per session (3 optimizers x 3 seeds)."""

from __future__ import annotations

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
