"""Signed checkpoints: with a key, restore refuses unsigned and mis-signed manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradguard.ckpt import Checkpointer, CheckpointSignatureError, verify
from gradguard.ckpt.format import manifest_digest
from gradguard.ckpt.signing import KEY_ENV, KEY_FILE_ENV
from tests.ckpt.helpers import tiny_model


def test_with_a_key_the_manifest_carries_an_hmac(tmp_path: Path) -> None:
    info = Checkpointer(tmp_path, signing_key="s3cret").save(1, model=tiny_model())
    signature = json.loads((Path(info.path) / "manifest.json").read_text())["signature"]
    assert signature["algorithm"] == "hmac-sha256" and len(signature["value"]) == 64
    assert info.signed and "s3cret" not in json.dumps(signature)


def test_the_key_comes_from_the_environment_or_a_key_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "from-env")
    Checkpointer(tmp_path / "a").save(1, model=tiny_model())
    assert verify(tmp_path / "a" / "step-000000000001").signed
    monkeypatch.delenv(KEY_ENV)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    Checkpointer(tmp_path / "b").save(1, model=tiny_model())
    verify(tmp_path / "b" / "step-000000000001", signing_key="from-file")
    with pytest.raises(CheckpointSignatureError):
        verify(tmp_path / "b" / "step-000000000001", signing_key="from-env")


def test_an_unsigned_checkpoint_is_refused_when_a_key_is_configured(tmp_path: Path) -> None:
    Checkpointer(tmp_path).save(1, model=tiny_model())
    with pytest.raises(CheckpointSignatureError, match="not signed"):
        Checkpointer(tmp_path, signing_key="k").restore(model=tiny_model(),
                                                       path=tmp_path / "step-000000000001")


def test_a_checkpoint_signed_with_another_key_is_refused(tmp_path: Path) -> None:
    Checkpointer(tmp_path, signing_key="one").save(1, model=tiny_model())
    with pytest.raises(CheckpointSignatureError, match="another key"):
        Checkpointer(tmp_path, signing_key="two").restore(model=tiny_model(),
                                                         path=tmp_path / "step-000000000001")


def test_a_manifest_edited_with_a_recomputed_checksum_is_caught_by_the_signature(
        tmp_path: Path) -> None:
    info = Checkpointer(tmp_path, signing_key="k").save(1, model=tiny_model(),
                                                        metrics={"loss": 1.0})
    path = Path(info.path) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["loss"] = 0.001  # a flattering edit, checksum fixed up
    manifest["checksum"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    verify(info.path)  # without the key the edit is undetectable
    with pytest.raises(CheckpointSignatureError, match="changed after signing"):
        verify(info.path, signing_key="k")


def test_without_a_key_signed_checkpoints_still_restore(tmp_path: Path) -> None:
    Checkpointer(tmp_path, signing_key="k").save(1, model=tiny_model())
    assert Checkpointer(tmp_path).restore(model=tiny_model()).signed
