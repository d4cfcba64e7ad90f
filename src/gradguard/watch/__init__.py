"""gradguard.watch: the flight recorder of an optimizer's internal state.

``Recorder(optimizer, sinks=[JsonlSink("run.jsonl")], every=10, full_every=100)``
attaches to any ``torch.optim.Optimizer`` through its step hooks and records,
per parameter group, what the optimizer's state says: effective learning-rate
quantiles, accumulator growth, update-to-param ratio, non-finite counts, state
bytes, embedding-row statistics. Per-step values are free, distributions come
from a fixed-size coordinate sample, exact reductions run every ``full_every``
steps. See ``docs/watch.md``.
"""

from .quantities import QUANTILES, quantiles
from .record import METRICS, RUN_GROUP, SCHEMA_VERSION, MetricInfo, Record, prometheus_name
from .recorder import ROW_COUNT_KEYS, Recorder, embedding_params, group_labels, optimizer_config
from .sampling import CoordinateSampler
from .schema import GENERIC, SCHEMAS, Coordinates, StateSchema, register_schema, schema_for
from .sinks import JsonlSink, MlflowSink, PrometheusSink, Sink, TensorBoardSink, read_jsonl

__all__ = [
    "GENERIC",
    "METRICS",
    "QUANTILES",
    "ROW_COUNT_KEYS",
    "RUN_GROUP",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "CoordinateSampler",
    "Coordinates",
    "JsonlSink",
    "MetricInfo",
    "MlflowSink",
    "PrometheusSink",
    "Record",
    "Recorder",
    "Sink",
    "StateSchema",
    "TensorBoardSink",
    "embedding_params",
    "group_labels",
    "optimizer_config",
    "prometheus_name",
    "quantiles",
    "read_jsonl",
    "register_schema",
    "schema_for",
]
