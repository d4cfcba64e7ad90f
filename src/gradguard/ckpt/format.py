"""The on-disk format of a gradguard checkpoint: safetensors files and a JSON manifest.

A checkpoint is one directory::

    step-000000001200/
      model.safetensors       the model's state dict; tensor names are its keys
      optimizer.safetensors   the optimizer's state tensors ("state/<param>/<key>")
      run.safetensors         tensors of everything else (RNG states, scheduler,
                              scaler, data position, extra), when there are any
      manifest.json           written last; format version, step, versions, the
                              non-tensor state, the tensor index, sha256 of every file
      COMMITTED               object stores only: the commit marker (see commit.py)

No pickle anywhere. Non-tensor values are JSON with a small tagged encoding that
round-trips what state dicts contain exactly:

======================  =============================================
Python value            JSON
======================  =============================================
None, bool, str, int    null, true/false, "...", 12 (any size)
finite float            1.0, 1e-08 (Python's repr: round-trips exactly)
nan, inf, -inf          {"$float": "nan"} / "inf" / "-inf"
list                    [...]
tuple                   {"$tuple": [...]}
dict with str keys      {"key": ...} (keys must not start with "$")
other dict (int keys)   {"$dict": [[key, value], ...]}, order kept
torch.Tensor            {"$tensor": "<name in the component's file>"}
numpy.ndarray           {"$ndarray": "<name>"} (stored as a tensor)
bytes                   {"$bytes": "<base64>"}
torch.dtype / device    {"$dtype": "float32"} / {"$device": "cuda:0"}
======================  =============================================

numpy scalars are stored as the Python int/float/bool of the same value.

The safetensors files are written and read by this module rather than through
``safetensors.torch.save_file``/``load``, for two reasons: the sha256 of each file
is computed from the same memory while it is written (in a second thread, so the
hash costs no extra pass over the disk), and loading builds writable tensors on
one buffer whose hash was checked, without a second copy. The layout is exactly
safetensors' (8-byte little-endian header length, JSON header padded with spaces
to 8 bytes, tensors sorted by alignment then name); the tests check that the
safetensors library reads our files and that we read its files identically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import numbers
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from .errors import CheckpointCorruptError, CheckpointFormatError, UnsafeFormatError

FORMAT_NAME = "gradguard.checkpoint"
FORMAT_VERSION = 1
"""Bumped on any change a version-1 reader would misread."""

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RUN_FILE = "run.safetensors"

# safetensors dtype names (the subset both torch and safetensors have).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _attr, _name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _attr):
        DTYPE_NAMES[getattr(torch, _attr)] = _name
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}

_MAX_HEADER = 100_000_000
_PARALLEL_HASH_BYTES = 1 << 20  # below this, hashing in the writing thread is cheaper


# --------------------------------------------------------------------- tree encoding
class TreeEncoder:
    """Encode nested state (state dicts, RNG states, user extras) as tagged JSON.

    Tensors are collected in :attr:`tensors` under names derived from their path
    (``"state/0/exp_avg"``), prefixed by ``prefix``; the JSON refers to them by name.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.tensors: dict[str, Tensor] = {}

    def encode(self, value: Any, path: tuple[str, ...] = ()) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, (float, np.floating)):
            x = float(value)
            if math.isfinite(x):
                return x
            return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(value, Tensor):
            return {"$tensor": self._add(check_storable(value, path), path)}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise CheckpointFormatError(f"cannot store an object array at {_where(path)}")
            array = torch.from_numpy(np.ascontiguousarray(value))
            return {"$ndarray": self._add(check_storable(array, path), path)}
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, (*path, str(i))) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v, (*path, k)) for k, v in value.items()}
            pairs = []
            for k, v in value.items():
                if isinstance(k, (Tensor, np.ndarray)):
                    raise CheckpointFormatError(f"cannot store a tensor as a dict key at "
                                                f"{_where(path)}")
                pairs.append([self.encode(k, path), self.encode(v, (*path, str(k)))])
            return {"$dict": pairs}
        raise CheckpointFormatError(
            f"cannot store a value of type {type(value).__module__}.{type(value).__qualname__} "
            f"at {_where(path)}: checkpoints hold tensors, numpy arrays, None, bool, int, "
            "float, str, bytes, lists, tuples and dicts of these (no pickle)")

    def _add(self, tensor: Tensor, path: tuple[str, ...]) -> str:
        base = "/".join((self.prefix, *path)) if self.prefix else "/".join(path)
        name, n = base or "tensor", 1
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        self.tensors[name] = tensor
        return name


def _where(path: tuple[str, ...]) -> str:
    return "/".join(path) or "the top level"


