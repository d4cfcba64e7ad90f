"""The release gate: two checkpoints on the same evaluation data, per metric and per slice.

:func:`evaluate_checkpoint` restores a checkpoint's model into the workload
that an *evaluation config* builds (``[workload]``, ``run.seed``,
``run.precision``, ``run.device``, ``train.eval_batch_size``) and evaluates it
the way the runner does (chunk means weighted by chunk size, or the whole
split at once when the workload says ``eval_whole_split``; every slice of the
workload on its own). The result, an :class:`Evaluation`, records the sha256
of the evaluation split (``TensorData.fingerprint()``; for analytic workloads,
which have none, of the problem's definition) and of the slice masks,
the metrics, and the checkpoint's *lineage*: flat attribute names such as
``model.optimizer.name`` and ``model.optimizer.lr`` (from the config stored in
the checkpoint, defaults filled in) that evaluations and traces can be joined on.

:func:`gate` compares a baseline and a candidate evaluation. Both must have
been made on the same data (equal hashes), else :class:`GateError`. A metric
*regresses* when the candidate is worse than the baseline by more than the
allowed drop (:class:`Threshold`: ``"0.5%"`` of the baseline's magnitude, or
an absolute ``"0.002"``) in the metric's direction (:func:`metric_direction`).

An evaluation can be saved (``Evaluation.save``) and used later as the
baseline (``load_evaluation``): a CI job keeps the released model's evaluation
and gates each candidate against it; the hashes then prove the data did not
change in between.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from gradguard.guard.audit import json_safe

EVALUATION_KIND = "gradguard.evaluation"
GATE_KIND = "gradguard.gate"
WHOLE = "all"
"""The slice name of the whole evaluation split."""

MAX_WORDS = frozenset({"accuracy", "acc", "auc", "auroc", "aupr", "precision", "recall", "f1",
                       "map", "ndcg", "mrr", "r2", "hit", "hitrate", "top1", "top5", "ctr"})
MIN_WORDS = frozenset({"loss", "logloss", "nll", "error", "err", "mse", "rmse", "mae",
                       "perplexity", "ppl", "distance", "objective", "regret", "latency",
                       "grad_norm", "ece", "brier"})


class GateError(ValueError):
    """Bad input to the gate (exit status 2): missing checkpoint, config error, data mismatch."""


def metric_direction(name: str, *, primary: str | None = None, mode: str | None = None,
                     overrides: Mapping[str, str] | None = None
                     ) -> Literal["min", "max"] | None:
    """Whether lower (``"min"``) or higher (``"max"``) is better for a metric; None if unknown.

    In order: an explicit ``overrides[name]``; the workload's primary metric
    takes the workload's ``mode``; otherwise the name decides: its last
    ``_``-separated word (or the whole name) in :data:`MAX_WORDS` (accuracy,
    auc, f1, ...) is ``"max"``, in :data:`MIN_WORDS` (loss, logloss, mse,
    distance, ...) or ending in ``loss`` is ``"min"``.
    """
    if overrides and name in overrides:
        value = overrides[name]
        if value not in ("min", "max"):
            raise GateError(f"direction of {name!r}: 'min' or 'max', got {value!r}")
        return "min" if value == "min" else "max"
    if primary is not None and name == primary and mode in ("min", "max"):
        return "min" if mode == "min" else "max"
    lowered = name.lower()
    last = lowered.rsplit("_", 1)[-1]
    for candidate in (lowered, last):
        if candidate in MAX_WORDS:
            return "max"
        if candidate in MIN_WORDS:
            return "min"
    if lowered.endswith("grad_norm"):
        return "min"
    if lowered.endswith("loss"):
        return "min"
    return None


@dataclass(frozen=True)
class Threshold:
    """The allowed worsening: ``value`` absolute, or a fraction of ``|baseline|`` if relative."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str | float) -> Threshold:
        """``"0.5%"`` (relative: 0.5% of the baseline's magnitude) or ``"0.002"`` (absolute)."""
        raw = str(text).strip()
        relative = raw.endswith("%")
        try:
            value = float(raw[:-1] if relative else raw)
        except ValueError:
            raise GateError(f"--max-drop {text!r}: a percentage (0.5%) or an absolute amount "
                            "(0.002)") from None
        if not math.isfinite(value) or value < 0:
            raise GateError(f"--max-drop {text!r}: must be >= 0")
        return cls(value / 100.0 if relative else value, relative)

    def allowed(self, baseline: float) -> float:
        return self.value * abs(baseline) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass
