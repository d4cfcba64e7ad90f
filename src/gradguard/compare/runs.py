"""What one finished run directory says, read from its own files.

The numbers a comparison reports come from what each run wrote (docs/run.md):
``summary.json`` (status, training seconds, guard counts), ``events.jsonl``
(every evaluation with its wall-clock time, the run's start and resumes) and
``metrics.jsonl`` (the recorder's effective learning rate, for the plots).
Nothing is recomputed by training again.

**The evaluation timeline** (:func:`eval_timeline`) is the sequence of ``eval``
events that *survived*: a run resumed from its checkpoint at step ``s`` redoes
the steps after ``s``, so evaluations recorded after ``s`` before the resume
are dropped, and a step evaluated twice keeps its latest values (as the
report does). Each point carries the wall-clock seconds of *kept work* since
the run started: within one process, the time since that process's ``start``
event; after a resume, plus the time the earlier process had spent up to the
resumed step (the time of its last event at or before that step). Work that was
thrown away by a kill is not counted; guard rollbacks are (that time was spent).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"

UNFINISHED = frozenset({"interrupted"})
"""Summary statuses that mean "not done yet": such a run is resumed, not reused."""

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file; a line cut short by a killed writer is skipped."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                return  # the last line, still being written (or cut by a kill)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def number(value: Any) -> float | None:
    """A JSON number (or the runner's ``"NaN"``/``"Infinity"`` strings) as a float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _NONFINITE.get(value)
    return None


@dataclass(frozen=True)
class EvalPoint:
    """One surviving evaluation: its step, the kept-work seconds at it, its metrics."""

    step: int
    seconds: float
    metrics: dict[str, float]


def eval_timeline(events: list[dict[str, Any]]) -> tuple[list[EvalPoint], float]:
    """The surviving evaluations in step order and the run's kept-work seconds at its end.

    See the module docstring for what survives and how seconds are counted.
    """
    kept: dict[int, EvalPoint] = {}
    marks: list[tuple[int, float]] = []
    base = 0.0
    started: float | None = None
    elapsed = 0.0
    for event in events:
        wall = number(event.get("wall_time"))
        step = event.get("step")
        if wall is None or not isinstance(step, int):
            continue
        if event.get("event") == "start":
            if started is not None:  # a resume: continue from the time at the resumed step
                before = [seconds for s, seconds in marks if s <= step]
                base = before[-1] if before else 0.0
                kept = {s: p for s, p in kept.items() if s <= step}
                marks = [(s, t) for s, t in marks if s <= step]
            started = wall
        if started is None:
            continue
        elapsed = base + max(0.0, wall - started)
        marks.append((step, elapsed))
        if event.get("event") == "eval" and isinstance(event.get("metrics"), dict):
            values = {str(k): v for k, raw in event["metrics"].items()
                      if (v := number(raw)) is not None}
            kept[step] = EvalPoint(step, elapsed, values)
    return [kept[s] for s in sorted(kept)], elapsed


def better(value: float, than: float, mode: str) -> bool:
    """Whether ``value`` is strictly better than ``than`` in ``mode`` (NaN is never better)."""
    if not math.isfinite(value):
        return False
    if not math.isfinite(than):
        return True
    return value < than if mode == "min" else value > than


def reached(value: float, target: float, mode: str) -> bool:
    """The target rule of the runner's ``Target.reached``: <= for min, >= for max."""
    return value <= target if mode == "min" else value >= target


@dataclass
class RunOutcome:
    """The facts of one run directory that a comparison aggregates.

    ``final``/``best`` are the primary metric at the last surviving evaluation
    and the best one (non-finite values are never best); ``target_step`` and
    ``target_seconds`` the first evaluation reaching ``target`` (None: never
    reached); ``compute_seconds`` the kept-work wall-clock seconds of the whole
    run, ``train_seconds`` the runner's own training-time count (summary);
    ``improvement`` is the primary metric's gain from the first to the last
    evaluation in the good direction, and ``seconds_per_unit`` the kept-work
    seconds between those two evaluations divided by it (None when nothing
    improved); ``train_loss`` the final training loss (:func:`final_train_loss`).
    """

    run_dir: Path
    status: str
    primary: str
    mode: str
    steps: int | None = None
    final: float | None = None
    final_step: int | None = None
    best: float | None = None
    best_step: int | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    evals: list[EvalPoint] = field(default_factory=list)
    target: float | None = None
    target_step: int | None = None
    target_seconds: float | None = None
    compute_seconds: float | None = None
    train_seconds: float | None = None
    skipped_steps: int = 0
    rollbacks: int = 0
    guard_counts: dict[str, int] = field(default_factory=dict)
    first_value: float | None = None
    improvement: float | None = None
    seconds_per_unit: float | None = None
    train_loss: float | None = None

    @property
    def complete(self) -> bool:
        """A summary exists and the run is not waiting to be resumed."""
        return self.status not in UNFINISHED and self.status not in ("missing", "running")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "status": self.status, "steps": self.steps,
            "final": self.final, "final_step": self.final_step, "best": self.best,
            "best_step": self.best_step, "final_metrics": self.final_metrics,
            "target": self.target, "target_reached": self.target_step is not None,
            "time_to_target": ({"steps": self.target_step, "seconds": self.target_seconds}
                               if self.target_step is not None else None),
            "compute_seconds": self.compute_seconds, "train_seconds": self.train_seconds,
            "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
            "guard_counts": self.guard_counts, "first_eval": self.first_value,
            "improvement": self.improvement, "seconds_per_unit": self.seconds_per_unit,
            "train_loss": self.train_loss, "evaluations": len(self.evals),
        }


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summary.json`` as a dict, or None when the run has not written it (yet)."""
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_run(run_dir: str | Path, *, primary: str | None = None, mode: str | None = None,
             target: float | None = None) -> RunOutcome:
    """Read one run directory into a :class:`RunOutcome`.

    ``primary``, ``mode`` and ``target`` default to what the run recorded (its
    ``start`` event and summary: the workload's primary metric, direction and
    documented target); ``target`` given overrides the value (same metric and mode).
    """
    root = Path(run_dir)
    summary = read_summary(root)
    events = list(read_jsonl(root / EVENTS))
    start = next((e for e in events if e.get("event") == "start"), {})
    primary = primary or (summary or {}).get("primary_metric") or start.get("primary_metric")
    mode = mode or (summary or {}).get("mode") or start.get("mode") or "min"
    if target is None:
        spec = (summary or {}).get("target") or start.get("target") or {}
        if spec and spec.get("metric") == primary:
            target = number(spec.get("value"))
    status = str(summary.get("status")) if summary else ("running" if events else "missing")
    out = RunOutcome(run_dir=root, status=status, primary=str(primary or ""), mode=mode,
                     target=target)
    points, out.compute_seconds = eval_timeline(events)
    out.evals = points if primary else []
    if summary is not None:
        out.steps = summary.get("steps")
        out.train_seconds = number(summary.get("seconds"))
        guard = summary.get("guard") or {}
        counts = {str(k): int(v) for k, v in (guard.get("counts") or {}).items()}
        out.guard_counts = counts
        out.skipped_steps = counts.get("skip", 0)
        out.rollbacks = counts.get("rollback", 0)
    out.train_loss = final_train_loss(root)
    series = [(p.step, p.seconds, p.metrics[out.primary]) for p in out.evals
              if out.primary in p.metrics]
    if not series:
        return out
    last = out.evals[-1]
    out.final_metrics = dict(last.metrics)
    out.final_step, _, out.final = series[-1]
    for step, _, value in series:
        if out.best is None or better(value, out.best, mode):
            out.best, out.best_step = value, step
    if out.best is not None and not math.isfinite(out.best):
        out.best, out.best_step = None, None
    if target is not None:
        hit = next(((s, t) for s, t, v in series if reached(v, target, mode)), None)
        if hit is not None:
            out.target_step, out.target_seconds = hit
    _, first_seconds, out.first_value = series[0]
    final_seconds = series[-1][1]
    if math.isfinite(out.first_value) and math.isfinite(out.final):
        gain = out.final - out.first_value if mode == "max" else out.first_value - out.final
        out.improvement = gain
        if gain > 0 and len(series) > 1:
            out.seconds_per_unit = (final_seconds - first_seconds) / gain
    return out


TRAIN_LOSS_WINDOW = 0.1
"""The share of a run's last training-loss records averaged into its final training loss."""


