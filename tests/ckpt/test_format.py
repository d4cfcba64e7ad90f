"""The checkpoint format: tagged JSON that round-trips state exactly, and safetensors files."""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import safetensors.torch
import torch

from gradguard.ckpt import CheckpointCorruptError, CheckpointFormatError, UnsafeFormatError
from gradguard.ckpt.format import (
    TreeEncoder,
    canonical_json,
    decode_tree,
    dump_manifest,
    host_contiguous,
    read_safetensors,
    write_safetensors,
)


def round_trip(value: Any) -> Any:
    encoder = TreeEncoder()
    encoded = json.loads(json.dumps(encoder.encode(value), allow_nan=False))
    return decode_tree(encoded, encoder.tensors)


def same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types (1 vs 1.0, tuple vs list) and NaN == NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) and type(k) is type(k2)
                                          for k, k2 in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


@contextmanager
def _into(buffer: io.BytesIO) -> Iterator[IO[bytes]]:
    yield buffer


def write_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    write_safetensors(lambda: _into(buffer), tensors)
    return buffer.getvalue()


STATE_LIKE_VALUES = {
    "tuple vs list": ((0.9, 0.999), [0.9, 0.999]),
    "int vs float": [1, 1.0, 0, 0.0, -3, 2**80, -(2**70)],
    "None and bool": [None, True, False],
    "int dict keys keep order": {3: "c", 0: "a", 1: "b"},
    "mixed keys": {0: 1, "0": 2, (1, 2): 3, None: 4, 2.5: 5},
    "floats exactly": [0.1 + 0.2, 1e-308, 5e-324, 1.7976931348623157e308, -0.0, 1 / 3],
    "non-finite": [math.nan, math.inf, -math.inf],
    "strings that look like tags": {"$tensor": "x", "$tuple": [1], "plain": "$float"},
    "nested": {"state": {0: {"momentum_buffer": None, "step": 3}},
               "param_groups": [{"betas": (0.9, 0.99), "params": [0, 1], "nesterov": False}]},
    "bytes and dtypes": [b"\x00\xff", torch.float64, torch.device("cpu")],
    "empty containers": [(), [], {}, ((),)],
    "python RNG state": __import__("random").getstate(),
}


@pytest.mark.parametrize("value", STATE_LIKE_VALUES.values(), ids=STATE_LIKE_VALUES.keys())
def test_non_tensor_values_round_trip_with_their_types(value: Any) -> None:
    assert same(round_trip(value), value)


def test_numpy_scalars_are_stored_as_python_numbers_and_arrays_as_arrays() -> None:
    out = round_trip({"i": np.int64(7), "f": np.float32(0.5), "b": np.bool_(True),
                      "a": np.arange(5, dtype=np.uint32)})
    assert same(out["i"], 7) and same(out["f"], 0.5) and same(out["b"], True)
    assert out["a"].dtype == np.uint32 and out["a"].tolist() == [0, 1, 2, 3, 4]


def test_numpy_generator_state_round_trips() -> None:
    state = np.random.get_state(legacy=False)
    out = round_trip(state)
    np.random.set_state(out)
    expected = np.random.standard_normal(3)
    np.random.set_state(state)
    assert np.array_equal(np.random.standard_normal(3), expected)


def test_encoded_json_is_strict_no_nan_constants() -> None:
    encoded = TreeEncoder().encode({"lr": math.nan, "best": math.inf})
    assert b"NaN" not in canonical_json(encoded)
    assert b"Infinity" not in dump_manifest({"x": encoded})


def test_tensors_become_references_named_by_their_path() -> None:
    encoder = TreeEncoder()
    encoded = encoder.encode({"state": {0: {"exp_avg": torch.zeros(2)}}})
    assert encoded == {"state": {"$dict": [[0, {"exp_avg": {"$tensor": "state/0/exp_avg"}}]]}}
    assert list(encoder.tensors) == ["state/0/exp_avg"]


TENSORS = {
    "step f32 0-dim": torch.tensor(12.0),
    "step f64 0-dim": torch.tensor(2.0**53 + 1, dtype=torch.float64),
    "bf16": torch.randn(3, 2).to(torch.bfloat16),
    "f16": torch.randn(5).half(),
    "bool": torch.tensor([True, False, True]),
    "int64": torch.tensor([-(2**62), 1]),
    "uint8 rng": torch.get_rng_state(),
    "empty": torch.zeros(0, 3),
    "nan and inf": torch.tensor([math.nan, math.inf, -0.0]),
}


