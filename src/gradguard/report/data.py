"""Reading a run directory: the parsed files, and the metric series the plots need.

Only files are read (no torch, no checkpoint verification). Optional files may be
missing: a run that crashed early has no summary.json, perhaps no events.jsonl,
guard.jsonl or checkpoints. A missing metrics.jsonl, or a line of any JSONL file
that is not a JSON object, is a :class:`ReportError` naming the file and the line;
only an incomplete *last* line (what a killed writer leaves) is skipped, with a
note shown in the report.
"""

from __future__ import annotations

import json
import math
import os
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads config.toml when tomli is installed
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

# The run-directory layout (gradguard.run.rundir holds only names: importing it does not
# import the training loop or torch).
from gradguard.run.rundir import (
    CHECKPOINTS,
    CONFIG,
    ENV,
    EVENTS,
    GUARD_AUDIT,
    METRICS,
    SUMMARY,
)

QUANTILE_KEYS = ("min", "p01", "p10", "p50", "p90", "p99", "max")
"""The keys of a recorded distribution (``gradguard.watch.QUANTILES``)."""

RUN_GROUP = "all"
"""The group label of run-wide values (``gradguard.watch.RUN_GROUP``)."""

CHECKPOINT_AUDIT = "audit.jsonl"
"""The checkpoint audit log inside the checkpoint root (``gradguard.ckpt``)."""

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ReportError(ValueError):
    """A run directory that cannot be reported: a missing metrics file or a malformed line."""


@dataclass
class Series:
    """One scalar metric of one group over steps (the last value recorded for each step).

    ``nonfinite_steps`` are the steps at which a NaN or infinite value was recorded;
    those values are not in ``values``.
    """

    steps: np.ndarray
    values: np.ndarray
    nonfinite_steps: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class Distribution:
    """One distribution metric of one group over steps: an array per quantile key."""

    steps: np.ndarray
    quantiles: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.steps)


