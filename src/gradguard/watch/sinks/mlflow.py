"""MLflow: batched ``log_batch`` metrics and the optimizer configuration as params."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..record import Record
from .base import Sink, require

_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000
_INVALID_KEY = re.compile(r"[^a-zA-Z0-9_\-. /]")


def _key(text: str) -> str:
    return _INVALID_KEY.sub("_", text)


class MlflowSink(Sink):
    """Logs to an MLflow run through ``mlflow.tracking.MlflowClient`` (no global state).

    With ``run_id`` it logs into that existing run and leaves it open; without,
    it creates a run (named ``run_name``) in ``experiment`` (created if needed)
    and ends it on ``close``. ``tracking_uri`` defaults to MLflow's own
    resolution (``MLFLOW_TRACKING_URI``). Metric keys are ``{group}/{metric}``
    and ``{group}/{metric}/{quantile}``; the step is the optimizer step.
    Metrics are buffered and sent with ``log_batch`` when ``max_buffer`` are
    waiting or ``flush_interval`` seconds passed, and on ``flush``/``close``;
    with ``asynchronous`` (the default) MLflow's own background queue does the
    sending (``log_batch(..., synchronous=False)``; a 1,000-metric batch to a
    SQLite store takes ~70 ms synchronously) and ``close`` waits for it.
    The configuration the recorder passes at attach time is logged as params.
    Needs ``pip install 'gradguard[mlflow]'``.
    """

    def __init__(self, run_id: str | None = None, *, experiment: str = "gradguard",
                 run_name: str | None = None, tracking_uri: str | None = None,
                 max_buffer: int = _MAX_METRICS_PER_BATCH, flush_interval: float = 10.0,
                 asynchronous: bool = True) -> None:
        tracking = require("mlflow.tracking", "mlflow", "MlflowSink")
        entities = require("mlflow.entities", "mlflow", "MlflowSink")
        self._Metric = entities.Metric
        self._Param = entities.Param
        self.client: Any = tracking.MlflowClient(tracking_uri=tracking_uri)
        self.max_buffer = max_buffer
        self.flush_interval = flush_interval
        self._buffer: list[Any] = []
        self.asynchronous = asynchronous
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._owns_run = run_id is None
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id: str = run_id
        self._closed = False

    def start(self, config: Mapping[str, str]) -> None:
        params = [self._Param(_key(k), str(v)[:_MAX_PARAM_LENGTH]) for k, v in config.items()]
        for i in range(0, len(params), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _MAX_PARAMS_PER_BATCH])

    def write(self, records: Sequence[Record]) -> None:
        metric = self._Metric
        for r in records:
            ms = int(r.wall_time * 1000)
            for name, value in r.metrics.items():
                if isinstance(value, dict):
                    for quantile, x in value.items():
                        self._buffer.append(metric(_key(f"{r.group}/{name}/{quantile}"),
                                                   _finite(x), ms, r.step))
                else:
                    self._buffer.append(metric(_key(f"{r.group}/{name}"), _finite(value), ms,
                                               r.step))
        if (len(self._buffer) >= self.max_buffer
                or time.monotonic() - self._last_flush >= self.flush_interval):
            self.flush()

    def flush(self) -> None:
        self._wait()  # the previous batches: long done by now, and any error surfaces here
        buffer, self._buffer = self._buffer, []
        for i in range(0, len(buffer), _MAX_METRICS_PER_BATCH):
            chunk = buffer[i:i + _MAX_METRICS_PER_BATCH]
            if self.asynchronous:
                self._pending.append(
                    self.client.log_batch(self.run_id, metrics=chunk, synchronous=False))
            else:
                self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for operation in pending:
            if operation is not None:
                operation.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._wait()
        if self._owns_run:
            self.client.set_terminated(self.run_id)


def _finite(x: float) -> float:
    # MLflow stores NaN; infinities are clamped to the largest doubles by its stores.
    return x if not math.isinf(x) else math.copysign(1.7976931348623157e308, x)