def check_storable(tensor: Tensor, path: tuple[str, ...] = ()) -> Tensor:
    """Return ``tensor`` if safetensors can hold it, else raise naming the path."""
    if tensor.layout != torch.strided:
        raise CheckpointFormatError(f"cannot store the {tensor.layout} tensor at {_where(path)}; "
                                    "convert it to a dense tensor first")
    if tensor.dtype not in DTYPE_NAMES:
        raise CheckpointFormatError(
            f"cannot store the {tensor.dtype} tensor at {_where(path)}: safetensors holds "
            + ", ".join(str(d).removeprefix("torch.") for d in DTYPE_NAMES))
    if tensor.device.type == "meta":
        raise CheckpointFormatError(f"cannot store the meta tensor at {_where(path)} (no data)")
    return tensor


def decode_tree(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :meth:`TreeEncoder.encode`, given the tensors it referred to."""
    if isinstance(value, list):
        return [decode_tree(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, body), = value.items()
        if tag.startswith("$"):
            return _decode_tagged(tag, body, tensors)
    return {k: decode_tree(v, tensors) for k, v in value.items()}


def _decode_tagged(tag: str, body: Any, tensors: Mapping[str, Tensor]) -> Any:
    if tag in ("$tensor", "$ndarray"):
        if body not in tensors:
            raise CheckpointCorruptError(f"the manifest refers to tensor {body!r}, which is not "
                                         "in the checkpoint's files")
        return tensors[body] if tag == "$tensor" else tensors[body].numpy()
    if tag == "$float":
        return float(body)
    if tag == "$tuple":
        return tuple(decode_tree(v, tensors) for v in body)
    if tag == "$dict":
        return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in body}
    if tag == "$bytes":
        return base64.b64decode(body)
    if tag == "$dtype":
        dtype = getattr(torch, body, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointCorruptError(f"unknown dtype {body!r} in the manifest")
        return dtype
    if tag == "$device":
        return torch.device(body)
    raise CheckpointFormatError(f"unknown tag {tag!r} in the manifest (written by a newer "
                                "gradguard?)")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def tensor_refs(value: Any) -> Iterable[str]:
    """The names of all tensors an encoded tree refers to."""
    if isinstance(value, list):
        for v in value:
            yield from tensor_refs(v)
    elif isinstance(value, dict):
        if len(value) == 1:
            (tag, body), = value.items()
            if tag in ("$tensor", "$ndarray"):
                yield body
                return
        for v in value.values():
            yield from tensor_refs(v)


# ------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class FileRecord:
    """What the manifest records about one written file."""

    sha256: str
    bytes: int
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype": "F32", "shape": [...]}

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, "tensors": self.tensors}


def host_contiguous(tensor: Tensor) -> Tensor:
    """The tensor's bytes as a contiguous CPU tensor (a copy only where needed)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


def _byte_view(tensor: Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _ordered(tensors: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    # safetensors' order: largest alignment first, then by name, so that every
    # tensor's offset is a multiple of its element size.
    return sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))


def safetensors_header(tensors: Mapping[str, Tensor],
                       metadata: Mapping[str, str] | None = None,
                       ) -> tuple[bytes, list[tuple[str, Tensor]], dict[str, dict[str, Any]]]:
    """The header bytes of a safetensors file for ``tensors``, their order, and the index."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    index: dict[str, dict[str, Any]] = {}
    ordered = _ordered(tensors)
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + size]}
        index[name] = entry
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered, index


class _Hasher:
    """sha256 over a list of buffers, in a background thread for large ones.

    hashlib releases the GIL on large buffers, so hashing runs on another core
    while the writer thread copies the same memory into the file.
    """

    def __init__(self, buffers: list[Any], total: int) -> None:
        self._digest = hashlib.sha256()
        self._buffers = buffers
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if total >= _PARALLEL_HASH_BYTES:
            self._thread = threading.Thread(target=self._run, name="gradguard-ckpt-sha256",
                                            daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            for buffer in self._buffers:
                self._digest.update(buffer)
        except BaseException as err:  # surfaced in hexdigest()
            self._error = err

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()


def write_safetensors(open_file: Callable[[], AbstractContextManager[IO[bytes]]],
                      tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> FileRecord:
    """Write ``tensors`` (contiguous, on the CPU) as one safetensors file.

    ``open_file()`` gives the destination; leaving its context must make the file
    durable (fsync), which overlaps with the sha256 computed alongside.
    """
    if sys.byteorder != "little":
        raise CheckpointFormatError("gradguard checkpoints are written on little-endian hosts")
    header, ordered, index = safetensors_header(tensors, metadata)
    buffers: list[Any] = [header] + [_byte_view(t) for _, t in ordered if t.numel()]
    total = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)
    hasher = _Hasher(buffers, total)
    with open_file() as f:
        for buffer in buffers:
            f.write(buffer)
    return FileRecord(sha256=hasher.hexdigest(), bytes=total, tensors=index)


def sniff_unsafe(data: bytes | bytearray | memoryview, name: str) -> None:
    """Raise :class:`UnsafeFormatError` if ``data`` is a pickle or a torch.save archive."""
    head = bytes(data[:4])
    kind = None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        kind = f"a pickle stream (protocol {head[1]})"
    elif head == b"PK\x03\x04":
        kind = "a zip archive (torch.save's format, which holds a pickle)"
    if kind is not None:
        raise UnsafeFormatError(
            f"{name} is {kind}. Loading it would need unpickling, which can run arbitrary "
            "code; gradguard checkpoints never contain pickles, so it was refused unread",
            problems=[f"{name}: {kind}; refused without unpickling"])


def read_safetensors(data: bytearray, name: str) -> dict[str, Tensor]:
    """Parse one safetensors file held in ``data`` into tensors that view ``data``.

    The tensors are writable and share the buffer (no copy). Anything that is not
    a well-formed safetensors file raises :class:`CheckpointCorruptError`.
    """
    sniff_unsafe(data, name)

    def corrupt(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{name} is not a valid safetensors file: {why}",
                                      problems=[f"{name}: {why}"])

    if len(data) < 8:
        raise corrupt(f"{len(data)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > min(_MAX_HEADER, len(data) - 8):
        raise corrupt(f"header length {header_len} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[8:8 + header_len]).decode("utf-8"),
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise corrupt(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + header_len
    body_len = len(data) - start
    spans = []
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for tensor {key!r}: {entry!r}") from None
        count = math.prod(shape)
        if min(shape, default=0) < 0 or end - begin != count * _itemsize(dtype):
            raise corrupt(f"tensor {key!r}: offsets {begin}..{end} do not hold "
                          f"{entry['dtype']}{shape}")
        spans.append((begin, end, key, dtype, shape, count))
    spans.sort()
    position = 0
    for begin, end, key, *_ in spans:
        if begin != position:
            raise corrupt(f"tensor {key!r} starts at {begin}, expected {position}")
        position = end
    if position != body_len:
        raise corrupt(f"the tensors end at byte {position} of the data section, which has "
                      f"{body_len} bytes (truncated or padded)")
    out: dict[str, Tensor] = {}
    for begin, _end, key, dtype, shape, count in spans:
        if count == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif (start + begin) % _itemsize(dtype):
            raw = torch.frombuffer(data, dtype=torch.uint8, count=count * _itemsize(dtype),
                                   offset=start + begin)
            out[key] = raw.clone().view(dtype).reshape(shape)
        else:
            out[key] = torch.frombuffer(data, dtype=dtype, count=count,
                                        offset=start + begin).reshape(shape)
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- manifest
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def canonical_json(value: Any) -> bytes:
    """The canonical serialisation that checksums and signatures are computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its checksum and signature."""
    body = {k: v for k, v in manifest.items() if k not in ("checksum", "signature")}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


def dump_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The manifest file's bytes (readable JSON, strict: no NaN constants)."""
    return (json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False)
            + "\n").encode("utf-8")


