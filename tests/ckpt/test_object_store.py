"""Object stores (fsspec): a commit marker written last decides what is visible."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest

from gradguard.ckpt import (
    CheckpointCorruptError,
    Checkpointer,
    MarkerCommit,
    verify,
)
from tests.ckpt.helpers import same_state, tiny_model, trained


@pytest.fixture
def root() -> Iterator[str]:
    url = f"memory://gradguard-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_object_stores_use_the_marker_protocol_and_write_the_marker_last(root: str) -> None:
    ckpt = Checkpointer(root)
    assert isinstance(ckpt.protocol, MarkerCommit)
    info = ckpt.save(1, model=tiny_model())
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(info.path, detail=False))
    assert names == ["COMMITTED", "manifest.json", "model.safetensors", "run.safetensors"]
    assert fs._strip_protocol(info.path) == fs._strip_protocol(f"{root}/step-000000000001")


def test_save_and_restore_through_fsspec(root: str) -> None:
    model = tiny_model()
    optimizer = trained(model)
    ckpt = Checkpointer(root, keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, model=model, optimizer=optimizer, metrics={"loss": 1.0 / step})
    assert ckpt.steps() == [2, 3]
    restored = tiny_model(seed=3)
    info = Checkpointer(root).restore(model=restored)
    assert info.step == 3 and same_state(restored.state_dict(), model.state_dict())
    assert verify(info.path).step == 3


def test_a_checkpoint_without_its_marker_is_invisible_and_cleaned_up(root: str) -> None:
    ckpt = Checkpointer(root)
    ckpt.save(1, model=tiny_model())
    ckpt.save(2, model=tiny_model())
    fs = fsspec.filesystem("memory")
    fs.rm(f"{root}/step-000000000002/COMMITTED")  # as if the writer died before the marker
    latest = ckpt.latest()
    assert latest is not None and latest.step == 1
    with pytest.raises(CheckpointCorruptError, match="no COMMITTED marker"):
        ckpt.restore(model=tiny_model(), path=f"{root}/step-000000000002")
    Checkpointer(root)
    assert not fs.exists(f"{root}/step-000000000002")


def test_a_marker_that_does_not_match_the_manifest_is_not_a_commit(root: str) -> None:
    ckpt = Checkpointer(root)
    ckpt.save(1, model=tiny_model())
    info = ckpt.save(2, model=tiny_model())
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{info.path}/COMMITTED", fs.cat_file(f"{root}/step-000000000001/COMMITTED"))
    with pytest.warns(UserWarning, match="does not match"):
        latest = ckpt.latest()
    assert latest is not None and latest.step == 1


def test_the_audit_log_is_kept_in_the_object_store(root: str) -> None:
    ckpt = Checkpointer(root)
    ckpt.save(1, model=tiny_model())
    ckpt.restore(model=tiny_model())
    lines = fsspec.filesystem("memory").cat_file(f"{root}/audit.jsonl").decode().splitlines()
    assert [line.split('"event": "')[1].split('"')[0] for line in lines] == ["save", "restore"]
