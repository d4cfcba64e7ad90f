"""Prometheus: gauges (and one counter) per metric on an HTTP endpoint, bound to 127.0.0.1."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..quantities import QUANTILES
from ..record import METRICS, Record, prometheus_name
from .base import Sink, require

QUANTILE_LABELS: dict[str, str] = {name: f"{p:g}" for name, p in QUANTILES}
"""Distribution keys to the ``quantile`` label values: min -> "0", p01 -> "0.01", max -> "1"."""


class PrometheusSink(Sink):
    """Serves the latest values on ``http://{addr}:{port}/metrics``.

    Metric names follow Prometheus conventions (``gradguard_effective_lr``,
    ``gradguard_step_seconds``, ``gradguard_nonfinite_gradients_total``; the
    full list is in ``docs/watch.md``; user values become ``gradguard_<name>``).
    Labels are bounded: ``group`` (a parameter-group label, or ``"all"``) and,
    for distributions, ``quantile``. Also ``gradguard_last_step`` and
    ``gradguard_last_emission_timestamp_seconds`` per group, for staleness alerts.

    ``port=0`` picks a free port (read it back from ``.port``). A private
    registry is used unless ``registry`` is given (e.g.
    ``prometheus_client.REGISTRY`` to share the process's default endpoint,
    with ``serve=False``). Needs ``pip install 'gradguard[prometheus]'``.
    """

    def __init__(self, port: int, addr: str = "127.0.0.1", *, registry: Any = None,
                 serve: bool = True) -> None:
        client = require("prometheus_client", "prometheus", "PrometheusSink")
        self._client = client
        self.registry = registry if registry is not None else client.CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        self._server: Any = None
        self._thread: Any = None
        self.addr = addr
        self.port = port
        if serve:
            self._server, self._thread = client.start_http_server(port, addr,
                                                                  registry=self.registry)
            self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        """The scrape URL."""
        return f"http://{self.addr}:{self.port}/metrics"

    def _metric(self, name: str, kind: str) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            info = METRICS.get(name)
            help_text = info.help if info is not None else f"User value {name!r} (Recorder.log)."
            full_name = prometheus_name(name)
            if kind == "counter":
                metric = self._client.Counter(full_name.removesuffix("_total"), help_text,
                                              ["group"], registry=self.registry)
            elif kind == "distribution":
                metric = self._client.Gauge(full_name, help_text, ["group", "quantile"],
                                            registry=self.registry)
            else:
                metric = self._client.Gauge(full_name, help_text, ["group"],
                                            registry=self.registry)
            self._metrics[name] = metric
        return metric

    def write(self, records: Sequence[Record]) -> None:
        step_gauge = self._metric("last_step", "scalar")
        time_gauge = self._metric("last_emission_timestamp_seconds", "scalar")
        for r in records:
            step_gauge.labels(r.group).set(r.step)
            time_gauge.labels(r.group).set(r.wall_time)
            for name, value in r.metrics.items():
                if isinstance(value, dict):
                    gauge = self._metric(name, "distribution")
                    for key, x in value.items():
                        gauge.labels(r.group, QUANTILE_LABELS.get(key, key)).set(x)
                    continue
                info = METRICS.get(name)
                if info is not None and info.kind == "counter":
                    if math.isfinite(value) and value > 0:
                        self._metric(name, "counter").labels(r.group).inc(value)
                    else:
                        self._metric(name, "counter").labels(r.group)  # expose the series at 0
                else:
                    self._metric(name, "scalar").labels(r.group).set(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
