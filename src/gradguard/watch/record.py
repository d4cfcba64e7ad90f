"""What the recorder emits: records, and the catalogue of metrics they carry.

A :class:`Record` is one emission for one parameter group (or ``"all"`` for
run-wide values): a step, a wall time, the tiers that produced it and a flat
mapping of metric names to numbers or distributions (objects with the keys of
:data:`~gradguard.watch.quantities.QUANTILES`). Sinks turn records into lines,
events, gauges or MLflow metrics; they never compute anything.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

SCHEMA_VERSION = 1
"""The ``"schema"`` field of every JSONL record; bumped on incompatible changes."""

RUN_GROUP = "all"
"""The group label of run-wide values: loss, step time, user values, guard observations."""

Distribution = dict[str, float]
MetricValue = float | Distribution


@dataclass(slots=True)
class Record:
    """One emission for one group.

    ``samples`` carries raw sampled values (e.g. the effective-lr sample) for
    sinks that draw histograms; it is not serialised.
    """

    step: int
    wall_time: float
    group: str
    tiers: tuple[str, ...]
    metrics: dict[str, MetricValue]
    samples: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def to_json_line(self) -> str:
        """:meth:`to_json` encoded as one compact line (with its newline)."""
        return _ENCODER.encode(self.to_json()) + "\n"

    def to_json(self) -> dict[str, Any]:
        """The JSONL object: non-finite numbers as the strings "NaN", "Infinity", "-Infinity"."""
        metrics = self.metrics
        if not all(type(v) is float and -math.inf < v < math.inf for v in metrics.values()):
            metrics = {k: _json_value(v) for k, v in metrics.items()}  # type: ignore[misc]
        return {
            "schema": SCHEMA_VERSION,
            "step": self.step,
            "wall_time": self.wall_time,
            "group": self.group,
            "tiers": list(self.tiers),
            "metrics": metrics,
        }


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _json_number(x: float) -> float | str:
    if -math.inf < x < math.inf:
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _json_value(value: MetricValue) -> float | str | dict[str, float | str]:
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return _json_number(value)


def from_json_number(value: float | int | str) -> float:
    """Inverse of the JSONL encoding of one number (integers stay integers)."""
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
    return value


@dataclass(frozen=True)
class MetricInfo:
    """One metric: its tier, kind, Prometheus name and meaning."""

    name: str
    tier: str
    kind: str  # "scalar", "distribution" or "counter"
    prometheus: str
    help: str


_CATALOG: tuple[MetricInfo, ...] = (
    # every step
    MetricInfo("lr", "step", "scalar", "gradguard_learning_rate",
               "Scheduled learning rate of the group (group['lr'])."),
    MetricInfo("step_time", "step", "scalar", "gradguard_step_seconds",
               "Wall seconds between the last two optimizer steps (group 'all')."),
    MetricInfo("samples_per_second", "step", "scalar", "gradguard_samples_per_second",
               "batch_size / step_time, when the recorder knows the batch size (group 'all')."),
    MetricInfo("loss", "log", "scalar", "gradguard_loss",
               "Training loss passed to Recorder.log (group 'all')."),
    MetricInfo("grad_norm", "step/full", "scalar", "gradguard_grad_norm",
               "Exact L2 norm of the gradients: given by the guard (every step), or computed "
               "at the full tier."),
    MetricInfo("nonfinite_gradients", "step/full", "counter",
               "gradguard_nonfinite_gradients_total",
               "NaN/Inf gradient elements: given by the guard, or counted at the full tier."),
    # sampled tier
    MetricInfo("effective_lr", "sampled", "distribution", "gradguard_effective_lr",
               "Per-coordinate effective learning rate (see the schema table)."),
    MetricInfo("accumulator", "sampled", "distribution", "gradguard_accumulator",
               "Per-coordinate second-moment accumulator (sum, exp_avg_sq, square_avg, ...)."),
    MetricInfo("grad_norm_estimate", "sampled", "scalar", "gradguard_grad_norm_estimate",
               "L2 norm of the gradients estimated from the sample (exact for sparse "
               "gradients); a separate series so estimates never mix with exact values."),
    MetricInfo("update_norm", "sampled", "scalar", "gradguard_update_norm",
               "||w_after - w_before||, estimated from the sample."),
    MetricInfo("update_ratio", "sampled", "scalar", "gradguard_update_ratio",
               "||w_after - w_before|| / ||w_before||, estimated from the sample."),
    # full tier
    MetricInfo("param_norm", "full", "scalar", "gradguard_param_norm",
               "Exact L2 norm of the group's parameters."),
    MetricInfo("first_moment_norm", "full", "scalar", "gradguard_first_moment_norm",
               "Exact L2 norm of the first moment (exp_avg, momentum_buffer, grad_avg, z)."),
    MetricInfo("second_moment_norm", "full", "scalar", "gradguard_second_moment_norm",
               "Exact L2 norm of the accumulator."),
    MetricInfo("accumulator_mean", "full", "scalar", "gradguard_accumulator_mean",
               "Exact mean of the accumulator over all its elements."),
    MetricInfo("accumulator_max", "full", "scalar", "gradguard_accumulator_max",
               "Exact maximum of the accumulator."),
    MetricInfo("accumulator_growth", "full", "scalar", "gradguard_accumulator_growth_per_step",
               "Change of accumulator_mean per step since the previous full emission."),
    MetricInfo("nonfinite_params", "full", "scalar", "gradguard_nonfinite_params",
               "NaN/Inf parameter elements now."),
    MetricInfo("nonfinite_state", "full", "scalar", "gradguard_nonfinite_state",
               "NaN/Inf optimizer-state elements now."),
    MetricInfo("state_bytes", "full", "scalar", "gradguard_optimizer_state_bytes",
               "Bytes of optimizer state tensors of the group."),
    MetricInfo("embedding_rows", "full", "scalar", "gradguard_embedding_rows",
               "Rows of the group's embedding tables."),
    MetricInfo("embedding_rows_touched", "full", "scalar", "gradguard_embedding_rows_touched",
               "Rows whose values changed since the previous full emission."),
    MetricInfo("embedding_rows_never_updated", "full", "scalar",
               "gradguard_embedding_rows_never_updated",
               "Rows that have not changed since the recorder started watching the table."),
    MetricInfo("embedding_row_update_count", "full", "distribution",
               "gradguard_embedding_row_update_count",
               "Per-row update counts kept by the optimizer (when it keeps them)."),
)

METRICS: dict[str, MetricInfo] = {m.name: m for m in _CATALOG}
"""The built-in metrics by name. User values from Recorder.log keep their own names."""

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(metric: str) -> str:
    """The Prometheus metric name of ``metric`` (built-in, or ``gradguard_<sanitised>``)."""
    info = METRICS.get(metric)
    if info is not None:
        return info.prometheus
    return "gradguard_" + _INVALID.sub("_", metric)