def parse_manifest(data: bytes, name: str = MANIFEST) -> dict[str, Any]:
    """Parse manifest bytes, refusing pickles and anything that is not a manifest."""
    sniff_unsafe(data, name)
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointCorruptError(f"{name} is not valid JSON: {err}",
                                     problems=[f"{name}: not valid JSON ({err})"]) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(f"{name} is not a gradguard checkpoint manifest",
                                     problems=[f"{name}: not a gradguard manifest"])
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointFormatError(f"{name} has format version {version!r}; this gradguard "
                                    f"reads versions 1..{FORMAT_VERSION}")
    problems = _schema_problems(manifest)
    if problems:
        raise CheckpointCorruptError(f"{name} is malformed: " + "; ".join(problems),
                                     problems=[f"{name}: {p}" for p in problems])
    return manifest


def _schema_problems(m: Mapping[str, Any]) -> list[str]:
    problems = []
    if not isinstance(m.get("step"), int) or isinstance(m.get("step"), bool) or m["step"] < 0:
        problems.append(f"step {m.get('step')!r} is not a non-negative integer")
    files = m.get("files")
    if not isinstance(files, dict):
        problems.append("'files' is missing")
    else:
        for fname, record in files.items():
            if ("/" in fname or "\\" in fname or fname.startswith(".")
                    or fname in (MANIFEST, "COMMITTED")):
                problems.append(f"file name {fname!r} is not allowed")
            if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                    and isinstance(record.get("bytes"), int)
                    and isinstance(record.get("tensors"), dict)):
                problems.append(f"the record of {fname!r} is incomplete")
    if not isinstance(m.get("components"), dict):
        problems.append("'components' is missing")
    else:
        for cname, comp in m["components"].items():
            if not isinstance(comp, dict) or "tree" not in comp:
                problems.append(f"component {cname!r} is incomplete")
            elif comp.get("file") is not None and (not isinstance(files, dict)
                                                   or comp["file"] not in files):
                problems.append(f"component {cname!r} refers to unlisted file {comp['file']!r}")
    if not isinstance(m.get("checksum"), str):
        problems.append("'checksum' is missing")
    return problems
