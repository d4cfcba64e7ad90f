"""The guard's audit log: every detection and every action, one JSON object per line.

::

    {"time": "2025-01-01T12:00:00.123Z", "step": 812, "detector": "loss_spike",
     "evidence": {"loss": 9.71, "threshold": 2.43, "mean": 2.05, "std": 0.063, ...},
     "action": "skip", "outcome": "skipped", "message": "loss 9.71 above ...",
     "pid": 4242, "host": "trainer-0"}

``detector`` is what fired (``escalation`` for an escalation rule, ``rollback``
for the batches a rollback skips), ``action`` what the policy chose and
``outcome`` what happened (``skipped``, ``clipped``, ``applied``, ``restored``,
``unavailable: ...``, ``halted``, ``alerted``). Non-finite numbers are written
as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``. Records are appended
and flushed one by one (they are rare); the file is never rewritten.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

SCHEMA_VERSION = 1


def json_safe(value: Any) -> Any:
    """``value`` as strict-JSON data: non-finite floats as strings (``"NaN"``,
    ``"Infinity"``, as the runner writes them), numpy scalars as Python numbers,
    unknown objects (paths, ...) as str."""
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class AuditLog:
    """Appends guard records to a JSONL file (if ``path`` is given) and keeps them in ``records``.

    ``fsync=True`` makes each record durable before the training step goes on.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, fsync: bool = False,
                 keep: int | None = 10_000) -> None:
        self.path = Path(path) if path is not None else None
        self.fsync = fsync
        self.keep = keep
        self.records: list[dict[str, Any]] = []
        """The records written by this log, newest last (at most ``keep``)."""
        self._file: IO[str] | None = None
        self._host = socket.gethostname()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, detector: str, action: str, outcome: str, *,
              evidence: Mapping[str, Any] | None = None, message: str = "",
              **fields: Any) -> dict[str, Any]:
        """Append one record and return it."""
        now = time.time()
        record = {
            "schema": SCHEMA_VERSION,
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "step": int(step),
            "detector": detector,
            "evidence": json_safe(dict(evidence or {})),
            "action": action,
            "outcome": outcome,
            "message": message,
            **json_safe(fields),
            "pid": os.getpid(),
            "host": self._host,
        }
        self.records.append(record)
        if self.keep is not None and len(self.records) > self.keep:
            del self.records[: len(self.records) - self.keep]
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        """Close the file (records stay readable in ``records``)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a guard audit log, in order."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