class MetricIndex:
    """The recorder's records of metrics.jsonl, indexed by metric and group.

    Values are kept in compact arrays (16 bytes per value), so a 100k-step run
    indexes in memory proportional to its values, not to Python objects. A series
    keeps the last value recorded for each step, so steps replayed after a rollback
    show the trajectory that survived.
    """

    def __init__(self) -> None:
        self.records = 0
        self.first_wall_time: float | None = None
        self.last_wall_time: float | None = None
        self.max_step: int | None = None
        self._scalars: dict[tuple[str, str], tuple[array, array]] = {}
        self._dists: dict[tuple[str, str], tuple[array, dict[str, array]]] = {}
        self._groups: dict[str, None] = {}

    def add(self, record: Any) -> str | None:
        """Index one decoded record; return what is wrong with it (None: nothing)."""
        if type(record) is not dict:
            return f"expected a JSON object, got {type(record).__name__}"
        step, group, metrics = record.get("step"), record.get("group"), record.get("metrics")
        if type(step) is not int or type(group) is not str or type(metrics) is not dict:
            return "a record needs 'step' (an integer), 'group' (a string), 'metrics' (an object)"
        self.records += 1
        if group not in self._groups:
            self._groups[group] = None
        wall = record.get("wall_time")
        if type(wall) is float or type(wall) is int:
            if self.first_wall_time is None or wall < self.first_wall_time:
                self.first_wall_time = float(wall)
            if self.last_wall_time is None or wall > self.last_wall_time:
                self.last_wall_time = float(wall)
        if self.max_step is None or step > self.max_step:
            self.max_step = step
        for name, value in metrics.items():
            kind = type(value)
            if kind is float or kind is int or kind is str:
                number = _NONFINITE.get(value) if kind is str else value
                if number is None:
                    return f"metrics[{name!r}] is {value!r}, not a number"
                key = (name, group)
                column = self._scalars.get(key)
                if column is None:
                    column = self._scalars[key] = (array("q"), array("d"))
                column[0].append(step)
                column[1].append(number)
            elif kind is dict:
                key = (name, group)
                dist = self._dists.get(key)
                if dist is None:
                    dist = self._dists[key] = (array("q"), {k: array("d") for k in QUANTILE_KEYS})
                dist[0].append(step)
                for q, quantile in dist[1].items():
                    v = value.get(q, math.nan)
                    if type(v) is str:
                        v = _NONFINITE.get(v, math.nan)
                    elif type(v) is not float and type(v) is not int:
                        return f"metrics[{name!r}][{q!r}] is {v!r}, not a number"
                    quantile.append(v)
            else:
                return f"metrics[{name!r}] is {value!r}, not a number or a distribution"
        return None

    @property
    def groups(self) -> list[str]:
        """Every group label seen, in order of appearance."""
        return list(self._groups)

    def names(self) -> set[str]:
        """Every metric name recorded (scalar or distribution)."""
        return {name for name, _ in self._scalars} | {name for name, _ in self._dists}

    def groups_of(self, metric: str) -> list[str]:
        """The groups that recorded ``metric``, in order of appearance."""
        present = {g for m, g in self._scalars if m == metric}
        present |= {g for m, g in self._dists if m == metric}
        return [g for g in self._groups if g in present]

    def series(self, metric: str, group: str = RUN_GROUP) -> Series | None:
        """The scalar series of ``metric`` in ``group``, sorted by step, or None."""
        column = self._scalars.get((metric, group))
        if column is None:
            return None
        steps = np.frombuffer(column[0], dtype=np.int64)
        values = np.frombuffer(column[1], dtype=np.float64)
        bad = ~np.isfinite(values)
        nonfinite = np.unique(steps[bad])
        keep = _last_per_step(steps)
        steps, values = steps[keep], values[keep]
        ok = np.isfinite(values)
        return Series(steps[ok].copy(), values[ok].copy(), nonfinite)

    def distribution(self, metric: str, group: str) -> Distribution | None:
        """The distribution series of ``metric`` in ``group``, sorted by step, or None."""
        dist = self._dists.get((metric, group))
        if dist is None:
            return None
        steps = np.frombuffer(dist[0], dtype=np.int64)
        keep = _last_per_step(steps)
        return Distribution(steps[keep].copy(), {
            q: np.frombuffer(column, dtype=np.float64)[keep].copy()
            for q, column in dist[1].items()})


