"""gradguard.ckpt: checkpoints that are atomic, verified, pickle-free and resume bit-exactly.

* :class:`Checkpointer` saves (synchronously or in a background thread),
  finds the newest good checkpoint (:meth:`~Checkpointer.latest`), restores
  into the model, optimizer, scheduler, scaler and RNGs, and applies retention.
* :func:`verify`, :func:`inspect`, :func:`list_checkpoints` are the read-only
  tools behind ``gradguard ckpt verify|inspect|list``.

The format is in ``docs/checkpoints.md`` and :mod:`gradguard.ckpt.format`; the
commit protocols in :mod:`gradguard.ckpt.commit`.
"""

from .checkpointer import Checkpointer, KeepBest
from .commit import CommitProtocol, MarkerCommit, RenameCommit, protocol_for
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointSignatureError,
    CheckpointWarning,
    CheckpointWriteError,
    OptimizerConfigMismatchError,
    UnsafeFormatError,
)
from .format import FORMAT_VERSION
from .verify import CheckpointInfo, inspect, list_checkpoints, verify

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointSignatureError",
    "CheckpointWarning",
    "CheckpointWriteError",
    "Checkpointer",
    "CommitProtocol",
    "KeepBest",
    "MarkerCommit",
    "OptimizerConfigMismatchError",
    "RenameCommit",
    "UnsafeFormatError",
    "inspect",
    "list_checkpoints",
    "protocol_for",
    "verify",
]
