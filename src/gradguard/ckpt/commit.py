"""Commit protocols: how a fully written checkpoint becomes visible, all at once or not at all.

A protocol is a small object with one job, chosen by the kind of storage (after
Orbax's atomicity strategies):

* :class:`RenameCommit` (local filesystems): write every file into a temporary
  directory ``.tmp-step-…`` and fsync it, write ``manifest.json`` last, fsync
  the directory, ``rename`` it to ``step-…`` and fsync the parent. ``rename`` is
  atomic, so a reader sees the whole checkpoint or nothing.
* :class:`MarkerCommit` (object stores through fsspec, where there is no atomic
  rename): write the files in place, the manifest after them, and a
  ``COMMITTED`` marker last, holding the sha256 of the manifest. A directory
  without a (matching) marker is invisible and is removed by :meth:`cleanup`.

Readers only ever see what :meth:`CommitProtocol.committed` lists. Deleting is
the reverse: a local checkpoint is renamed out of sight before it is removed; an
object-store checkpoint loses its marker first. One writer per root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import CheckpointCorruptError, CheckpointNotFoundError
from .format import MANIFEST, sniff_unsafe

CHECKPOINT_NAME = re.compile(r"^step-(\d{12,})$")
MARKER = "COMMITTED"
TEMP_PREFIXES: tuple[str, ...] = (".tmp-", ".replaced-", ".deleting-")
"""Local names that are never a committed checkpoint (work in progress or garbage)."""


def step_name(step: int) -> str:
    """The directory name of the checkpoint of ``step`` (sorts by step)."""
    return f"step-{step:012d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for, or None for other names."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


class CommitProtocol(ABC):
    """How checkpoints under one root are written, committed, listed and removed."""

    kind: str = ""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"

    # -------------------------------------------------------------- writing
    @abstractmethod
    def begin(self, name: str) -> str:
        """Prepare an invisible place to write checkpoint ``name``; return it."""

    @abstractmethod
    def open_file(self, staging: str, filename: str) -> contextlib.AbstractContextManager[
            IO[bytes]]:
        """A writable file in ``staging``, durable when its context exits."""

    @abstractmethod
    def commit(self, staging: str, name: str, manifest: bytes) -> str:
        """Write the manifest, then make ``staging`` visible as ``name``; return its location."""

    @abstractmethod
    def abort(self, staging: str) -> None:
        """Remove an uncommitted ``staging`` after a failed write (best effort)."""

    # -------------------------------------------------------------- reading
    @abstractmethod
    def committed(self) -> list[str]:
        """Names of the committed checkpoints under the root (any order)."""

    @abstractmethod
    def check_committed(self, location: str) -> None:
        """Raise :class:`CheckpointCorruptError` unless ``location`` is committed."""

    @abstractmethod
    def read(self, location: str, filename: str) -> bytearray:
        """The bytes of one file of a checkpoint."""

    @abstractmethod
    def location(self, name: str) -> str:
        """Where checkpoint ``name`` lives (a path or a URL)."""

    # --------------------------------------------------------- housekeeping
    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove checkpoint ``name``, making it invisible first."""

    @abstractmethod
    def cleanup(self) -> list[str]:
        """Remove what an interrupted writer left behind; return what was removed."""

    @abstractmethod
    def append(self, filename: str, data: bytes) -> None:
        """Append ``data`` to a file in the root (the audit log)."""