def _last_per_step(steps: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each step, in increasing step order."""
    if len(steps) and bool(np.all(steps[1:] > steps[:-1])):
        return np.arange(len(steps))
    reverse = steps[::-1]
    _, first = np.unique(reverse, return_index=True)
    return len(steps) - 1 - first


@dataclass
class RunData:
    """Everything :func:`load_run` read from a run directory.

    Absent optional files are None (``summary``, ``config``, ``env``) or empty
    lists (``events``, ``guard``, ``checkpoint_audit``, ``checkpoints``);
    ``missing`` names them and ``notes`` says what was skipped or odd.
    """

    run_dir: Path
    metrics: MetricIndex
    events: list[dict[str, Any]] = field(default_factory=list)
    guard: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_audit: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    """Committed checkpoints on disk: ``step``, ``path``, ``metrics``, ``bytes``, ``created``."""
    summary: dict[str, Any] | None = None
    config_text: str | None = None
    config: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ derived facts
    def events_of(self, *kinds: str) -> list[dict[str, Any]]:
        """The events of the given kinds, in file order."""
        return [e for e in self.events if e.get("event") in kinds]

    def last_event(self, *kinds: str) -> dict[str, Any] | None:
        found = self.events_of(*kinds)
        return found[-1] if found else None

    @property
    def status(self) -> str:
        """finished / interrupted / halted / running (or what summary.json says)."""
        if self.summary and isinstance(self.summary.get("status"), str):
            return str(self.summary["status"])
        end = self.last_event("finished", "interrupted", "halted")
        if end is None:
            return "running"
        if end["event"] == "finished":
            return str(end.get("status") or "finished")
        return str(end["event"])

    @property
    def workload(self) -> str | None:
        """The workload's name (summary.json, the start event, or config.toml)."""
        for value in (_get(self.summary, "workload"), _get(self.last_event("start"), "workload"),
                      _get(self.config, "workload")):
            name = _name_of(value)
            if name:
                return name
        return None

    @property
    def optimizer(self) -> str | None:
        """The optimizer(s), as one line (summary.json, the start event, or config.toml)."""
        for source in (self.summary, self.last_event("start"), self.config):
            for key in ("optimizer", "optimizers"):
                name = _name_of(_get(source, key))
                if name:
                    return name
        return None

    @property
    def steps(self) -> int | None:
        """Steps trained (summary.json, the end event, or the last step recorded)."""
        for source in (self.summary, self.last_event("finished", "interrupted", "halted")):
            value = _get(source, "steps")
            if isinstance(value, int):
                return value
        return self.metrics.max_step

    @property
    def planned_steps(self) -> int | None:
        """Steps the run was configured for (summary ``total_steps``, the start event)."""
        for value in (_get(self.summary, "total_steps"), _get(self.last_event("start"), "steps"),
                      _get(self.config, "steps")):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def target_reached_step(self) -> int | None:
        """The step at which the primary metric reached its target, if it did."""
        event = self.last_event("target_reached")
        for value in (_get(event, "step"), _get(_get(self.summary, "target"), "reached_step")):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def diagnosis(self) -> str | None:
        """Why the guard halted the run (the halted event, summary.json or the audit log)."""
        for value in (_get(self.last_event("halted"), "diagnosis"), _get(self.summary, "halted"),
                      *(r.get("diagnosis") for r in reversed(self.guard))):
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def seconds(self) -> float | None:
        """Wall time of the run in seconds."""
        for source, key in ((self.summary, "seconds"), (self.summary, "wall_time"),
                            (self.last_event("finished"), "seconds")):
            value = _get(source, key)
            if isinstance(value, int | float) and math.isfinite(value):
                return float(value)
        walls = [w for w in (self.metrics.first_wall_time, self.metrics.last_wall_time,
                             *(_get(e, "wall_time") for e in self.events))
                 if isinstance(w, int | float) and math.isfinite(w)]
        return max(walls) - min(walls) if len(walls) >= 2 else None

    def evaluations(self) -> dict[str, Series]:
        """Each evaluation metric over steps: from the eval events, else the ``eval_*`` values."""
        found: dict[str, dict[int, float]] = {}
        for event in self.events_of("eval"):
            metrics, step = event.get("metrics"), event.get("step")
            if not isinstance(metrics, dict) or not isinstance(step, int):
                continue
            for name, value in metrics.items():
                number = _number(value) if isinstance(value, int | float | str) else math.nan
                found.setdefault(str(name), {})[step] = number
        if found:
            out = {}
            for name, values in found.items():
                steps = sorted(values)
                vals = np.array([values[s] for s in steps], dtype=np.float64)
                ok = np.isfinite(vals)
                out[name] = Series(np.array(steps, dtype=np.int64)[ok], vals[ok],
                                   np.array(steps, dtype=np.int64)[~ok])
            return out
        out = {}
        for name in sorted(self.metrics.names()):
            if name.startswith("eval_"):
                series = self.metrics.series(name)
                if series is not None:
                    out[name[len("eval_"):]] = series
        return out

    @property
    def primary_metric(self) -> str | None:
        """The metric the run is judged by (summary, target/early-stop events, config)."""
        candidates = [_get(self.summary, "primary_metric"), _get(self.summary, "metric"),
                      _get(self.last_event("target_reached"), "metric"),
                      _get(self.last_event("early_stop"), "metric"),
                      _get(_get(self.config, "workload"), "primary_metric"),
                      _get(_get(self.summary, "target"), "metric")]
        for value in candidates:
            if isinstance(value, str) and value:
                return value
        evals = self.evaluations()
        return next(iter(evals), None)

    @property
    def mode(self) -> str:
        """"min" or "max": whether lower or higher is better for the primary metric."""
        for value in (_get(self.summary, "mode"), _get(_get(self.summary, "target"), "mode"),
                      _get(_get(self.config, "workload"), "mode")):
            if value in ("min", "max"):
                return str(value)
        name = (self.primary_metric or "").lower()
        higher = ("acc", "auc", "f1", "precision", "recall", "r2", "ndcg", "map", "hit")
        return "max" if any(h in name for h in higher) else "min"

    @property
    def target(self) -> float | None:
        """The primary metric's target value, if the run has one."""
        for value in (_get(self.summary, "target"), _get(self.last_event("target_reached"),
                                                         "target"),
                      _get(_get(self.config, "workload"), "target")):
            if isinstance(value, dict):
                value = value.get("value")
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None

    def final_and_best(self) -> tuple[float | None, float | None, int | None]:
        """(final value, best value, step of the best) of the primary metric."""
        metric = self.primary_metric
        final = best = None
        best_step = None
        if metric is None:
            return None, None, None
        if self.summary:
            final = _metric_value(_first(self.summary, "final_metrics", "final"), metric)
            raw_best = _first(self.summary, "best_metrics", "best")
            best = _metric_value(raw_best, metric)
            raw_step = _first(self.summary, "best_step")
            if raw_step is None and isinstance(raw_best, dict):
                raw_step = raw_best.get("step")
            best_step = raw_step if isinstance(raw_step, int) else None
            if final is not None and not math.isfinite(final):
                final = None
            if best is None or not math.isfinite(best):  # no evaluation yet: inf / NaN
                best, best_step = None, None
        series = self.evaluations().get(metric)
        if series is not None and len(series):
            if final is None:
                final = float(series.values[-1])
            if best is None:
                i = int(np.argmax(series.values) if self.mode == "max"
                        else np.argmin(series.values))
                best, best_step = float(series.values[i]), int(series.steps[i])
        return final, best, best_step


# ---------------------------------------------------------------- loading
def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory (see ``gradguard.run.rundir``) into a :class:`RunData`.

    Raises :class:`ReportError` when the directory or its metrics.jsonl is missing,
    or when a line of a JSONL file (other than an incomplete last line) or a JSON /
    TOML file is malformed; the message names the file and the line.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: no such run directory")
    metrics_path = root / METRICS
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: not found; a run directory holds the flight "
                          f"recorder's {METRICS} (is {root} a gradguard run directory?)")
    notes: list[str] = []
    index = MetricIndex()
    newer = set()
    for lineno, record in _read_jsonl(metrics_path, notes):
        problem = index.add(record)
        if problem is not None:
            raise ReportError(f"{metrics_path}:{lineno}: malformed record, {problem}")
        schema = record.get("schema", 1)
        if schema != 1 and isinstance(schema, int):
            newer.add(schema)
    if newer:
        notes.append(f"{METRICS} has records of schema {sorted(newer)} (this report reads "
                     "schema 1); they are shown as far as they are understood.")
    if index.records == 0:
        notes.append(f"{METRICS} holds no records yet.")

    data = RunData(run_dir=root, metrics=index, notes=notes)
    for name, attr in ((EVENTS, "events"), (GUARD_AUDIT, "guard")):
        path = root / name
        if path.is_file():
            setattr(data, attr, [_check_object(path, n, r) for n, r in _read_jsonl(path, notes)])
        else:
            data.missing.append(name)
    ckpt_root = root / CHECKPOINTS
    if ckpt_root.is_dir():
        audit = ckpt_root / CHECKPOINT_AUDIT
        if audit.is_file():
            data.checkpoint_audit = [_check_object(audit, n, r)
                                     for n, r in _read_jsonl(audit, notes)]
        data.checkpoints = _checkpoints_on_disk(ckpt_root, notes)
    else:
        data.missing.append(CHECKPOINTS)
    summary = root / SUMMARY
    if summary.is_file():
        data.summary = _read_json_object(summary)
    else:
        data.missing.append(SUMMARY)
    env = root / ENV
    if env.is_file():
        data.env = _read_json_object(env)
    else:
        data.missing.append(ENV)
    config = root / CONFIG
    if config.is_file():
        data.config_text = config.read_text(encoding="utf-8", errors="replace")
        if tomllib is not None:
            try:
                data.config = tomllib.loads(data.config_text)
            except tomllib.TOMLDecodeError as err:
                raise ReportError(f"{config}: not valid TOML: {err}") from None
    else:
        data.missing.append(CONFIG)
    if data.summary is None and data.status == "running":
        notes.append("No summary.json and no end event: the run is still in progress, or its "
                     "process was killed.")
    return data


