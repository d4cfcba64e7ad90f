"""Crash safety: a writer killed with SIGKILL at random moments never leaves a bad latest().

See crash_worker.py: 24 trials, each killing a process that saves in a loop
(sync and async, with retention deleting old checkpoints) after a random delay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.ckpt.commit import step_of

REPO = Path(__file__).resolve().parents[2]
TRIALS = 24

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks writers")


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("crash")
    report = tmp / "report.json"
    subprocess.run([sys.executable, "-m", "tests.ckpt.crash_worker", str(tmp / "root"),
                    str(TRIALS), "7", str(report)], cwd=REPO, check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    results: list[dict[str, object]] = json.loads(report.read_text())
    return results


def test_every_writer_was_killed_by_sigkill(trials: list[dict[str, object]]) -> None:
    assert len(trials) == TRIALS and all(t["killed"] for t in trials)


def test_latest_always_returns_a_checkpoint_that_verifies(trials: list[dict[str, object]]
                                                          ) -> None:
    for t in trials:
        assert t["step"] is not None and t["verifies"] is True, t


def test_latest_never_returns_a_temporary_directory(trials: list[dict[str, object]]) -> None:
    for t in trials:
        assert step_of(str(t["name"])) == t["step"], t
        assert t["leftovers_after_cleanup"] == [], t


def test_no_committed_progress_is_lost(trials: list[dict[str, object]]) -> None:
    steps = [int(str(t["step"])) for t in trials]
    assert steps == sorted(steps) and steps[-1] > 0


def test_some_kills_landed_in_the_middle_of_a_save(trials: list[dict[str, object]]) -> None:
    assert sum(bool(t["leftovers"]) for t in trials) >= 3
