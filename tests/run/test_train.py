"""`gradguard train`: targets reached, run directories kept safe, stopped runs resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gradguard.cli import main
from gradguard.run import RunDirectoryError, config, train
from gradguard.run import rundir as layout

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(config.dumps(data))
    return path


def digits_config(out: Path, **train_opts: Any) -> dict[str, Any]:
    return {
        "run": {"output": str(out), "seed": 3, "threads": 1},
        "workload": {"name": "digits"},
        "optimizer": {"name": "adam", "lr": 0.003},
        "train": {"steps": 300, "batch_size": 64, "eval_every": 50, **train_opts},
        "recorder": {"every": 10, "full_every": 50},
    }


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the newest checkpoint (the one saved at the end)."""
    steps = sorted((run / layout.CHECKPOINTS).glob("step-*"))
    return load_file(str(steps[-1] / "model.safetensors"))


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / layout.EVENTS).read_text().splitlines()]


def test_digits_reaches_its_target_and_leaves_a_complete_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(config.parse(digits_config(out)), progress=False)
    assert result.status == "finished"
    assert result.summary["target"]["reached_step"] is not None
    assert result.best["value"] >= 0.95
    for name in (layout.CONFIG, layout.ENV, layout.METRICS, layout.EVENTS, layout.SUMMARY,
                 layout.GUARD_AUDIT, layout.REPORT):
        assert (out / name).is_file(), name
    kinds = [e["event"] for e in events(out)]
    assert kinds[0] == "start" and kinds[-1] == "finished"
    assert kinds.count("eval") == 6 and "checkpoint" in kinds and "target_reached" in kinds
    # the saved config is the validated one, and runs again as is
    assert config.parse(config.tomllib.loads((out / layout.CONFIG).read_text())).train.steps == 300


def test_an_existing_run_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirectoryError, match=r"--resume.*--overwrite"):
        train(config.parse(digits_config(out, steps=5, eval_every=5)), progress=False)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    cfg_file = write_config(tmp_path / "c.toml", digits_config(out, steps=5, eval_every=5))
    assert main(["train", str(cfg_file), "-q"]) == 2
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert main(["train", str(cfg_file), "-q", "--overwrite"]) == 0
    assert not (out / "precious.txt").exists() and (out / layout.SUMMARY).exists()


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config.parse(digits_config(out, steps=10, eval_every=5)), progress=False)
    changed = digits_config(out, steps=20, eval_every=5)
    changed["optimizer"]["lr"] = 0.1
    with pytest.raises(RunDirectoryError, match=r"optimizer\.lr"):
        train(config.parse(changed), resume=True, progress=False)
    # extending the run (more steps) is allowed and continues from step 10
    extended = train(config.parse(digits_config(out, steps=20, eval_every=5)), resume=True,
                     progress=False)
    assert extended.steps == 20
    assert [e["checkpoint_step"] for e in events(out) if e["event"] == "resume"] == [10]


def _cli(cfg: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "gradguard", "train", str(cfg), "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for_checkpoint(run: Path, process: subprocess.Popen[str], minimum: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        steps = [int(p.name.split("-")[1]) for p in (run / layout.CHECKPOINTS).glob("step-*")
                 if (p / "manifest.json").exists()]
        if steps and max(steps) >= minimum:
            return
        if process.poll() is not None:
            pytest.fail("the run ended before it could be interrupted:\n" + process.stdout.read())
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint appeared in time")