def _read_jsonl(path: Path, notes: list[str]) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of each non-empty line.

    A line that is not JSON is an error when another line follows it; as the last
    line it is what a killed writer leaves behind, and is skipped with a note.
    """
    decode = json.JSONDecoder().decode
    broken: tuple[int, str, str] | None = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if broken is not None:
                at, reason, text = broken
                raise ReportError(f"{path}:{at}: malformed line, not JSON ({reason}): {text}")
            try:
                value = decode(line)
            except json.JSONDecodeError as err:
                broken = (lineno, err.msg, _preview(line))
                continue
            yield lineno, value
    if broken is not None:
        notes.append(f"{path.name}: the last line (line {broken[0]}) is incomplete and was "
                     "skipped (the writing process was probably killed).")


def _check_object(path: Path, lineno: int, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{path}:{lineno}: malformed line, expected a JSON object, got "
                          f"{type(value).__name__}")
    return value


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        return value in _NONFINITE
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> float:
    if isinstance(value, str):
        return _NONFINITE.get(value, math.nan)
    return float(value)


def _preview(line: str, limit: int = 80) -> str:
    text = line.rstrip("\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not UTF-8 text ({err})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _checkpoints_on_disk(root: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The committed checkpoints under ``root`` (from their manifests, not verified)."""
    found = []
    for manifest in sorted(root.glob("step-*/manifest.json")):
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            notes.append(f"{manifest.parent.name}: unreadable manifest ({type(err).__name__}).")
            continue
        if not isinstance(m, dict):
            continue
        files = m.get("files")
        if not isinstance(files, dict):
            files = {}
        size = sum(f.get("bytes", 0) for f in files.values()
                   if isinstance(f, dict) and isinstance(f.get("bytes"), int))
        found.append({"step": m.get("step"), "path": manifest.parent,
                      "metrics": m.get("metrics") or {}, "bytes": size,
                      "created": m.get("created")})
    return found