def final_train_loss(run_dir: str | Path, window: float = TRAIN_LOSS_WINDOW) -> float | None:
    """The mean of the last ``window`` share (at least one) of the logged training losses.

    The loop logs the mini-batch loss every ``log_every`` steps (``metrics.jsonl``,
    group ``all``, metric ``loss``); a step logged twice (a resume, a rollback)
    keeps its last value. This is the optimisation side of a comparison (the
    papers' "training cost"), next to the evaluation metric's generalisation side.
    None when nothing finite was logged.
    """
    by_step: dict[int, float] = {}
    for record in read_jsonl(Path(run_dir) / METRICS):
        values = record.get("metrics")
        step = record.get("step")
        if record.get("group") != "all" or not isinstance(step, int) or not isinstance(values,
                                                                                      dict):
            continue
        value = number(values.get("loss"))
        if value is not None:
            by_step[step] = value
    losses = [by_step[s] for s in sorted(by_step)]
    if not losses:
        return None
    tail = losses[-max(1, math.ceil(window * len(losses))):]
    finite = [v for v in tail if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if len(finite) == len(tail) else math.nan


def lr_quantiles(run_dir: str | Path) -> dict[str, tuple[str, dict[int, dict[str, float]]]]:
    """Per group: ``(kind, step -> {"p10", "p50", "p90"})`` of the step size the run took.

    ``kind`` is ``"effective_lr"`` when the recorder wrote the effective
    learning-rate distribution of the group (``metrics.jsonl``, sampled tier), else
    ``"lr"`` (the scheduled learning rate, all three quantiles equal). A step
    recorded twice keeps its last record; the run-wide group ``all`` is left out.
    """
    dists: dict[str, dict[int, dict[str, float]]] = {}
    lrs: dict[str, dict[int, dict[str, float]]] = {}
    for record in read_jsonl(Path(run_dir) / METRICS):
        group, step, values = record.get("group"), record.get("step"), record.get("metrics")
        if (not isinstance(group, str) or group == "all" or not isinstance(step, int)
                or not isinstance(values, dict)):
            continue
        dist = values.get("effective_lr")
        if isinstance(dist, dict):
            q = {k: number(dist.get(k)) for k in ("p10", "p50", "p90")}
            clean = {k: v for k, v in q.items() if v is not None}
            if len(clean) == 3:
                dists.setdefault(group, {})[step] = clean
        lr = number(values.get("lr"))
        if lr is not None:
            lrs.setdefault(group, {})[step] = {"p10": lr, "p50": lr, "p90": lr}
    out: dict[str, tuple[str, dict[int, dict[str, float]]]] = {
        g: ("effective_lr", series) for g, series in dists.items()}
    for group, series in lrs.items():
        out.setdefault(group, ("lr", series))
    return out
