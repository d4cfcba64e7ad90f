"""Bad files are refused with a clear error; nothing is executed and nothing is overwritten.

Each case damages a good checkpoint the way disks, killed writers or attackers
do, then restores from it: the restore must fail naming the problem, leave the
model and optimizer untouched, and leave the checkpoint's files as they were.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gradguard.optim as go
from gradguard.ckpt import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    UnsafeFormatError,
)
from gradguard.ckpt.format import manifest_digest
from tests.ckpt.helpers import (
    flip_byte,
    same_state,
    snapshot_files,
    state_copy,
    tiny_model,
    trained,
)


class CreatesAFile:
    """Unpickling this creates ``path``: the proof that something was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def rehash(checkpoint: Path, filename: str) -> None:
    """Update the manifest for a replaced file, as an attacker without the key would."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / filename).read_bytes()
    manifest["files"][filename].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest["checksum"] = manifest_digest(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = tiny_model()
    Checkpointer(tmp_path / "run").save(1, model=model, optimizer=trained(model))
    return tmp_path / "run" / "step-000000000001"


def assert_refused(checkpoint: Path, error: type[CheckpointError], match: str) -> None:
    model = tiny_model(seed=7)
    optimizer = go.create("adamw", model.parameters(), lr=0.01)
    before_model, before_files = state_copy(model), snapshot_files(checkpoint.parent)
    with pytest.raises(error, match=match):
        Checkpointer(checkpoint.parent).restore(model=model, optimizer=optimizer,
                                                path=checkpoint)
    assert same_state(before_model, model.state_dict()) and not optimizer.state
    assert snapshot_files(checkpoint.parent) == before_files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def replace_text(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


DAMAGE: dict[str, tuple[Callable[[Path], None], type[CheckpointError], str]] = {
    "truncated tensor file": (
        lambda c: truncate(c / "optimizer.safetensors"),
        CheckpointCorruptError, r"optimizer\.safetensors has \d+ bytes, the manifest records "
                                r"\d+ \(truncated\)"),
    "edited manifest": (
        lambda c: replace_text(c / "manifest.json", '"step": 1', '"step": 2'),
        CheckpointCorruptError, r"manifest\.json was changed after it was written"),
    "flipped byte": (
        lambda c: flip_byte(c / "model.safetensors", offset=-3),
        CheckpointCorruptError, r"model\.safetensors: sha256 \w+ does not match"),
    "missing file": (
        lambda c: (c / "optimizer.safetensors").unlink(),
        CheckpointCorruptError, r"optimizer\.safetensors is missing"),
    "manifest that is not JSON": (
        lambda c: replace_text(c / "manifest.json", "{", "{not json", ),
        CheckpointCorruptError, r"manifest\.json is not valid JSON"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=DAMAGE)
def test_damaged_checkpoints_are_refused_naming_the_problem(case: str, saved: Path) -> None:
    damage, error, match = DAMAGE[case]
    damage(saved)
    assert_refused(saved, error, match)


def test_a_pickle_in_place_of_a_tensor_file_is_refused_unexecuted(saved: Path,
                                                                   tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (saved / "model.safetensors").write_bytes(pickle.dumps(CreatesAFile(marker)))
    rehash(saved, "model.safetensors")  # checksums alone cannot tell
    assert_refused(saved, UnsafeFormatError, r"model\.safetensors: a pickle stream")
    assert not marker.exists()


def test_a_pickle_that_fails_the_checksum_is_still_named_as_a_pickle(saved: Path,
                                                                      tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (saved / "optimizer.safetensors").write_bytes(pickle.dumps(CreatesAFile(marker)))
    assert_refused(saved, UnsafeFormatError, r"(?s)the manifest records.*a pickle stream")
    assert not marker.exists()


def test_a_pickle_in_place_of_the_manifest_is_refused_unexecuted(saved: Path,
                                                                  tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (saved / "manifest.json").write_bytes(pickle.dumps(CreatesAFile(marker), protocol=4))
    assert_refused(saved, UnsafeFormatError, r"manifest\.json is a pickle stream")
    assert not marker.exists()


def test_a_torch_save_archive_is_refused_unread(saved: Path) -> None:
    torch.save(tiny_model().state_dict(), saved / "model.safetensors")
    rehash(saved, "model.safetensors")
    assert_refused(saved, UnsafeFormatError, r"zip archive \(torch\.save")


def test_a_torch_save_file_given_as_the_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"model": tiny_model().state_dict()}, tmp_path / "model.pt")
    with pytest.raises(UnsafeFormatError, match=r"model\.pt is a zip archive"):
        Checkpointer(tmp_path).restore(model=tiny_model(), path=tmp_path / "model.pt")


def test_a_checkpoint_of_another_model_is_refused_listing_the_differences(saved: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = go.create("adamw", model.parameters(), lr=0.01)
    before_model, before_files = state_copy(model), snapshot_files(saved.parent)
    with pytest.raises(CheckpointMismatchError) as err:
        Checkpointer(saved.parent).restore(model=model, optimizer=optimizer, path=saved)
    assert "'0.weight' has shape (8, 4) in the checkpoint, (16, 4) in the model" in str(err.value)
    assert "optimizer: parameter 0 has shape (8, 4) in the checkpoint, (16, 4) now" in str(
        err.value)
    assert same_state(before_model, model.state_dict()) and not optimizer.state
    assert snapshot_files(saved.parent) == before_files


def test_an_uncommitted_directory_is_never_restored(saved: Path) -> None:
    staging = saved.parent / ".tmp-step-000000000002-0badc0de"
    saved.rename(staging)
    with pytest.raises(CheckpointCorruptError, match="uncommitted temporary directory"):
        Checkpointer(saved.parent, cleanup=False).restore(model=tiny_model(), path=staging)
