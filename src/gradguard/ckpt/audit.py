"""The checkpoint audit log: one JSON object per line, appended, never rewritten.

Every save, restore, refusal, deletion, cleanup and accepted configuration
change is recorded with its evidence, in ``<root>/audit.jsonl`` by default::

    {"time": "2025-01-01T12:00:00.123Z", "event": "save", "step": 1200,
     "path": "/runs/a/step-000000001200", "bytes": 1048576, "seconds": 0.21, ...}

Events: ``save``, ``save_failed``, ``restore``, ``refused``, ``config_change``,
``delete``, ``cleanup``. Each record also carries ``pid`` and ``host``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

AUDIT_FILE = "audit.jsonl"


class AuditLog:
    """Appends records through ``append(data)``; thread-safe; never raises on write errors."""

    def __init__(self, append: Callable[[bytes], None] | None) -> None:
        self._append = append
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record and return it."""
        now = time.time()
        entry = {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "event": event,
            **fields,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if self._append is None:
            return entry
        line = json.dumps(entry, default=str, allow_nan=True) + "\n"
        with self._lock:
            try:
                self._append(line.encode("utf-8"))
            except OSError as err:  # an audit failure must not fail the training step
                self.errors.append(f"{event}: {err}")
        return entry


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a local audit log (for tests and tools)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
