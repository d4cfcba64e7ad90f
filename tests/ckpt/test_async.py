"""Async save: the caller is blocked only for the snapshot; one save in flight; errors surface."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradguard.ckpt import Checkpointer, CheckpointWriteError, RenameCommit, checkpointer
from gradguard.ckpt.audit import read_audit
from tests.ckpt.helpers import same_state, state_copy, tiny_model, trained

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba not installed: snapshots use np.copyto")


class GatedCommit(RenameCommit):
    """A local protocol whose commits wait for a gate (slow storage), or fail (full disk)."""

    def __init__(self, root: str, fail: bool = False) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.fail = fail
        self.committing = threading.Event()

    def commit(self, staging: str, name: str, manifest: bytes) -> str:
        self.committing.set()
        if self.fail:
            raise OSError(28, "No space left on device")
        assert self.gate.wait(10)
        return super().commit(staging, name, manifest)


@pytest.mark.parametrize("copy", ["memcpy", pytest.param("streaming", marks=needs_numba),
                                  "memcpy above the threshold"])
def test_async_save_stores_the_state_as_it_was_when_called(
        tmp_path: Path, copy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots of STREAM_COPY_BYTES or more take the streaming copy (with numba) or
    np.copyto (without); small ones np.copyto. Each holds the state of the call."""
    if copy != "memcpy":
        monkeypatch.setattr(checkpointer, "STREAM_COPY_BYTES", 1)
    if copy == "memcpy above the threshold":
        monkeypatch.setattr(checkpointer, "_stream_copy", lambda: None)
    model = tiny_model()
    optimizer = trained(model)
    before = state_copy(model)
    ckpt = Checkpointer(tmp_path)
    ckpt.save_async(1, model=model, optimizer=optimizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the write happens
    info = ckpt.wait()
    assert info is not None and info.step == 1
    restored = tiny_model(seed=5)
    ckpt.restore(model=restored)
    assert same_state(restored.state_dict(), before)


def test_async_save_returns_before_the_write_completes(tmp_path: Path) -> None:
    protocol = GatedCommit(str(tmp_path))
    ckpt = Checkpointer(tmp_path, commit=protocol)
    ckpt.save_async(1, model=tiny_model())
    assert protocol.committing.wait(10) and ckpt.in_flight
    assert ckpt.steps() == []  # nothing visible until the commit
    protocol.gate.set()
    ckpt.wait()
    assert ckpt.steps() == [1] and not ckpt.in_flight


def test_at_most_one_save_is_in_flight(tmp_path: Path) -> None:
    protocol = GatedCommit(str(tmp_path))
    ckpt = Checkpointer(tmp_path, commit=protocol)
    ckpt.save_async(1, model=tiny_model())
    second = threading.Thread(target=ckpt.save_async, args=(2,), kwargs={"model": tiny_model()})
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # blocked behind the first save
    protocol.gate.set()
    second.join(10)
    ckpt.wait()
    assert ckpt.steps() == [1, 2]


def test_a_failed_background_write_surfaces_on_the_next_call(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, commit=GatedCommit(str(tmp_path), fail=True))
    ckpt.save_async(3, model=tiny_model())
    with pytest.raises(CheckpointWriteError, match=r"step 3.*No space left") as err:
        ckpt.save_async(4, model=tiny_model())
    assert isinstance(err.value.__cause__, OSError)
    assert ckpt.steps() == [] and list(tmp_path.glob(".tmp-*")) == []
    assert [r["event"] for r in read_audit(tmp_path / "audit.jsonl")] == ["save_failed"]
    ckpt.wait()  # the error was raised once; the Checkpointer is usable again


@pytest.mark.parametrize("next_call", ["wait", "latest", "save", "restore"])
def test_every_next_call_raises_the_write_error(next_call: str, tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, commit=GatedCommit(str(tmp_path), fail=True))
    ckpt.save_async(1, model=tiny_model())
    call = {"wait": lambda: ckpt.wait(), "latest": lambda: ckpt.latest(),
            "save": lambda: ckpt.save(2, model=tiny_model()),
            "restore": lambda: ckpt.restore(model=tiny_model())}[next_call]
    with pytest.raises(CheckpointWriteError):
        call()


def test_snapshot_buffers_are_reused_between_async_saves(tmp_path: Path) -> None:
    model = tiny_model()
    ckpt = Checkpointer(tmp_path)
    ckpt.save_async(1, model=model)
    ckpt.wait()
    first = {k: v.data_ptr() for k, v in ckpt._buffers.items()}
    ckpt.save_async(2, model=model)
    ckpt.wait()
    assert {k: v.data_ptr() for k, v in ckpt._buffers.items()} == first


def test_maybe_save_saves_on_multiples_of_every(tmp_path: Path) -> None:
    model = tiny_model()
    with Checkpointer(tmp_path, keep_last=None) as ckpt:
        saved = [ckpt.maybe_save(step, 5, model=model) for step in range(12)]
    assert saved == [s % 5 == 0 for s in range(12)]
    assert ckpt.steps() == [0, 5, 10]



@needs_numba
def test_streaming_copy_copies_every_byte_at_any_alignment() -> None:
    from gradguard.ckpt._stream_copy import stream_copy

    source = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    for dst_offset in (0, 1, 31, 63, 64):
        for src_offset in (0, 5, 64):
            for size in (0, 1, 63, 64, 65, 127, 1000, 3000):
                dst = np.zeros(4096, np.uint8)
                stream_copy(dst[dst_offset:dst_offset + size],
                            source[src_offset:src_offset + size])
                assert np.array_equal(dst[dst_offset:dst_offset + size],
                                      source[src_offset:src_offset + size])
                assert not dst[:dst_offset].any() and not dst[dst_offset + size:].any()
