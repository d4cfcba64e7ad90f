"""`gradguard sweep`: Optuna over a search-space TOML; pruning; a kill and a continuation."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import optuna
import pytest

from gradguard.cli import main
from gradguard.compare import SweepError, load_space, run_sweep
from gradguard.compare.sweep import EvalReporter, parse_space
from gradguard.run import config

from .conftest import digits_config, kill_cli_when

SPACE = """
[optimizer.lr]
low = 1e-4
high = 1e-1
log = true

[optimizer.eps]
low = 1e-10
high = 1e-4
log = true
"""


def test_a_space_file_gives_floats_ints_and_choices(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(SPACE + '\n[train.batch_size]\nlow = 32\nhigh = 128\nstep = 32\n'
                    '\n[optimizer.name]\nchoices = ["adam", "adamw"]\n')
    space = load_space(path)
    assert [(p.key, p.kind) for p in space.parameters] == [
        ("optimizer.lr", "float"), ("optimizer.eps", "float"), ("optimizer.name", "categorical"),
        ("train.batch_size", "int")]
    trial = optuna.create_study().ask()
    values = space.suggest(trial)
    assert 1e-4 <= values["optimizer.lr"] <= 1e-1 and values["train.batch_size"] % 32 == 0


@pytest.mark.parametrize("space, message", [
    ({"optimizer": {"lr": {"low": 1e-3}}}, "optimizer.lr: give both low and high"),
    ({"optimizer": {"lr": {"low": 0.0, "high": 1.0, "log": True}}}, "log = true needs low > 0"),
    ({"optimizer": {"lr": {"low": 1, "high": 2, "scale": "log"}}}, "unknown field(s) scale"),
    ({"optimizer": {"name": {"choices": []}}}, "optimizer.name.choices: a non-empty list"),
    ({"optimizer": {"lr": 0.1}}, "optimizer.lr: expected a table"),
    ({}, "no parameters"),
])
def test_a_bad_space_names_the_key(space: dict[str, object], message: str) -> None:
    with pytest.raises(SweepError, match="invalid search space") as info:
        parse_space(space)
    assert message in str(info.value)


def test_the_reporter_prunes_a_trial_behind_the_median(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    for step, value in ((10, 0.8), (20, 0.9)):
        good.report(value, step)
    study.tell(good, 0.9)
    run = tmp_path / "run"
    run.mkdir()
    trial = study.ask()
    reporter = EvalReporter(trial, run, "accuracy", last_step=100)
    reporter.poll()  # no events.jsonl yet: nothing to report
    with (run / "events.jsonl").open("w") as fh:
        fh.write(json.dumps({"event": "eval", "step": 10, "metrics": {"accuracy": 0.3}}) + "\n")
        fh.write('{"event": "eval", "st')  # a line still being written
        fh.flush()
        with pytest.raises(optuna.TrialPruned, match="pruned at step 10"):
            reporter(None, 10)
    assert trial.user_attrs["pruned_at_step"] == 10


def test_a_killed_sweep_continues_and_writes_a_best_config_that_trains(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "digits.toml"
    cfg.write_text(config.dumps(digits_config(steps=80, eval_every=10)))
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    args = ["sweep", str(cfg), "--space", str(space), "--trials", "8", "--output", str(out)]
    events = out / "trials" / "trial-0002" / "events.jsonl"
    # kill it (SIGKILL, no goodbye) while its third trial trains, past a checkpoint
    kill_cli_when([*args, "-q"],
                  lambda: events.exists() and '"event": "checkpoint"' in events.read_text(),
                  "the sweep", "the third trial did not start in time", poll=0.005)
    with sqlite3.connect(out / "study.db") as db:  # the study is a plain SQLite file
        states = dict(db.execute("select number, state from trials").fetchall())
    assert states[2] == "RUNNING"

    result = run_sweep(cfg, space, trials=8, output=out, log=print)
    assert result.recovered == [2]
    assert "trial 2 was left running by a killed process" in capsys.readouterr().out
    finished = [t for t in result.trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 8
    retry = next(t for t in result.trials if t["retry_of"] == 2)
    assert retry["run_dir"] == str(out / "trials" / "trial-0002")  # resumed where it was
    assert retry["params"] == next(t["params"] for t in result.trials if t["number"] == 2)
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds.count("start") == 2 and "resume" in kinds and kinds[-1] == "finished"
    assert all(t["intermediate"] for t in finished)  # every evaluation reported to Optuna
    assert len({tuple(t["params"].values()) for t in result.trials if t["retry_of"] is None}) \
        == len([t for t in result.trials if t["retry_of"] is None])  # no replayed draws
    assert result.best is not None and result.best_config == out / "best.toml"
    best = config.load(out / "best.toml").optimizer.hyperparameters
    assert (best["lr"], best["eps"]) == (result.best["params"]["optimizer.lr"],
                                         result.best["params"]["optimizer.eps"])
    assert main(["train", str(out / "best.toml"), "--output", str(tmp_path / "best-run"),
                 "-q"]) == 0
    assert json.loads((tmp_path / "best-run" / "summary.json").read_text())["status"] == \
        "finished"


def test_a_journal_file_storage_works_too(tmp_path: Path) -> None:
    cfg = digits_config(steps=10, eval_every=5)
    result = run_sweep(cfg, {"optimizer": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
                       trials=2, output=tmp_path / "sweep",
                       storage=str(tmp_path / "journal.log"), log=None)
    assert (tmp_path / "journal.log").stat().st_size > 0
    assert not (tmp_path / "sweep" / "study.db").exists()
    assert len([t for t in result.trials if t["state"] == "COMPLETE"]) == 2
    trial_dirs = sorted((tmp_path / "sweep" / "trials").iterdir())
    assert len(trial_dirs) == 2 and not any((d / "report.html").exists() for d in trial_dirs)
    again = run_sweep(cfg, {"optimizer": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
                      trials=2, output=tmp_path / "sweep",
                      storage=str(tmp_path / "journal.log"), log=None)
    assert len(again.trials) == 2  # already done: nothing more runs


def test_the_command_refuses_a_bad_space_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "digits.toml"
    cfg.write_text(config.dumps(digits_config()))
    space = tmp_path / "space.toml"
    space.write_text("[optimizer.lr]\nlow = 0.1\nhigh = 0.01\n")
    assert main(["sweep", str(cfg), "--space", str(space), "--trials", "2",
                 "--output", str(tmp_path / "sweep")]) == 2
    assert "optimizer.lr: need low <= high" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
