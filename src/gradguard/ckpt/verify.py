"""Reading a checkpoint back: verification first, then parsing, never unpickling.

Verification of one checkpoint, in order:

1. it is committed (the protocol says so: a renamed directory, or a matching
   ``COMMITTED`` marker);
2. ``manifest.json`` is strict JSON (a pickle there is refused unread), in a
   format version this gradguard reads, and its checksum matches its content;
3. with a signing key configured, its HMAC-SHA256 signature is valid;
4. every file it lists exists, has the recorded size and sha256, is a
   well-formed safetensors file (a pickle or ``torch.save`` archive is refused
   unread) and holds exactly the tensors the manifest indexes.

All problems found are reported together.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import signing
from .commit import CommitProtocol, protocol_for, split_location, step_of
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSignatureError,
    UnsafeFormatError,
)
from .format import (
    DTYPES,
    MANIFEST,
    RUN_FILE,
    decode_tree,
    manifest_digest,
    parse_manifest,
    read_safetensors,
    sniff_unsafe,
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a verified checkpoint says about itself.

    ``step``, ``path``, ``extra``, ``metrics`` and ``data_position`` are what a
    training loop resumes from; the rest is for operators (``gradguard ckpt
    inspect`` prints it).
    """

    step: int
    path: str
    extra: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_position: Any = None
    config: Any = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    optimizer: str | None = None
    """The optimizer's class, ``module.QualName``."""
    optimizer_config_hash: str | None = None
    components: tuple[str, ...] = ()
    size_bytes: int = 0
    signed: bool = False
    format_version: int = 1


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its manifest and the tensors of the files that were parsed."""

    location: str
    manifest: dict[str, Any]
    tensors: dict[str, dict[str, Tensor]]

    def component(self, name: str) -> Any:
        """The decoded state of one component (``"model"``, ``"rng"``, …), or None."""
        comp = self.manifest["components"].get(name)
        if comp is None:
            return None
        return decode_tree(comp["tree"], self.tensors.get(comp.get("file") or "", {}))

    def info(self) -> CheckpointInfo:
        m = self.manifest
        opt = m["components"].get("optimizer") or {}
        return CheckpointInfo(
            step=m["step"],
            path=self.location,
            extra=self.component("extra"),
            metrics=decode_tree(m.get("metrics", {}), {}) or {},
            data_position=self.component("data_position"),
            config=self.component("config"),
            created=str(m.get("created", "")),
            versions=dict(m.get("versions", {})),
            optimizer=opt.get("class"),
            optimizer_config_hash=opt.get("config_hash"),
            components=tuple(m["components"]),
            size_bytes=sum(int(r["bytes"]) for r in m["files"].values()),
            signed=isinstance(m.get("signature"), dict),
            format_version=m["format_version"],
        )


def read_manifest(protocol: CommitProtocol, location: str) -> dict[str, Any]:
    """The parsed manifest of a committed checkpoint (no file verification)."""
    protocol.check_committed(location)
    try:
        data = protocol.read(location, MANIFEST)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{location}: {MANIFEST} is missing",
                                     path=location) from None
    try:
        return parse_manifest(bytes(data), f"{location}/{MANIFEST}")
    except CheckpointCorruptError as err:
        err.path = location
        raise


def load_verified(protocol: CommitProtocol, location: str, key: bytes | None, *,
                  keep: frozenset[str] | None = None) -> LoadedCheckpoint:
    """Verify a checkpoint completely and parse its files.

    ``keep`` names the files whose tensors are kept (None: all); the others are
    verified and dropped. ``run.safetensors`` is always kept (it is small and
    :meth:`LoadedCheckpoint.info` needs it).
    """
    manifest = read_manifest(protocol, location)
    problems: list[str] = []
    unsafe = False
    if manifest_digest(manifest) != manifest["checksum"]:
        problems.append(f"{MANIFEST} was changed after it was written (its checksum does not "
                        "match its content)")
    if key is not None:
        try:
            signing.check(manifest, key, location)
        except CheckpointSignatureError as err:
            raise CheckpointSignatureError(str(err), path=location,
                                           problems=[*problems, str(err)]) from None
    tensors: dict[str, dict[str, Tensor]] = {}
    for fname, record in manifest["files"].items():
        try:
            data = protocol.read(location, fname)
        except FileNotFoundError:
            problems.append(f"{fname} is missing")
            continue
        if len(data) != record["bytes"]:
            how = "truncated" if len(data) < record["bytes"] else "grown"
            problems.append(f"{fname} has {len(data)} bytes, the manifest records "
                            f"{record['bytes']} ({how})")
            unsafe |= _is_unsafe(data, fname, problems)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["sha256"]:
            problems.append(f"{fname}: sha256 {digest} does not match the manifest's "
                            f"{record['sha256']} (the file was corrupted or replaced)")
            unsafe |= _is_unsafe(data, fname, problems)
            continue
        try:
            parsed = read_safetensors(data, fname)
        except UnsafeFormatError as err:
            problems.extend(err.problems)
            unsafe = True
            continue
        except CheckpointCorruptError as err:
            problems.extend(err.problems)
            continue
        problems.extend(_index_problems(fname, parsed, record["tensors"]))
        if keep is None or fname in keep or fname == RUN_FILE:
            tensors[fname] = parsed
    if problems:
        cls = UnsafeFormatError if unsafe else CheckpointCorruptError
        raise cls(f"checkpoint {location} failed verification and was refused:\n  - "
                  + "\n  - ".join(problems), path=location, problems=problems)
    return LoadedCheckpoint(location=location, manifest=manifest, tensors=tensors)


def _is_unsafe(data: bytearray, fname: str, problems: list[str]) -> bool:
    try:
        sniff_unsafe(data, fname)
    except UnsafeFormatError as err:
        problems.extend(err.problems)
        return True
    return False


def _index_problems(fname: str, parsed: Mapping[str, Tensor],
                    index: Mapping[str, Any]) -> list[str]:
    problems = []
    for name in sorted(set(index) - set(parsed)):
        problems.append(f"{fname}: tensor {name!r} is indexed in the manifest but not in the file")
    for name in sorted(set(parsed) - set(index)):
        problems.append(f"{fname}: tensor {name!r} is in the file but not in the manifest")
    for name in sorted(set(index) & set(parsed)):
        entry, tensor = index[name], parsed[name]
        if DTYPES.get(entry.get("dtype")) != tensor.dtype or list(entry.get("shape", ())) != list(
                tensor.shape):
            problems.append(f"{fname}: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, the "
                            f"manifest says {entry.get('dtype')}{entry.get('shape')}")
    return problems


# ------------------------------------------------------------- module-level tools
def verify(path: str | os.PathLike[str], *, signing_key: bytes | str | None = None,
           signing_key_file: str | os.PathLike[str] | None = None) -> CheckpointInfo:
    """Verify the checkpoint at ``path`` completely; raise a :class:`CheckpointError` if it fails.

    The signing key defaults to the environment (see :mod:`gradguard.ckpt.signing`).
    """
    protocol, location = split_location(path)
    key = signing.resolve_key(signing_key, signing_key_file)
    return load_verified(protocol, location, key, keep=frozenset()).info()


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of the checkpoint at ``path`` from its manifest (not verified)."""
    protocol, location = split_location(path)
    m = read_manifest(protocol, location)
    opt = m["components"].get("optimizer") or {}
    return {
        "path": location,
        "step": m["step"],
        "created": m.get("created"),
        "format_version": m["format_version"],
        "versions": m.get("versions", {}),
        "components": {name: comp.get("class") for name, comp in m["components"].items()},
        "optimizer": opt.get("class"),
        "optimizer_config": opt.get("config"),
        "optimizer_config_hash": opt.get("config_hash"),
        "config": m["components"].get("config", {}).get("tree"),
        "metrics": decode_tree(m.get("metrics", {}), {}),
        "files": {name: {"bytes": r["bytes"], "tensors": len(r["tensors"]),
                         "sha256": r["sha256"]} for name, r in m["files"].items()},
        "size_bytes": sum(int(r["bytes"]) for r in m["files"].values()),
        "signed": isinstance(m.get("signature"), dict),
        "key_id": (m.get("signature") or {}).get("key_id"),
    }


def list_checkpoints(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The committed checkpoints under ``root``, oldest first, from their manifests.

    Each entry has ``step``, ``path``, ``created``, ``size_bytes``, ``metrics``;
    ``error`` is set instead when the manifest cannot be read.
    """
    protocol = protocol_for(root)
    rows = []
    for name in sorted(protocol.committed(), key=lambda n: step_of(n) or 0):
        location = protocol.location(name)
        row: dict[str, Any] = {"step": step_of(name), "path": location}
        try:
            m = read_manifest(protocol, location)
        except (CheckpointError, OSError) as err:
            row["error"] = str(err)
        else:
            row.update(created=m.get("created"), metrics=decode_tree(m.get("metrics", {}), {}),
                       size_bytes=sum(int(r["bytes"]) for r in m["files"].values()),
                       signed=isinstance(m.get("signature"), dict))
        rows.append(row)
    return rows


__all__ = [
    "CheckpointInfo",
    "LoadedCheckpoint",
    "inspect",
    "list_checkpoints",
    "load_verified",
    "read_manifest",
    "verify",
]
