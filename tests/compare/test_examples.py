"""The example scripts run and their assertions about published behaviour hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reddi_counterexample_adam_goes_to_the_wrong_end_amsgrad_does_not(
        capsys: pytest.CaptureFixture[str]) -> None:
    example = load("reddi_counterexample")
    assert example.main([]) == 0  # it asserts Adam's x > 0.9 and AMSGrad's x < -0.9
    printed = capsys.readouterr().out
    assert "Adam     after 3000 steps: x = +1.0000" in printed and "As published." in printed


def test_sparse_vs_dense_adagrad_competitive_on_ctr_adam_faster_on_digits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load("sparse_vs_dense")
    assert example.main(["--quick", "--seeds", "2", "--workers", "1",
                         "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "As published." in printed
    for name in ("ctr", "digits"):
        assert (tmp_path / name / "report.html").is_file()