# ---------------------------------------------------------------- helpers
def _get(source: Any, key: str) -> Any:
    return source.get(key) if isinstance(source, dict) else None


def _first(source: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if source.get(key) is not None:
            return source[key]
    return None


def _metric_value(value: Any, metric: str) -> float | None:
    if isinstance(value, dict):
        value = value.get(metric, value.get("value"))
    if isinstance(value, int | float | str) and not isinstance(value, bool) and _is_number(value):
        return _number(value)
    return None


def _name_of(value: Any) -> str | None:
    """A readable one-line name of a workload / optimizer setting (a string, table or list)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        for key in ("name", "kind", "type"):
            if isinstance(value.get(key), str):
                inner = {k: v for k, v in value.items()
                         if isinstance(v, dict) and _name_of(v)}
                if inner and key == "name" and value[key] in ("hybrid", "Hybrid"):
                    return f"{value[key]} (" + ", ".join(
                        f"{k}: {_name_of(v)}" for k, v in inner.items()) + ")"
                return str(value[key])
        if not all(isinstance(v, str | dict) for v in value.values()):
            return None
        parts = [f"{k}: {_name_of(v)}" for k, v in value.items() if _name_of(v)]
        return ", ".join(parts) or None
    if isinstance(value, list):
        parts = [n for n in (_name_of(v) for v in value) if n]
        return ", ".join(parts) or None
    return None
