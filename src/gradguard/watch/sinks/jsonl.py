"""JSONL: one JSON object per line per emission and group. Always available."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..record import Record, from_json_number
from .base import Sink


class JsonlSink(Sink):
    """Appends records to ``path`` as JSON lines (the format is in ``docs/watch.md``).

    The training step only appends records to a buffer. A background thread
    encodes and writes them at most ``flush_interval`` seconds apart (sooner
    once ``max_buffer`` are waiting), so a crash loses at most that much;
    ``flush()`` and ``close()`` write everything synchronously.
    ``background=False`` does the writing in ``write`` instead (when the buffer
    is due). An error of the background writer is raised by the next
    ``write``/``flush``. ``mode="w"`` truncates an existing file instead of
    appending to it.
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: str = "a",
                 flush_interval: float = 1.0, max_buffer: int = 1000,
                 background: bool = True) -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"mode must be 'a' (append) or 'w' (truncate), got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._file = self.path.open(mode, encoding="utf-8")
        self._buffer: list[Record] = []
        self._write_lock = threading.Lock()  # one writer at a time, in record order
        self._buffer_lock = threading.Lock()  # held for an append or a swap only
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._last_flush = time.monotonic()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"JsonlSink({self.path.name})",
                                            daemon=True)
            self._thread.start()

    def write(self, records: Sequence[Record]) -> None:
        self._raise_background_error()
        with self._buffer_lock:
            self._buffer.extend(records)
            waiting = len(self._buffer)
        if waiting >= self.max_buffer:
            if self._thread is not None:
                self._wake.set()
            else:
                self.flush()
        elif self._thread is None and time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        self._raise_background_error()
        self._write_pending()

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        if not self._file.closed:
            self._write_pending()
            self._file.close()
        self._raise_background_error()

    def _write_pending(self, yield_gil: bool = False) -> None:
        with self._write_lock:
            if self._file.closed:
                return
            with self._buffer_lock:
                buffer, self._buffer = self._buffer, []
            lines = []
            for i, record in enumerate(buffer):
                lines.append(record.to_json_line())
                if yield_gil and i % 4 == 3:
                    # Let the training thread take the GIL back at once, rather
                    # than after the interpreter's 5 ms switch interval.
                    time.sleep(0)
            if lines:
                self._file.write("".join(lines))
                self._file.flush()
            self._last_flush = time.monotonic()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self._write_pending(yield_gil=True)
            except BaseException as err:  # reported to the training thread, not lost
                self._error = err
                return

    def _raise_background_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._thread = None  # it has stopped: write synchronously from now on
            raise err


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a recorder JSONL file back, turning "NaN"/"Infinity"/"-Infinity" into floats."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            record["metrics"] = {
                name: ({k: from_json_number(v) for k, v in value.items()}
                       if isinstance(value, dict) else from_json_number(value))
                for name, value in record["metrics"].items()}
            records.append(record)
    return records