class Evaluation:
    """One checkpoint's metrics on one evaluation split, with the split's hash and lineage."""

    source: str
    step: int | None
    workload: str
    data_hash: str
    slices_hash: str | None
    samples: int
    primary_metric: str
    mode: str
    metrics: dict[str, dict[str, float]]
    """``{slice: {metric: value}}``; the whole split is the slice ``"all"``."""
    lineage: dict[str, Any] = field(default_factory=dict)
    eval_config: dict[str, Any] = field(default_factory=dict)
    evaluated: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": EVALUATION_KIND, "schema": 1, **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this evaluation as JSON (usable later as ``--baseline``)."""
        target = Path(path)
        target.write_text(json.dumps(json_safe(self.to_dict()), indent=1, allow_nan=False)
                          + "\n", encoding="utf-8")
        return target

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> Evaluation:
        if data.get("kind") != EVALUATION_KIND:
            raise GateError(f"{source}: not an evaluation record (kind {data.get('kind')!r})")
        try:
            return cls(source=str(data["source"]), step=data.get("step"),
                       workload=str(data["workload"]), data_hash=str(data["data_hash"]),
                       slices_hash=data.get("slices_hash"), samples=int(data["samples"]),
                       primary_metric=str(data["primary_metric"]), mode=str(data["mode"]),
                       metrics={s: {k: _float(v) for k, v in m.items()}
                                for s, m in data["metrics"].items()},
                       lineage=dict(data.get("lineage", {})),
                       eval_config=dict(data.get("eval_config", {})),
                       evaluated=str(data.get("evaluated", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise GateError(f"{source}: malformed evaluation record ({exc})") from None


def _float(value: Any) -> float:
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
    return float(value)


# ================================================================ evaluation
def _load_config(eval_config: Any, overrides: Sequence[str] = ()) -> Any:
    from gradguard.run import Config, ConfigError, config

    try:
        if isinstance(eval_config, Config):
            return eval_config
        if isinstance(eval_config, Mapping):
            return config.parse(config.apply_overrides(dict(eval_config), list(overrides)))
        return config.load(eval_config, list(overrides))
    except ConfigError as exc:
        raise GateError(str(exc)) from None


def _checkpoint_location(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``(checkpoint root, checkpoint path or None for the newest)`` from a path.

    A checkpoint directory (``.../step-000000000100``), a checkpoint root (its
    newest good checkpoint) or a run directory (``RUN/checkpoints``); an fsspec
    URL (``s3://bucket/run/checkpoints[/step-...]``) is passed to the Checkpointer.
    """
    text = os.fspath(path)
    if "://" in text:  # an object store: a step-NNN name is a checkpoint, else a root
        name = text.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-"):
            return text.rstrip("/").rsplit("/", 1)[0], text
        return text, None
    p = Path(path)
    if (p / "manifest.json").is_file():
        return str(p.parent), str(p)
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if p.is_dir() and any(c.name.startswith("step-") for c in p.iterdir()):
        return str(p), None
    raise GateError(f"{path}: not a checkpoint, a checkpoint directory or a run directory")


def evaluate_model(workload: Any, model: Any, data: Any, *, batch_size: int,
                   autocast: Any = contextlib.nullcontext) -> dict[str, float]:
    """The workload's metrics of ``model`` on ``data`` (a ``TensorData``), as the runner computes.

    Chunks of ``batch_size`` samples, each metric averaged weighted by chunk
    size; the whole split in one call when ``workload.info["eval_whole_split"]``.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), autocast():
            if workload.info.get("eval_whole_split") or not data.tensors:
                return {k: float(v) for k, v in workload.evaluate(model, data.all()).items()}
            n = len(data)
            totals: dict[str, float] = {}
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(n, start + batch_size),
                                     device=data.tensors[0].device)
                for key, value in workload.evaluate(model, data.batch(index)).items():
                    totals[key] = totals.get(key, 0.0) + float(value) * len(index)
            return {k: v / n for k, v in totals.items()}
    finally:
        model.train(was_training)


def _slices_hash(slices: Mapping[str, Any]) -> str | None:
    import hashlib

    if not slices:
        return None
    h = hashlib.sha256()
    for name in sorted(slices):
        mask = slices[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(mask.shape)};".encode())
        h.update(mask.numpy().tobytes())
    return h.hexdigest()


def eval_data_hash(workload: Any, cfg: Any) -> str:
    """sha256 of the evaluation split (``TensorData.fingerprint()``).

    An analytic workload (``quadratic``, ``rosenbrock``) has no evaluation data:
    its problem is defined by the workload's name, options and seed, so the hash
    is of those (canonical JSON) instead.
    """
    import hashlib

    if workload.eval.tensors:
        return str(workload.eval.fingerprint())
    definition = {"workload": cfg.workload.name, "options": cfg.workload.options,
                  "seed": cfg.run.seed}
    text = json.dumps(definition, sort_keys=True, default=str)
    return hashlib.sha256(f"analytic:{text}".encode()).hexdigest()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif value is not None:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def lineage(config: Mapping[str, Any] | None, *, step: int | None, path: str,
            optimizer_class: str | None = None, created: str = "") -> dict[str, Any]:
    """Flat ``model.*`` attributes of a checkpoint: where it came from and how it was trained.

    ``model.optimizer.*`` is the stored ``[optimizer]`` table with every
    hyperparameter's default filled in (``model.optimizer.groups.G.*`` for a
    hybrid), plus ``model.schedule.name``, ``model.workload.*``,
    ``model.run.seed``, ``model.train.steps`` / ``batch_size`` and
    ``model.checkpoint.*``.
    """
    from gradguard.compare.experiment import optimizer_settings

    out: dict[str, Any] = {"model.checkpoint.path": path, "model.checkpoint.step": step}
    if created:
        out["model.checkpoint.created"] = created
    if optimizer_class:
        out["model.optimizer.class"] = optimizer_class
    if not isinstance(config, Mapping):
        return out
    section = config.get("optimizer") or {}
    if isinstance(section, Mapping):
        cleaned = {k: v for k, v in section.items() if v is not None}
        _flatten("model.optimizer", optimizer_settings(cleaned), out)
    schedule = config.get("schedule") or {}
    if isinstance(schedule, Mapping) and schedule.get("name"):
        out["model.schedule.name"] = schedule["name"]
        _flatten("model.schedule.kwargs", schedule.get("kwargs") or {}, out)
    workload = config.get("workload") or {}
    if isinstance(workload, Mapping):
        out["model.workload.name"] = workload.get("name")
        _flatten("model.workload.options", workload.get("options") or {}, out)
    run = config.get("run") or {}
    if isinstance(run, Mapping):
        out["model.run.seed"] = run.get("seed")
        out["model.run.output"] = run.get("output")
    train = config.get("train") or {}
    if isinstance(train, Mapping):
        for key in ("steps", "epochs", "batch_size"):
            if train.get(key) is not None:
                out[f"model.train.{key}"] = train[key]
    return out


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], eval_config: Any, *,
                        overrides: Sequence[str] = (),
                        key_file: str | os.PathLike[str] | None = None) -> Evaluation:
    """Restore a checkpoint's model into the eval config's workload and evaluate it.

    ``checkpoint``: a checkpoint directory, a checkpoint root (its newest good
    checkpoint) or a run directory. ``eval_config``: a TOML path, a mapping or a
    ``Config``. Raises :class:`GateError` for a missing or unverifiable
    checkpoint, a model that does not fit the workload, or a bad config.
    """
    import torch

    from gradguard.ckpt import Checkpointer, CheckpointError
    from gradguard.run import workloads

    cfg = _load_config(eval_config, overrides)
    root, path = _checkpoint_location(checkpoint)
    try:
        workload = workloads.load(cfg.workload.name, seed=cfg.run.seed,
                                  options=cfg.workload.options)
    except ValueError as exc:
        raise GateError(f"workload: {exc}") from None
    device = torch.device(cfg.run.device)
    dtype = torch.float64 if cfg.run.precision == "fp64" else None
    workload.model.to(device=device, dtype=dtype)
    checkpointer = Checkpointer(root, keep_last=None, keep_best=None, audit=False, cleanup=False,
                                signing_key_file=key_file)
    try:
        info = checkpointer.restore(model=workload.model, path=path, rng=False)
    except (CheckpointError, OSError) as exc:
        raise GateError(f"{checkpoint}: {exc}") from None
    data_hash = eval_data_hash(workload, cfg)
    slices_hash = _slices_hash(workload.slices)
    from gradguard.run import TensorData

    eval_data = TensorData(tuple(
        t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        for t in workload.eval.tensors))

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if cfg.run.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    batch = cfg.train.eval_batch_size
    metrics = {WHOLE: evaluate_model(workload, workload.model, eval_data, batch_size=batch,
                                     autocast=autocast)}
    for name, mask in workload.slices.items():
        if name == WHOLE:
            raise GateError(f"workload {workload.name}: a slice may not be named {WHOLE!r}")
        if not bool(mask.any()):
            continue
        index = mask.nonzero().flatten().to(device)
        part = TensorData(eval_data.batch(index))
        metrics[name] = evaluate_model(workload, workload.model, part, batch_size=batch,
                                       autocast=autocast)
    return Evaluation(
        source=str(info.path), step=info.step, workload=workload.name, data_hash=data_hash,
        slices_hash=slices_hash, samples=len(workload.eval),
        primary_metric=workload.primary_metric, mode=workload.mode, metrics=metrics,
        lineage={**lineage(info.config if isinstance(info.config, Mapping) else None,
                           step=info.step, path=str(info.path), optimizer_class=info.optimizer,
                           created=info.created),
                 "model.data.eval_hash": data_hash},
        eval_config=cfg.to_dict(),
        evaluated=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def load_evaluation(path: str | os.PathLike[str]) -> Evaluation:
    """An evaluation record: ``FILE.json`` (from ``Evaluation.save``) or ``GATE.json:ROLE``.

    ``ROLE`` is ``baseline`` or ``candidate``: that side's record inside a gate
    result written by :func:`gate` / ``gradguard gate --json``.
    """
    text = os.fspath(path)
    role = None
    match = re.fullmatch(r"(.*\.json):(baseline|candidate)", text)
    if match:
        text, role = match.group(1), match.group(2)
    try:
        data = json.loads(Path(text).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(f"{text}: no such file") from None
    except json.JSONDecodeError as exc:
        raise GateError(f"{text}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GateError(f"{text}: not an evaluation record")
    if role is not None or data.get("kind") == GATE_KIND:
        if data.get("kind") != GATE_KIND:
            raise GateError(f"{text}: not a gate result (kind {data.get('kind')!r})")
        if role is None:
            raise GateError(f"{text} is a gate result: name the side, {text}:baseline or "
                            f"{text}:candidate")
        data = data.get(role) or {}
    return Evaluation.from_dict(data, f"{path}")


def resolve(side: str | os.PathLike[str] | Evaluation, eval_config: Any, *,
            overrides: Sequence[str] = (), key_file: str | os.PathLike[str] | None = None
            ) -> Evaluation:
    """An :class:`Evaluation` from a checkpoint path, a record path, or an Evaluation."""
    if isinstance(side, Evaluation):
        return side
    text = os.fspath(side)
    if re.search(r"\.json(:(baseline|candidate))?$", text):
        return load_evaluation(text)
    if eval_config is None:
        raise GateError(f"{text}: evaluating a checkpoint needs an evaluation config (--eval)")
    return evaluate_checkpoint(text, eval_config, overrides=overrides, key_file=key_file)


# ================================================================ the gate
@dataclass
class GateRow:
    """One metric of one slice: both values, the direction, the allowed drop and the verdict."""

    slice: str
    metric: str
    direction: str | None
    baseline: float
    candidate: float
    change: float
    worsening: float | None
    allowed: float | None
    status: str
    """``ok``, ``improved``, ``regression`` or ``not gated`` (direction unknown)."""


@dataclass
class GateResult:
    """The gate's decision, its rows, both evaluations and the threshold."""

    baseline: Evaluation
    candidate: Evaluation
    threshold: Threshold
    rows: list[GateRow]
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[GateRow]:
        return [r for r in self.rows if r.status == "regression"]

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def exit_code(self) -> int:
        """0 passed, 1 a regression beyond the threshold."""
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": GATE_KIND, "schema": 1, "passed": self.passed,
                "max_drop": str(self.threshold), "threshold": asdict(self.threshold),
                "data_hash": self.baseline.data_hash,
                "rows": [asdict(r) for r in self.rows],
                "regressions": [f"{r.slice}/{r.metric}" for r in self.regressions],
                "warnings": self.warnings,
                "baseline": self.baseline.to_dict(), "candidate": self.candidate.to_dict()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.write_text(json.dumps(json_safe(self.to_dict()), indent=1, allow_nan=False)
                          + "\n", encoding="utf-8")
        return target

    def table(self) -> str:
        """The human-readable result: lineage side by side, then one line per metric."""
        lines = [f"evaluation data: {self.baseline.workload}, {self.baseline.samples} samples, "
                 f"sha256 {self.baseline.data_hash[:16]}… (same for both)", ""]
        keys = sorted(set(self.baseline.lineage) | set(self.candidate.lineage),
                      key=_lineage_order)
        lineage_rows = [[k, _show(self.baseline.lineage.get(k)),
                         _show(self.candidate.lineage.get(k)),
                         "" if self.baseline.lineage.get(k) == self.candidate.lineage.get(k)
                         else "*"] for k in keys]
        lines += _columns(["lineage", "baseline", "candidate", ""], lineage_rows)
        lines.append("")
        metric_rows = [[r.slice, r.metric, r.direction or "?", _fmt(r.baseline),
                        _fmt(r.candidate), _fmt(r.change, signed=True),
                        _fmt(r.allowed) if r.allowed is not None else "-", r.status.upper()
                        if r.status == "regression" else r.status] for r in self.rows]
        lines += _columns(["slice", "metric", "better", "baseline", "candidate", "change",
                           "allowed drop", "verdict"], metric_rows)
        lines.append("")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        if self.passed:
            lines.append(f"PASSED: no metric is worse than the baseline by more than "
                         f"{self.threshold}")
        else:
            lines.append(f"FAILED: {len(self.regressions)} regression(s) beyond {self.threshold}: "
                         + ", ".join(f"{r.slice}/{r.metric}" for r in self.regressions))
        return "\n".join(lines)


def _lineage_order(key: str) -> tuple[int, str]:
    order = ("model.optimizer", "model.schedule", "model.train", "model.run", "model.workload",
             "model.checkpoint", "model.data")
    for i, prefix in enumerate(order):
        if key.startswith(prefix):
            return i, key
    return len(order), key


def _show(value: Any) -> str:
    if value is None:
        return "-"
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 48 else text[:21] + "…" + text[-26:]


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.6g}" if signed else f"{value:.6g}"


def _columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*row).rstrip() for row in rows]
    return out


def _rows(baseline: Evaluation, candidate: Evaluation, threshold: Threshold,
          directions: Mapping[str, str], metrics: Sequence[str] | None) -> Iterator[GateRow]:
    for slice_name, base_metrics in baseline.metrics.items():
        cand_metrics = candidate.metrics.get(slice_name)
        if cand_metrics is None:
            raise GateError(f"the candidate has no evaluation of slice {slice_name!r}")
        for metric, base in base_metrics.items():
            if metrics is not None and metric not in metrics:
                continue
            if metric not in cand_metrics:
                raise GateError(f"the candidate has no metric {metric!r} (slice {slice_name})")
            cand = cand_metrics[metric]
            direction = metric_direction(metric, primary=baseline.primary_metric,
                                         mode=baseline.mode, overrides=directions)
            change = cand - base
            if direction is None:
                yield GateRow(slice_name, metric, None, base, cand, change, None, None,
                              "not gated")
                continue
            worsening = -change if direction == "max" else change
            allowed = threshold.allowed(base) if math.isfinite(base) else math.inf
            if not math.isfinite(cand) and math.isfinite(base):
                status = "regression"
            elif not math.isfinite(base):
                status = "ok"
            elif worsening > allowed:
                status = "regression"
            elif worsening < 0:
                status = "improved"
            else:
                status = "ok"
            yield GateRow(slice_name, metric, direction, base, cand, change, worsening, allowed,
                          status)


def gate(baseline: str | os.PathLike[str] | Evaluation,
         candidate: str | os.PathLike[str] | Evaluation, eval_config: Any = None, *,
         max_drop: str | float | Threshold = "0.5%", directions: Mapping[str, str] | None = None,
         metrics: Sequence[str] | None = None, overrides: Sequence[str] = (),
         key_file: str | os.PathLike[str] | None = None) -> GateResult:
    """Evaluate (or load) both sides and compare them metric by metric, slice by slice.

    Args:
        baseline, candidate: checkpoint / run directories, evaluation records
            (``.json``, ``GATE.json:candidate``) or :class:`Evaluation` objects.
        eval_config: the evaluation config (TOML path, mapping or ``Config``);
            needed when a side is a checkpoint.
        max_drop: the allowed worsening per metric (:meth:`Threshold.parse`).
        directions: ``{metric: "min"|"max"}`` for metrics :func:`metric_direction`
            cannot infer (those are reported, not gated, otherwise).
        metrics: gate only these metric names (every slice); default all.
        overrides: ``KEY.PATH=VALUE`` applied to the evaluation config.
        key_file: signing key of signed checkpoints.

    Raises:
        GateError: bad input, or the two evaluations were made on different data.
    """
    threshold = max_drop if isinstance(max_drop, Threshold) else Threshold.parse(max_drop)
    base = resolve(baseline, eval_config, overrides=overrides, key_file=key_file)
    cand = resolve(candidate, eval_config, overrides=overrides, key_file=key_file)
    if base.data_hash != cand.data_hash or base.slices_hash != cand.slices_hash:
        what = "evaluation split" if base.data_hash != cand.data_hash else "slice masks"
        raise GateError(
            f"the baseline and the candidate were evaluated on different data ({what} "
            f"differs): baseline {base.source} on sha256 {base.data_hash} (slices "
            f"{base.slices_hash}), candidate {cand.source} on sha256 {cand.data_hash} (slices "
            f"{cand.slices_hash}); evaluate both on the same evaluation config")
    rows = list(_rows(base, cand, threshold, directions or {}, metrics))
    if metrics is not None and not rows:
        raise GateError(f"--metrics {', '.join(metrics)}: none of them is a metric of "
                        f"{base.workload} ({', '.join(base.metrics[WHOLE])})")
    warnings = []
    for name, ev in (("baseline", base), ("candidate", cand)):
        trained = {k[len("model.workload."):]: v for k, v in ev.lineage.items()
                   if k.startswith("model.workload.")}
        evaluated = {"name": ev.eval_config.get("workload", {}).get("name")}
        evaluated.update({f"options.{k}": v for k, v in
                          (ev.eval_config.get("workload", {}).get("options") or {}).items()})
        seed_trained = ev.lineage.get("model.run.seed")
        seed_eval = ev.eval_config.get("run", {}).get("seed")
        differs = [k for k in set(trained) | set(evaluated)
                   if trained.get(k) != evaluated.get(k) and trained.get(k) is not None]
        if ev.eval_config and (differs or (seed_trained is not None and seed_trained != seed_eval)):
            warnings.append(f"the {name} was trained on {trained} (seed {seed_trained}) but "
                            f"evaluated on {evaluated} (seed {seed_eval}): a workload whose "
                            "split depends on the seed may share samples with its training data")
    return GateResult(base, cand, threshold, rows, warnings)