RESUME_RUN = {"steps": 1500, "batch_size": 32, "eval_every": 100}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cfg = config.parse(digits_config(out, **RESUME_RUN))
    cfg.guard.policy = {"detectors": {"grad_spike": {"sigmas": 4.0}}}  # some skips happen
    train(cfg, progress=False)
    return final_parameters(out)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_run_stopped_mid_way_and_resumed_ends_with_the_same_parameters(
        how: str, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    out = tmp_path / "run"
    data = digits_config(out, **RESUME_RUN)
    data["guard"] = {"policy": {"detectors": {"grad_spike": {"sigmas": 4.0}}}}
    cfg = write_config(tmp_path / "c.toml", data)
    process = _cli(cfg)
    _wait_for_checkpoint(out, process, 200)
    process.send_signal(getattr(signal, how))
    output, _ = process.communicate(timeout=120)
    if how == "SIGINT":  # Ctrl-C: a checkpoint of this step, a clean exit
        assert process.returncode == 130, output
        assert "interrupted" in [e["event"] for e in events(out)]
        assert json.loads((out / layout.SUMMARY).read_text())["status"] == "interrupted"
    else:
        assert process.returncode == -signal.SIGKILL
    resumed = _cli(cfg, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    after = final_parameters(out)
    assert after.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(after[name], tensor), name
    fidelity = [e for e in events(out) if e["event"] == "restore_fidelity"]
    assert fidelity and fidelity[-1]["delta"] == 0.0
    assert json.loads((out / layout.SUMMARY).read_text())["steps"] == RESUME_RUN["steps"]


@pytest.mark.parametrize(("workload", "options", "optimizer"), [
    ("quadratic", {}, {"name": "nonlinear_cg", "gtol": 1e-12}),
    ("quadratic", {}, {"name": "newton", "gtol": 1e-12}),
    ("quadratic", {"condition": 10.0}, {"name": "gradient_descent", "gtol": 1e-12}),
    ("rosenbrock", {}, {"name": "newton", "gtol": 1e-12}),
    ("rosenbrock", {}, {"name": "nonlinear_cg", "gtol": 1e-12}),
    ("rosenbrock", {}, {"name": "gradient_descent", "line_search": "barzilai_borwein",
                        "gtol": 1e-9}),
])
def test_full_batch_optimizers_reach_the_analytic_optimum(
        workload: str, options: dict[str, Any], optimizer: dict[str, Any], tmp_path: Path) -> None:
    data = {"run": {"output": str(tmp_path / "run"), "precision": "fp64"},
            "workload": {"name": workload, "options": options}, "optimizer": optimizer,
            "train": {"steps": 5000, "eval_every": 10, "stop_at_target": True},
            "guard": {"enabled": False}}
    result = train(config.parse(data), progress=False)
    assert result.status in ("target_reached", "converged"), result.summary
    assert result.final_metrics["distance"] < 1e-6


def test_hybrid_groups_by_glob_and_a_warmup_schedule(tmp_path: Path) -> None:
    data = digits_config(tmp_path / "run", steps=40, eval_every=20)
    data["optimizer"] = {"groups": {
        "first": {"name": "sgd", "params": ["0.*"], "lr": 0.05, "momentum": 0.9},  # layer 0
        "rest": {"name": "adamw", "params": "dense", "lr": 0.003}}}
    data["schedule"] = {"name": "CosineAnnealingLR", "warmup_steps": 10}
    with pytest.raises(config.ConfigError, match="already in group 'first'"):
        train(config.parse(data), progress=False)
    data["optimizer"]["groups"]["rest"]["params"] = ["2.*"]
    result = train(config.parse(data), progress=False)
    assert result.status == "finished"
    lrs = [r for r in map(json.loads, (tmp_path / "run" / layout.METRICS).read_text().splitlines())
           if r["group"] != "all" and "lr" in r["metrics"]]
    first = [r["metrics"]["lr"] for r in lrs if r["group"] == "first"]
    assert first[0] < 0.05 * 0.5 and max(first) == pytest.approx(0.05, rel=0.05)


def test_bf16_autocast_and_gradient_accumulation_train(tmp_path: Path) -> None:
    data = digits_config(tmp_path / "run", steps=150, batch_size=32, grad_accumulation=2,
                         eval_every=50)
    data["run"]["precision"] = "bf16"
    result = train(config.parse(data), progress=False)
    assert result.best["value"] >= 0.9
    # 300 micro-batches of 32 over 1347 training images: 43 batches per epoch (the last one 3)
    assert result.summary["samples"] == 6 * 1347 + 42 * 32


def test_ctr_through_the_runner_gets_within_2_percent_of_the_optimal_logloss(
        tmp_path: Path) -> None:
    """The demo's optimizer (row-wise Adagrad + AdamW) on a small generated click log."""
    data = config.tomllib.loads((ROOT / "examples" / "ctr-demo.toml").read_text())
    data["run"]["output"] = str(tmp_path / "run")
    data["workload"]["options"].update(vocab=200, n_train=200_000, n_eval=20_000)
    data["train"].update(epochs=2, eval_every=100)
    del data["train"]["steps"]
    result = train(config.parse(data), progress=False)
    optimum = result.summary["info"]["optimal_logloss"]
    assert result.final_metrics["logloss"] <= 1.02 * optimum
    assert result.summary["target"]["reached_step"] is not None
    assert result.steps == 2 * 391  # 200,000 samples in batches of 512, twice


def test_mnist1d_logistic_regression_reaches_the_papers_accuracy(tmp_path: Path) -> None:
    data = config.tomllib.loads((ROOT / "examples" / "mnist1d-logreg.toml").read_text())
    data["run"]["output"] = str(tmp_path / "run")
    data["train"].update(steps=1000, eval_every=250)
    result = train(config.parse(data), progress=False)
    assert result.best["value"] >= 0.32 - 0.03


@pytest.mark.parametrize(("model", "paper"), [("logreg", 0.32), ("mlp", 0.68), ("cnn", 0.94)])
def test_the_mnist1d_examples_reproduce_the_papers_table(
        model: str, paper: float, tmp_path: Path) -> None:
    """Greydanus 2020, Table 1: logistic regression 32%, MLP 68%, CNN 94% (within 3 points)."""
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "examples" / f"mnist1d-{model}.toml"), "-q",
                 "--output", str(out)]) == 0
    final = json.loads((out / layout.SUMMARY).read_text())["final"]["accuracy"]
    assert abs(final - paper) <= 0.03, final


