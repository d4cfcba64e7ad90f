"""The run config: every bad value is refused with its key path and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradguard.cli import main
from gradguard.run import config
from gradguard.run.config import ConfigError
from gradguard.run.examples import example

GOOD: dict[str, Any] = {
    "workload": {"name": "quadratic", "options": {"dim": 4}},
    "optimizer": {"name": "adam", "lr": 0.1},
    "train": {"steps": 10},
}


def with_(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one key set (``value=DELETE`` removes it)."""
    import copy

    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last)
    else:
        node[last] = value
    return data


DELETE = object()

# (key set, value, key path in the error, words the message must contain)
BAD = [
    ("run.device", "gpu", "run.device", ["'gpu'", "cuda"]),
    ("run.precision", "fp16", "run.precision", ["'fp16'", "bf16", "fp64"]),
    ("run.seed", -1, "run.seed", ["-1", "greater than or equal to 0"]),
    ("run.threads", 0, "run.threads", ["0"]),
    ("run.colour", "red", "run.colour", ["unknown key", "allowed: output, seed"]),
    ("workload", DELETE, "workload", ["missing"]),
    ("workload.name", "digitz", "workload.name", ["'digitz'", "did you mean 'digits'",
                                                  "package.module:factory"]),
    ("workload.options", {"dimm": 3}, "workload.options.dimm", ["did you mean 'dim'",
                                                                "allowed: dim"]),
    ("optimizer.name", "adamm", "optimizer.name", ["'adamm'", "did you mean 'adam'"]),
    ("optimizer.lr", -1.0, "optimizer.lr", ["lr=-1.0", "allowed"]),
    ("optimizer.lrr", 0.1, "optimizer.lrr", ["'lrr'", "did you mean 'lr'", "allowed: lr"]),
    ("optimizer.betas", [0.9, 1.5], "optimizer.betas", ["betas", "allowed"]),
    ("optimizer.groups", {"a": {"name": "adam", "params": "all"}}, "optimizer",
     ["either name", "not both"]),
    ("train.steps", 0, "train.steps", ["0", "greater than or equal to 1"]),
    ("train.epochs", 2, "train", ["exactly one of steps or epochs"]),
    ("train.batch_size", "big", "train.batch_size", ["'big'", "integer"]),
    ("train.eval_every", 100, "train.eval_every", ["more than train.steps"]),
    ("train.early_stopping", {"patience": 0}, "train.early_stopping.patience", ["0"]),
    ("schedule.name", "CosineAnealingLR", "schedule.name", ["did you mean 'CosineAnnealingLR'"]),
    ("schedule.kwargs", {"gama": 0.9}, "schedule.kwargs.gama", ["allowed:"]),
    ("schedule.warmup_start_factor", 0.0, "schedule.warmup_start_factor", ["greater than 0"]),
    ("guard.policy", {"clip_norm": "x"}, "guard.policy", ["clip_norm='x'", "allowed"]),
    ("guard.policy", {"detectors": {"loss_spike": {"sigmas": -1}}}, "guard.policy",
     ["sigmas=-1", "> 0"]),
    ("recorder.every", 0, "recorder.every", ["0"]),
    ("recorder.prometheus_port", 70000, "recorder.prometheus_port", ["70000"]),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last", ["0"]),
    ("checkpoint.everyy", 5, "checkpoint.everyy", ["did you mean 'every'"]),
]


@pytest.mark.parametrize(("key", "value", "where", "words"), BAD,
                         ids=[f"{b[0]}={b[1]!r}"[:40] for b in BAD])
def test_a_bad_config_names_the_key_the_value_and_what_is_allowed(
        key: str, value: Any, where: str, words: list[str]) -> None:
    data = with_(key, value)
    if key == "schedule.kwargs":
        data["schedule"]["name"] = "ExponentialLR"
    with pytest.raises(ConfigError) as info:
        config.parse(data, "bad.toml")
    paths = [p for p, _ in info.value.problems]
    assert where in paths, info.value
    message = dict(info.value.problems)[where]
    for word in words:
        assert word in message, (word, message)
    assert "bad.toml" in str(info.value)


def test_hybrid_groups_are_checked_per_group() -> None:
    data = dict(GOOD, optimizer={"groups": {
        "emb": {"name": "rowwise_adagrad", "params": "embeddings", "lr": -2},
        "rest": {"name": "newton", "params": "dense"},
        "odd": {"name": "adam", "params": "sideways"}}})
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    problems = dict(info.value.problems)
    assert "lr=-2" in problems["optimizer.groups.emb.lr"]
    assert "full-batch" in problems["optimizer.groups.rest.name"]
    assert "'sideways' is not a selector" in problems["optimizer.groups.odd.params"]


def test_a_good_config_validates_and_fills_every_default() -> None:
    cfg = config.parse(GOOD)
    assert cfg.run.seed == 0 and cfg.train.batch_size == 128 and cfg.guard.enabled
    assert cfg.optimizer.hyperparameters == {"lr": 0.1}


def test_to_dict_round_trips_through_toml() -> None:
    cfg = config.parse(with_("schedule", {"name": "StepLR", "kwargs": {"step_size": 3},
                                          "warmup_steps": 2}))
    text = config.dumps(cfg.to_dict())
    again = config.parse(config.tomllib.loads(text))
    assert again == cfg


def test_overrides_set_values_by_key_path(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(config.dumps(GOOD))
    cfg = config.load(path, ["train.steps=7", 'optimizer.name="sgd"', "optimizer.lr=0.5",
                             "run.output=elsewhere"])
    assert (cfg.train.steps, cfg.optimizer.name, cfg.optimizer.hyperparameters["lr"],
            cfg.run.output) == (7, "sgd", 0.5, "elsewhere")
    with pytest.raises(ConfigError, match=r"KEY\.PATH=VALUE"):
        config.load(path, ["train.steps"])


def test_the_run_directory_defaults_to_runs_slash_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "my-run.toml"
    path.write_text(config.dumps(GOOD))
    assert config.load(path).run.output == str(Path("runs") / "my-run")


def test_syntax_errors_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


@pytest.mark.parametrize("workload", ["ctr", "digits", "mnist1d", "quadratic", "rosenbrock"])
def test_every_printed_example_is_a_valid_config(workload: str, tmp_path: Path) -> None:
    path = tmp_path / f"{workload}.toml"
    path.write_text(example(workload))
    cfg = config.load(path)
    assert cfg.workload.name == workload


def test_config_check_cli_exits_0_for_good_and_1_for_bad(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(config.dumps(GOOD))
    bad.write_text(config.dumps(with_("optimizer.lr", -1.0)))
    assert main(["config", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["config", "check", str(bad)]) == 1
    assert "lr=-1.0" in capsys.readouterr().err


def test_config_example_cli_prints_a_commented_file() -> None:
    out = subprocess.run([sys.executable, "-m", "gradguard", "config", "example", "ctr"],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("# gradguard run configuration")
    assert 'name = "rowwise_adagrad"' in out
    assert subprocess.run([sys.executable, "-m", "gradguard", "config", "example", "nope"],
                          capture_output=True, text=True).returncode == 2
