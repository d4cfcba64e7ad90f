"""`gradguard gate`: two checkpoints on the same evaluation data; exit 1 on a regression."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradguard.ckpt import Checkpointer
from gradguard.cli import main
from gradguard.compare import (
    CompareResult,
    GateError,
    Threshold,
    evaluate_checkpoint,
    gate,
    metric_direction,
)
from gradguard.run import config, train, workloads

from .conftest import digits_config


@pytest.fixture(scope="module")
def baseline(comparison: CompareResult) -> Path:
    """The run directory of adam, seed 0, from the session's comparison (read only)."""
    return comparison.output / "runs" / "adam" / "seed-0"


@pytest.fixture(scope="module")
def eval_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "eval.toml"
    path.write_text(config.dumps(digits_config()))
    return path


def damaged_copy(run: Path, out: Path, noise: float) -> Path:
    """The run's newest checkpoint with Gaussian noise on every weight, saved as a valid one."""
    model = workloads.load("digits", seed=0, options={}).model
    info = Checkpointer(run / "checkpoints", audit=False, cleanup=False).restore(
        model=model, rng=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    Checkpointer(out, config=info.config).save(info.step, model=model)
    return out


def test_an_identical_checkpoint_passes_with_exit_0(
        baseline: Path, eval_toml: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "gate.json"
    assert main(["gate", "--baseline", str(baseline), "--candidate",
                 str(baseline / "checkpoints"), "--eval", str(eval_toml),
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "PASSED" in printed
    for line in ("model.optimizer.name", "model.optimizer.lr", "model.optimizer.betas"):
        assert line in printed
    saved = json.loads(report.read_text())
    assert saved["passed"] and saved["regressions"] == []
    assert {(r["slice"], r["metric"], r["status"]) for r in saved["rows"]} == {
        ("all", "accuracy", "ok"), ("all", "loss", "ok")}
    lineage = saved["candidate"]["lineage"]
    assert lineage["model.optimizer.name"] == "adam" and lineage["model.optimizer.lr"] == 0.01
    data = workloads.load("digits", seed=0, options={}).eval
    assert saved["baseline"]["data_hash"] == saved["candidate"]["data_hash"] == data.fingerprint()


def test_a_damaged_copy_of_the_baseline_fails_with_exit_1(
        baseline: Path, eval_toml: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    damaged = damaged_copy(baseline, tmp_path / "damaged", noise=0.3)
    assert main(["gate", "--baseline", str(baseline), "--candidate", str(damaged),
                 "--eval", str(eval_toml), "--max-drop", "0.5%", "--json", ""]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "REGRESSION" in printed
    result = gate(baseline, damaged, eval_toml)
    assert {r.metric for r in result.regressions} == {"accuracy", "loss"}
    accuracy = next(r for r in result.rows if r.metric == "accuracy")
    assert accuracy.candidate < accuracy.baseline - accuracy.allowed


def test_a_small_drop_within_the_threshold_passes(baseline: Path, eval_toml: Path,
                                                  tmp_path: Path) -> None:
    damaged = damaged_copy(baseline, tmp_path / "damaged", noise=0.3)
    result = gate(baseline, damaged, eval_toml, max_drop=10.0)  # an absolute 10: anything goes
    assert result.passed and result.exit_code == 0


def test_evaluations_made_on_different_data_are_an_error(
        baseline: Path, eval_toml: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    record = evaluate_checkpoint(baseline, eval_toml).save(tmp_path / "baseline.json")
    # the same checkpoint, evaluated on another split: the hashes disagree
    assert main(["gate", "--baseline", str(record), "--candidate", str(baseline),
                 "--eval", str(eval_toml), "--set", "workload.options.test_fraction=0.3",
                 "--json", ""]) == 2
    err = capsys.readouterr().err
    assert "evaluated on different data (evaluation split differs)" in err
    # and on the same split, the saved record is a baseline like any other
    assert main(["gate", "--baseline", str(record), "--candidate", str(baseline),
                 "--eval", str(eval_toml), "--json", str(tmp_path / "gate.json")]) == 0
    # the candidate of one gate becomes the baseline of the next
    result = gate(f"{tmp_path / 'gate.json'}:candidate", baseline, eval_toml)
    assert result.passed


def test_bad_input_exits_2(eval_toml: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gate", "--baseline", str(tmp_path / "nothing"), "--candidate",
                 str(tmp_path / "nothing"), "--eval", str(eval_toml), "--json", ""]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    with pytest.raises(GateError, match="--max-drop"):
        Threshold.parse("a lot")


def test_slices_of_the_workload_are_gated_one_by_one(tmp_path: Path) -> None:
    data = {"run": {"threads": 1, "output": str(tmp_path / "ctr")},
            "workload": {"name": "ctr", "options": {"n_train": 2000, "n_eval": 1000,
                                                    "vocab": 50}},
            "optimizer": {"name": "adagrad", "lr": 0.05},
            "train": {"steps": 4, "batch_size": 256, "eval_every": 4},
            "checkpoint": {"async_save": False}}
    train(config.parse(data), progress=False)
    evaluation = evaluate_checkpoint(tmp_path / "ctr", data)
    assert set(evaluation.metrics) == {"all", "head", "tail"}
    assert evaluation.slices_hash is not None
    result = gate(evaluation, evaluation)
    assert {(r.slice, r.metric) for r in result.rows} == {
        (s, m) for s in ("all", "head", "tail") for m in ("logloss", "auc")}
    assert {r.direction for r in result.rows if r.metric == "auc"} == {"max"}


@pytest.mark.parametrize("name, direction", [
    ("accuracy", "max"), ("auc", "max"), ("head_auc", "max"), ("loss", "min"),
    ("logloss", "min"), ("tail_logloss", "min"), ("val_loss", "min"), ("distance", "min"),
    ("throughput", None)])
def test_metric_directions_come_from_their_names(name: str, direction: str | None) -> None:
    assert metric_direction(name) == direction


def test_the_primary_metric_takes_the_workload_mode_and_overrides_win() -> None:
    assert metric_direction("score", primary="score", mode="min") == "min"
    assert metric_direction("throughput", overrides={"throughput": "max"}) == "max"


def test_thresholds_are_relative_with_a_percent_sign() -> None:
    assert Threshold.parse("0.5%").allowed(0.8) == pytest.approx(0.004)
    assert Threshold.parse("0.01").allowed(0.8) == pytest.approx(0.01)


def test_metrics_and_directions_can_be_chosen_on_the_command_line(
        baseline: Path, eval_toml: Path, tmp_path: Path) -> None:
    report = tmp_path / "gate.json"
    assert main(["gate", "--baseline", str(baseline), "--candidate", str(baseline),
                 "--eval", str(eval_toml), "--metrics", "accuracy", "--direction", "loss=max",
                 "--json", str(report)]) == 0
    assert [r["metric"] for r in json.loads(report.read_text())["rows"]] == ["accuracy"]
    assert main(["gate", "--baseline", str(baseline), "--candidate", str(baseline),
                 "--eval", str(eval_toml), "--direction", "loss=up", "--json", ""]) == 2