def test_lbfgs_runs_with_its_own_closure_convention(tmp_path: Path) -> None:
    data = {"run": {"output": str(tmp_path / "run"), "precision": "fp64"},
            "workload": {"name": "rosenbrock"},
            "optimizer": {"name": "lbfgs", "line_search_fn": "strong_wolfe", "max_iter": 20,
                          "tolerance_grad": 1e-12, "tolerance_change": 1e-15},
            "train": {"steps": 50, "eval_every": 1, "stop_at_target": True}}
    result = train(config.parse(data), progress=False)
    assert result.status == "target_reached" and result.final_metrics["distance"] < 1e-6


def test_a_failing_checkpoint_write_is_reported_and_training_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at one save: an event, a counter, a retry at the next save, no crash."""
    from gradguard.ckpt.commit import RenameCommit

    commit = RenameCommit.commit
    calls = {"n": 0}

    def disk_full_once(self: RenameCommit, staging: str, name: str, manifest: bytes) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return commit(self, staging, name, manifest)

    monkeypatch.setattr(RenameCommit, "commit", disk_full_once)
    out = tmp_path / "run"
    result = train(config.parse(digits_config(out, steps=40, eval_every=10)), progress=False)
    assert result.status == "finished" and result.steps == 40
    failed = [e for e in events(out) if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [20] and "No space left" in failed[0]["error"]
    assert result.summary["checkpoints"] == {"saved": 3, "failed": 1}
    assert sorted(int(p.name.split("-")[1]) for p in (out / layout.CHECKPOINTS).glob("step-*")) \
        == [10, 30, 40]


def test_a_terminal_shows_a_progress_bar_guard_events_and_a_summary(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=220, color_system=None)
    data = digits_config(tmp_path / "run", steps=60, eval_every=20)
    data["guard"] = {"policy": {"detectors": {"grad_spike": {"sigmas": 1.0, "warmup": 5}},
                                "escalation": []}}
    train(config.parse(data), console=console)
    shown = screen.getvalue()
    for text in ("train", "loss", "lr", "steps/s", "ETA", "accuracy"):
        assert text in shown, text
    assert "guard step" in shown and "grad_spike -> skip" in shown
    assert "run finished" in shown and "best accuracy" in shown and "report:" in shown


def test_report_false_skips_the_report_which_can_be_drawn_later(tmp_path: Path) -> None:
    from gradguard.report import build_report

    data = digits_config(tmp_path / "run", steps=20, eval_every=10)
    data["run"]["report"] = False
    result = train(config.parse(data), progress=False)
    assert result.status == "finished" and result.report is None
    assert (tmp_path / "run" / layout.SUMMARY).exists()
    assert not (tmp_path / "run" / "report.html").exists()
    assert build_report(tmp_path / "run") == tmp_path / "run" / "report.html"