@pytest.mark.parametrize("tensor", TENSORS.values(), ids=TENSORS.keys())
def test_tensors_round_trip_bit_exactly_with_dtype_and_shape(tensor: torch.Tensor) -> None:
    out = read_safetensors(bytearray(write_bytes({"t": tensor})), "t.safetensors")["t"]
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(bits(out), bits(tensor))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so NaN payloads and -0.0 compare exactly."""
    return tensor.reshape(-1).view(torch.uint8)


def test_non_contiguous_and_storage_sharing_tensors_are_stored_as_compact_copies() -> None:
    base = torch.arange(24.0).reshape(4, 6)
    encoder = TreeEncoder()
    encoded = encoder.encode({"t": base.t(), "row": base[1], "same": base, "again": base})
    data = write_bytes({k: host_contiguous(v) for k, v in encoder.tensors.items()})
    assert len(data) < 8 + 1024 + 4 * (24 + 6 + 24 + 24)  # no whole-storage copies
    out = decode_tree(encoded, read_safetensors(bytearray(data), "f"))
    assert torch.equal(out["t"], base.t()) and torch.equal(out["row"], base[1])
    assert torch.equal(out["same"], base) and torch.equal(out["again"], base)


def test_unsupported_values_are_refused_naming_where_they_are() -> None:
    with pytest.raises(CheckpointFormatError, match=r"state/0/fn.*no pickle"):
        TreeEncoder().encode({"state": {0: {"fn": lambda: 0}}})
    with pytest.raises(CheckpointFormatError, match="sparse"):
        TreeEncoder().encode({"w": torch.eye(2).to_sparse()})
    with pytest.raises(CheckpointFormatError, match="complex128"):
        TreeEncoder().encode({"w": torch.zeros(2, dtype=torch.complex128)})


def test_the_safetensors_library_reads_our_files_identically() -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "s": torch.tensor(1.5),
               "h": torch.randn(7).to(torch.bfloat16)}
    theirs = safetensors.torch.load(write_bytes(tensors))
    assert set(theirs) == set(tensors)
    assert all(torch.equal(theirs[k], tensors[k]) for k in tensors)


def test_we_read_the_safetensors_librarys_files_identically() -> None:
    tensors = {"x": torch.randn(2, 3, dtype=torch.float64), "z": torch.tensor(3.0),
               "y": torch.tensor([1, 2], dtype=torch.int8)}
    ours = read_safetensors(bytearray(safetensors.torch.save(tensors)), "lib.safetensors")
    assert all(torch.equal(ours[k], tensors[k]) and ours[k].dtype == tensors[k].dtype
               for k in tensors)


def test_loaded_tensors_are_writable() -> None:
    out = read_safetensors(bytearray(write_bytes({"s": torch.tensor(1.0)})), "f")
    out["s"] += 1  # step counters are updated in place after a restore
    assert out["s"].item() == 2.0


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(_Exploit(), protocol=2),
    pickle.dumps(_Exploit(), protocol=5),
], ids=["pickle-2", "pickle-5"])
def test_pickle_streams_are_refused_unread(payload: bytes, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    with pytest.raises(UnsafeFormatError, match="pickle"):
        read_safetensors(bytearray(payload), "model.safetensors")
    assert "unpickled!" not in capsys.readouterr().out


def test_torch_save_archives_are_refused_unread(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(UnsafeFormatError, match=r"torch\.save"):
        read_safetensors(bytearray((tmp_path / "w.pt").read_bytes()), "model.safetensors")


def test_a_header_that_does_not_cover_the_data_is_refused() -> None:
    good = write_bytes({"a": torch.zeros(4)})
    with pytest.raises(CheckpointCorruptError, match="truncated or padded"):
        read_safetensors(bytearray(good[:-4]), "f")
    with pytest.raises(CheckpointCorruptError, match="header length"):
        read_safetensors(bytearray(struct.pack("<Q", 10**9) + good[8:]), "f")
