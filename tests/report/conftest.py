"""Fixtures: one real run directory (trained once per session) and its report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gradguard.report import build_report

from .make_run import make_run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 200-step Adagrad run (two groups, a NaN gradient at step 77). Read only."""
    return make_run(tmp_path_factory.mktemp("runs") / "adagrad", steps=200, nan_step=77)


@pytest.fixture(scope="session")
def trained_report(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of ``trained_run``, written outside it (the run stays untouched)."""
    return build_report(trained_run, tmp_path_factory.mktemp("reports") / "report.html")


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``trained_run`` that a test may damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