# --------------------------------------------------------------------------- local
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RenameCommit(CommitProtocol):
    """Local filesystem: temporary directory, fsync, manifest last, atomic rename."""

    kind = "rename"

    def begin(self, name: str) -> str:
        os.makedirs(self.root, exist_ok=True)
        staging = os.path.join(self.root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        os.mkdir(staging)
        return staging

    @contextlib.contextmanager
    def open_file(self, staging: str, filename: str) -> Iterator[IO[bytes]]:
        with open(os.path.join(staging, filename), "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def commit(self, staging: str, name: str, manifest: bytes) -> str:
        with self.open_file(staging, MANIFEST) as f:
            f.write(manifest)
        _fsync_dir(staging)
        final = os.path.join(self.root, name)
        replaced = None
        if os.path.lexists(final):
            # rename cannot replace a non-empty directory: move the old one out of
            # sight first (a crash here loses only this step, never an older one).
            replaced = os.path.join(self.root, f".replaced-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, replaced)
        os.rename(staging, final)
        _fsync_dir(self.root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        return final

    def abort(self, staging: str) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def committed(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [n for n in names if step_of(n) is not None
                and os.path.isfile(os.path.join(self.root, n, MANIFEST))]

    def check_committed(self, location: str) -> None:
        name = os.path.basename(os.path.normpath(location))
        if name.startswith(TEMP_PREFIXES):
            raise CheckpointCorruptError(
                f"{location} is an uncommitted temporary directory (an interrupted or "
                "deleted save); it is never restored", path=location)
        if os.path.isfile(location):
            with open(location, "rb") as f:
                sniff_unsafe(f.read(4), location)
            raise CheckpointCorruptError(f"{location} is a file; a gradguard checkpoint is a "
                                         "directory", path=location)
        if not os.path.isdir(location):
            raise CheckpointNotFoundError(f"no checkpoint directory at {location}")
        if not os.path.isfile(os.path.join(location, MANIFEST)):
            raise CheckpointCorruptError(f"{location} has no {MANIFEST}: not a committed "
                                         "checkpoint", path=location)

    def read(self, location: str, filename: str) -> bytearray:
        with open(os.path.join(location, filename), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = bytearray(size)
            view = memoryview(data)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            return data if got == size else data[:got]

    def location(self, name: str) -> str:
        return os.path.join(self.root, name)

    def delete(self, name: str) -> None:
        trash = os.path.join(self.root, f".deleting-{name}-{uuid.uuid4().hex[:8]}")
        os.rename(os.path.join(self.root, name), trash)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            if name.startswith(TEMP_PREFIXES):
                path = os.path.join(self.root, name)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def append(self, filename: str, data: bytes) -> None:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, filename), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- object store
class MarkerCommit(CommitProtocol):
    """Object stores (any fsspec filesystem): files in place, manifest, marker last."""

    kind = "marker"

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        super().__init__(root)
        self.fs = fs

    def _join(self, *parts: str) -> str:
        return "/".join((self.root.rstrip("/"), *parts))

    def begin(self, name: str) -> str:
        location = self._join(name)
        if self.fs.exists(location):
            self._remove(location)
        self.fs.makedirs(location, exist_ok=True)
        return location

    @contextlib.contextmanager
    def open_file(self, staging: str, filename: str) -> Iterator[IO[bytes]]:
        with self.fs.open(f"{staging}/{filename}", "wb") as f:
            yield f

    def commit(self, staging: str, name: str, manifest: bytes) -> str:
        with self.open_file(staging, MANIFEST) as f:
            f.write(manifest)
        marker = json.dumps({"manifest_sha256": hashlib.sha256(manifest).hexdigest()})
        with self.open_file(staging, MARKER) as f:
            f.write(marker.encode())
        return self.fs.unstrip_protocol(staging)

    def abort(self, staging: str) -> None:
        with contextlib.suppress(Exception):
            self._remove(staging)

    def _remove(self, location: str) -> None:
        marker = f"{location}/{MARKER}"
        if self.fs.exists(marker):
            self.fs.rm(marker)
        self.fs.rm(location, recursive=True)

    def _children(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def committed(self) -> list[str]:
        return [n for n in self._children() if step_of(n) is not None
                and self.fs.exists(self._join(n, MARKER))]

    def check_committed(self, location: str) -> None:
        path = self.fs._strip_protocol(location)
        if not self.fs.exists(f"{path}/{MARKER}"):
            if not self.fs.exists(path):
                raise CheckpointNotFoundError(f"no checkpoint at {location}")
            raise CheckpointCorruptError(f"{location} has no {MARKER} marker: an uncommitted "
                                         "(interrupted) save; it is never restored",
                                         path=location)
        try:
            marker = json.loads(self.fs.cat_file(f"{path}/{MARKER}"))
            expected = marker["manifest_sha256"]
            manifest = self.fs.cat_file(f"{path}/{MANIFEST}")
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            raise CheckpointCorruptError(f"{location}: unreadable commit marker or manifest "
                                         f"({err})", path=location) from None
        if hashlib.sha256(manifest).hexdigest() != expected:
            raise CheckpointCorruptError(f"{location}: the {MARKER} marker does not match "
                                         f"{MANIFEST} (not the committed manifest)",
                                         path=location)

    def read(self, location: str, filename: str) -> bytearray:
        path = self.fs._strip_protocol(location)
        return bytearray(self.fs.cat_file(f"{path}/{filename}"))

    def location(self, name: str) -> str:
        return str(self.fs.unstrip_protocol(self._join(name)))

    def delete(self, name: str) -> None:
        self._remove(self._join(name))

    def cleanup(self) -> list[str]:
        removed = []
        for name in self._children():
            if step_of(name) is not None and not self.fs.exists(self._join(name, MARKER)):
                self.fs.rm(self._join(name), recursive=True)
                removed.append(self.location(name))
        return removed

    def append(self, filename: str, data: bytes) -> None:
        path = self._join(filename)
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            with self.fs.open(path, "ab") as f:
                f.write(data)
        except (NotImplementedError, ValueError, OSError):
            # Object stores without append: rewrite the object (one writer per root).
            old = self.fs.cat_file(path) if self.fs.exists(path) else b""
            self.fs.pipe_file(path, old + data)


# ------------------------------------------------------------------------- choosing
def protocol_for(root: str | os.PathLike[str]) -> CommitProtocol:
    """The commit protocol for a root: rename on local disks, a marker elsewhere."""
    text = os.fspath(root)
    if "://" not in text:
        return RenameCommit(os.path.abspath(text))
    fs, path = fsspec.core.url_to_fs(text)
    if isinstance(fs, LocalFileSystem):
        return RenameCommit(os.path.abspath(path))
    return MarkerCommit(fs, path)


def split_location(path: str | os.PathLike[str]) -> tuple[CommitProtocol, str]:
    """The protocol of a checkpoint's parent directory, and the checkpoint's location."""
    text = os.fspath(path).rstrip("/")
    if "://" not in text:
        full = os.path.abspath(text)
        return RenameCommit(os.path.dirname(full)), full
    fs, stripped = fsspec.core.url_to_fs(text)
    if isinstance(fs, LocalFileSystem):
        full = os.path.abspath(stripped)
        return RenameCommit(os.path.dirname(full)), full
    parent = stripped.rstrip("/").rsplit("/", 1)[0]
    return MarkerCommit(fs, parent), str(fs.unstrip_protocol(stripped))
