"""The `gradguard` command: version and the optimizer registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gradguard
import gradguard.optim as go
from gradguard.cli import main


def test_version_is_printed_by_the_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "gradguard", "--version"], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == f"gradguard {gradguard.__version__}"


def test_optimizers_lists_every_registered_name_with_one_line_each(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == go.available()
    assert all("impl: auto" in line for line in lines)


def test_optimizers_verbose_lists_hyperparameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimizers", "-v"]) == 0
    assert "betas=(0.9, 0.999)" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: gradguard" in capsys.readouterr().err
