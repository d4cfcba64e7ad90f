"""What can go wrong with a checkpoint, one exception class per kind of answer.

Every error message says which checkpoint, which file and what was found, so an
operator can act on it without reading the code.
"""

from __future__ import annotations

from typing import Any


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no committed checkpoint where one was asked for."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint failed verification: missing or truncated file, checksum mismatch,
    unparseable manifest, uncommitted directory.

    ``fallback`` is the newest older checkpoint that verifies (a ``CheckpointInfo``),
    when the caller asked for one by path and there is one to offer.
    """

    def __init__(self, message: str, *, path: str | None = None,
                 problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.problems: list[str] = list(problems or [message])
        self.fallback: Any = None


class UnsafeFormatError(CheckpointCorruptError):
    """A file needs unpickling (a pickle stream or a ``torch.save`` archive).

    gradguard never unpickles: loading a pickle can execute arbitrary code.
    """


class CheckpointSignatureError(CheckpointCorruptError):
    """A signing key is configured and the manifest is unsigned or mis-signed."""


class CheckpointFormatError(CheckpointError):
    """A value cannot be stored (unsupported type or dtype), or a checkpoint was
    written in a format version this gradguard does not read."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the objects it is restored into.

    ``differences`` lists every difference found (all of them, not the first).
    """

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message + "\n  - " + "\n  - ".join(differences))
        self.differences = differences


class OptimizerConfigMismatchError(CheckpointMismatchError):
    """The optimizer's configuration differs from the one saved in the checkpoint.

    Pass ``allow_config_change=True`` to ``restore`` to accept it (recorded in the
    audit log).
    """


class CheckpointWriteError(CheckpointError):
    """A background (async) save failed; raised by the next call on the Checkpointer."""


class CheckpointWarning(UserWarning):
    """A checkpoint was refused and an older one is used instead, or similar."""
