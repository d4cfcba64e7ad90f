"""`gradguard ckpt list | inspect | verify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradguard.ckpt import Checkpointer
from gradguard.cli import main
from tests.ckpt.helpers import flip_byte, tiny_model, trained


@pytest.fixture
def root(tmp_path: Path) -> Path:
    model = tiny_model()
    optimizer = trained(model, weight_decay=0.05)
    ckpt = Checkpointer(tmp_path, config={"run": "cli-test"})
    ckpt.save(10, model=model, optimizer=optimizer, metrics={"loss": 0.5})
    ckpt.save(20, model=model, optimizer=optimizer, metrics={"loss": 0.25})
    return tmp_path


def test_list_prints_one_line_per_committed_checkpoint(root: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ckpt", "list", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "STEP"
    assert [line.split()[0] for line in lines[1:]] == ["10", "20"]
    assert "loss=0.25" in lines[2]


def test_list_json_is_machine_readable(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ckpt", "list", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["metrics"] == {"loss": 0.5}


def test_inspect_shows_step_config_optimizer_and_sizes(root: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ckpt", "inspect", str(root / "step-000000000020")]) == 0
    out = capsys.readouterr().out
    assert "step:        20" in out
    assert "optimizer:   gradguard.optim.adam.AdamW" in out
    assert "weight_decay=0.05" in out and "betas=(0.9, 0.999)" in out
    assert 'run config:  {"run": "cli-test"}' in out
    assert "model.safetensors" in out and "optimizer.safetensors" in out


def test_verify_exits_0_for_a_good_checkpoint(root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ckpt", "verify", str(root / "step-000000000010")]) == 0
    assert capsys.readouterr().out.startswith("OK ")


def test_verify_exits_1_and_lists_the_problems(root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    flip_byte(root / "step-000000000010" / "optimizer.safetensors")
    assert main(["ckpt", "verify", str(root / "step-000000000010")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED ") and "optimizer.safetensors: sha256" in out


def test_verify_with_a_key_file_checks_the_signature(root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key"
    key.write_text("k")
    assert main(["ckpt", "verify", str(root / "step-000000000010"), "--key-file", str(key)]) == 1
    assert "not signed" in capsys.readouterr().out


def test_verify_of_a_missing_path_exits_1(tmp_path: Path) -> None:
    assert main(["ckpt", "verify", str(tmp_path / "nope")]) == 1
