"""The report page: a header with the run's outcome, then one section per concern.

Every piece of text that comes from the run directory goes through
:func:`html.escape`; plots are inline SVG (see :mod:`gradguard.report.plots`). The
page references nothing outside itself: no scripts, no external stylesheets,
fonts or images.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

import gradguard
from gradguard.run.rundir import REPORT

from . import plots
from .data import RUN_GROUP, RunData, Series, load_run

SECTIONS: tuple[tuple[str, str], ...] = (
    ("loss", "Loss and evaluation"),
    ("effective-lr", "Effective learning rate"),
    ("accumulator", "Accumulator"),
    ("grad-norm", "Gradient norm"),
    ("update-ratio", "Update / parameter ratio"),
    ("timeline", "Timeline: guard actions and checkpoints"),
    ("throughput", "Throughput"),
    ("config", "Configuration and environment"),
)
"""The report's sections: (element id, heading), in page order."""

MAX_TABLE_ROWS = 500
"""Most rows of an event table; the rest are counted."""

NO_ACCUMULATOR = {"sgd": "SGD", "lion": "Lion", "lars": "LARS",
                  "gradientdescent": "Gradient descent", "gradient_descent": "Gradient descent",
                  "newton": "Newton's method", "nonlinearcg": "Nonlinear CG", "cg": "Nonlinear CG"}
"""Optimizers that keep no second-moment accumulator, by registry name (lower case)."""

STATUS_CLASSES = {"finished": "ok", "interrupted": "warn", "halted": "bad", "running": "info"}


def build_report(run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                 ) -> Path:
    """Write the self-contained HTML report of ``run_dir``; return the file's path.

    ``output`` defaults to ``RUN_DIR/report.html``. The file is written to a
    temporary name first and renamed, so a reader never sees half a report.
    Raises :class:`~gradguard.report.ReportError` when the run directory cannot be
    read (see :func:`~gradguard.report.load_run`).
    """
    run = load_run(run_dir)
    page = render_report(run)
    target = Path(output) if output is not None else run.run_dir / REPORT
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".report-{os.getpid()}-{uuid.uuid4().hex[:12]}.html.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:  # mode "x": permissions follow the umask
            f.write(page)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def render_report(run: RunData) -> str:
    """The report of an already loaded run, as one HTML document (a string)."""
    colors = plots.group_colors(run.metrics.groups)
    body = [
        _header(run),
        _toc(),
        _notes(run),
        '<main>',
        _loss_section(run),
        _effective_lr_section(run, colors),
        _accumulator_section(run, colors),
        _grad_norm_section(run, colors),
        _update_ratio_section(run, colors),
        _timeline_section(run),
        _throughput_section(run),
        _config_section(run),
        '</main>',
        _footer(),
    ]
    title = f"{_run_name(run)} · gradguard report"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n<div class=\"page\">\n{''.join(body)}\n</div>\n</body>\n</html>\n")


# ------------------------------------------------------------------ header
def _run_name(run: RunData) -> str:
    name = run.config.get("name") if run.config else None
    return name if isinstance(name, str) and name else run.run_dir.resolve().name


def _header(run: RunData) -> str:
    status = run.status
    facts: list[tuple[str, str]] = [
        ("Workload", run.workload or "unknown"),
        ("Optimizer", run.optimizer or "unknown"),
    ]
    steps, planned = run.steps, run.planned_steps
    if steps is not None:
        facts.append(("Steps", f"{steps:,}" + (f" of {planned:,} planned"
                                               if planned and planned != steps else "")))
    seconds = run.seconds
    if seconds is not None:
        facts.append(("Wall time", _duration(seconds)))
    samples = (run.summary or {}).get("samples")
    if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0:
        facts.append(("Samples", f"{samples:,}"))
    metric = run.primary_metric
    if metric is not None:
        final, best, best_step = run.final_and_best()
        better = "higher" if run.mode == "max" else "lower"
        if final is not None:
            facts.append((f"{metric} (final)", _num(final)))
        if best is not None:
            facts.append((f"{metric} (best, {better} is better)",
                          _num(best) + (f" at step {best_step:,}" if best_step is not None
                                        else "")))
        target = run.target
        if target is not None:
            reached = run.target_reached_step
            sign = "≥" if run.mode == "max" else "≤"
            if reached is not None:
                verdict = f"reached at step {reached:,}"
            elif best is not None:
                hit = best >= target if run.mode == "max" else best <= target
                verdict = "reached" if hit else "not reached"
            else:
                verdict = "no evaluation yet"
            facts.append(("Target", f"{metric} {sign} {_num(target)}: {verdict}"))
    actions = Counter(str(r.get("action")) for r in run.guard if r.get("action"))
    if run.guard or "guard.jsonl" not in run.missing:
        facts.append(("Guard actions", ", ".join(f"{n} × {a}" for a, n in actions.most_common())
                      or "none"))
    saves = _checkpoint_rows(run)
    if saves or run.checkpoints:
        facts.append(("Checkpoints", f"{len(saves)} saved, {len(run.checkpoints)} kept"))
    start = run.last_event("start")
    if start is not None and start.get("resumed_from"):
        facts.append(("Resumed from", str(start["resumed_from"])))
    started = (run.env or {}).get("start_time") or (start or {}).get("time")
    if started:
        facts.append(("Started", str(started)))
    cls = STATUS_CLASSES.get(status, "other")
    out = ['<header class="run">',
           f'<div class="title-row"><h1>{escape(_run_name(run))}</h1>'
           f'<span class="status status-{cls}" id="status">{escape(status)}</span></div>',
           f'<p class="path">{escape(str(run.run_dir))}</p>',
           '<dl class="facts">']
    out += [f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in facts]
    out.append("</dl>")
    diagnosis = run.diagnosis
    if status == "halted" and diagnosis:
        out.append(f'<pre class="diagnosis">{escape(diagnosis)}</pre>')
    interrupted = run.last_event("interrupted")
    if status == "interrupted" and interrupted is not None:
        out.append(f'<p class="lead">Interrupted by {escape(str(interrupted.get("signal")))} '
                   f'at step {escape(str(interrupted.get("step")))}; a checkpoint was saved.</p>')
    out.append("</header>")
    return "\n".join(out)


def _toc() -> str:
    links = "".join(f'<a href="#{sid}">{escape(title.split(":")[0])}</a>'
                    for sid, title in SECTIONS)
    return f'<nav class="toc">{links}</nav>'


def _notes(run: RunData) -> str:
    notes = list(run.notes)
    if run.missing:
        notes.append("Not in the run directory: " + ", ".join(run.missing) + ".")
    if not notes:
        return ""
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f'<aside class="notes" id="notes"><strong>Notes</strong><ul>{items}</ul></aside>'


def _footer() -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return (f'<footer>Generated by gradguard {escape(gradguard.__version__)} on {now}. '
            "Self-contained: this file references nothing outside itself.</footer>")


# ------------------------------------------------------------------ building blocks
def _section(sid: str, lead: str, parts: Iterable[str]) -> str:
    title = dict(SECTIONS)[sid]
    return (f'<section id="{sid}">\n<h2>{escape(title)}</h2>\n<p class="lead">{lead}</p>\n'
            + "\n".join(parts) + "\n</section>\n")


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _empty(sentence: str) -> str:
    return f'<p class="empty">{escape(sentence)}</p>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str,
           numeric: Sequence[int] = (), paths: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows[:MAX_TABLE_ROWS]:
        cells = "".join(
            f'<td{" class=num" if i in numeric else " class=file" if i in paths else ""}>'
            f"{escape(_cell(v))}</td>" for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    more = len(rows) - MAX_TABLE_ROWS
    extra = (f'<p class="more">{more:,} more row(s) not shown.</p>' if more > 0 else "")
    return (f'<div class="table-wrap"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{extra}')


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def _num(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _optimizer_key(run: RunData) -> str:
    return (run.optimizer or "").strip().lower().replace(" ", "")


# ------------------------------------------------------------------ sections
def _loss_section(run: RunData) -> str:
    loss = run.metrics.series("loss", RUN_GROUP)
    evals = run.evaluations()
    metric, target, mode = run.primary_metric, run.target, run.mode
    parts = []
    if loss is not None and len(loss):
        parts.append(_figure(*_plot(plots.training_loss(
            loss, target=target if metric == "loss" and "loss" not in evals else None,
            mode=mode, salt="loss-train"))))
    elif loss is not None:
        parts.append(_empty(f"Every training loss recorded was non-finite "
                            f"({len(loss.nonfinite_steps)} value(s))."))
    else:
        parts.append(_empty("No training loss was recorded (the loop logs it to "
                            "metrics.jsonl through Recorder.log(step, loss=...))."))
    if evals:
        _, _, best_step = run.final_and_best()
        parts.append(_figure(*_plot(plots.evaluation(
            evals, primary=metric, target=target, mode=mode, best_step=best_step,
            salt="loss-eval"))))
    else:
        parts.append(_empty("No evaluation was recorded yet (no eval event in events.jsonl "
                            "and no eval_* values in metrics.jsonl)."))
    return _section("loss", "What the model learned: the training loss every logged step, "
                    "and each evaluation metric against the target.", parts)


def _plot(plot: plots.Plot) -> tuple[str, str]:
    return plot.svg, plot.caption


def _no_state_reason(run: RunData) -> str:
    name = run.optimizer or "the optimizer"
    key = _optimizer_key(run)
    names = run.metrics.names()
    if "hybrid" in key:
        return (f"{name} is a Hybrid optimizer, which has no state schema of its own "
                "(docs/watch.md: register one with register_schema, or record each inner "
                "optimizer with its own recorder)")
    if not names & {"update_ratio", "grad_norm_estimate", "update_norm"}:
        return "the recorder's sampled tier was off (every=None) or has not run yet"
    return (f"{name} has no state schema in the flight recorder (docs/watch.md: "
            "register_schema teaches it one)")


def _effective_lr_section(run: RunData, colors: dict[str, str]) -> str:
    groups = run.metrics.groups_of("effective_lr")
    if len(groups) > 1 and RUN_GROUP in groups:
        groups.remove(RUN_GROUP)
    dists = {g: d for g in groups if (d := run.metrics.distribution("effective_lr", g))}
    lr = {g: s for g in run.metrics.groups_of("lr") if (s := run.metrics.series("lr", g))}
    lead = ("The per-coordinate step size the optimizer actually takes (for Adagrad "
            "lr/(√G+ε)), per parameter group: a band collapsing towards zero is "
            "learning-rate starvation (F1).")
    parts = []
    if dists:
        svg = plots.quantile_bands(dists, colors=colors, ylabel="effective lr", overlay=lr,
                                   overlay_label="scheduled lr", salt="effective-lr",
                                   alt="effective learning rate quantile bands per group")
        more = len(groups) - plots.MAX_PANELS
        parts.append(_figure(svg, "Effective learning rate per group, from the recorder's "
                             "sampled tier: p01–p99 (light band), p10–p90 (dark band) and the "
                             "median (line); the dashed line is the scheduled lr."
                             + (f" {more} more group(s) not drawn." if more > 0 else "")))
    else:
        parts.append(_empty(f"No effective learning rate was recorded: "
                            f"{_no_state_reason(run)}."))
        if lr:
            svg = plots.lines(lr, colors=colors, ylabel="scheduled lr", salt="lr-only",
                              alt="scheduled learning rate per group")
            parts.append(_figure(svg, "The scheduled learning rate per group (group['lr'])."))
    return _section("effective-lr", lead, parts)


def _accumulator_section(run: RunData, colors: dict[str, str]) -> str:
    means = {f"{g} mean": s for g in run.metrics.groups_of("accumulator_mean")
             if (s := run.metrics.series("accumulator_mean", g))}
    maxes = {f"{g} max": s for g in run.metrics.groups_of("accumulator_max")
             if (s := run.metrics.series("accumulator_max", g))}
    dists = {g: d for g in run.metrics.groups_of("accumulator")
             if (d := run.metrics.distribution("accumulator", g))}
    lead = ("The optimizer's second-moment state (Adagrad's sum, Adam's exp_avg_sq, ...): "
            "growth without bound starves the step size, underflow makes it explode (F1, F2).")
    parts = []
    if means or maxes:
        series = {**means, **maxes}
        line_colors = {k: colors.get(k.rsplit(" ", 1)[0], plots.PALETTE[0]) for k in series}
        styles: dict[str, dict[str, Any]] = {k: {"linestyle": "--", "linewidth": 1.0}
                                             for k in maxes}
        groups = list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in series))
        legend: list[tuple[str, dict[str, Any]]] = [
            (g, {"color": colors.get(g, plots.PALETTE[0])}) for g in groups]
        legend += [("mean", {"color": "#6b7280"}),
                   ("max", {"color": "#6b7280", "linestyle": "--", "linewidth": 1.0})]
        svg = plots.lines(series, colors=line_colors, styles=styles, legend=legend,
                          ylabel="accumulator", salt="accumulator-exact",
                          alt="accumulator mean and max per group")
        parts.append(_figure(svg, "Exact accumulator mean (solid) and maximum (dashed) per "
                             "group, from the recorder's full tier (log scale)."))
    if dists:
        svg = plots.quantile_bands(dists, colors=colors, ylabel="accumulator",
                                   salt="accumulator-dist",
                                   alt="accumulator quantile bands per group")
        parts.append(_figure(svg, "Accumulator distribution per group over the sampled "
                             "coordinates: p01–p99 and p10–p90 bands, median line."))
    if not parts:
        key = _optimizer_key(run)
        if key in NO_ACCUMULATOR:
            sentence = (f"{NO_ACCUMULATOR[key]} keeps no accumulator (no second-moment "
                        "state), so there is nothing to plot here.")
        elif run.metrics.groups_of("effective_lr"):
            sentence = (f"{run.optimizer or 'The optimizer'} keeps no accumulator (its state "
                        "schema names none), so there is nothing to plot here.")
        else:
            sentence = f"No accumulator metrics were recorded: {_no_state_reason(run)}."
        parts.append(_empty(sentence))
    return _section("accumulator", lead, parts)


def _grad_norm_section(run: RunData, colors: dict[str, str]) -> str:
    series: dict[str, Series] = {}
    line_colors: dict[str, str] = {}
    styles: dict[str, dict[str, Any]] = {}
    legend: dict[str, dict[str, Any]] = {}
    exact = {g: s for g in run.metrics.groups_of("grad_norm")
             if (s := run.metrics.series("grad_norm", g))}
    estimates = {g: s for g in run.metrics.groups_of("grad_norm_estimate")
                 if (s := run.metrics.series("grad_norm_estimate", g))}
    for g, s in exact.items():
        label = "all (global)" if g == RUN_GROUP else g
        series[label], line_colors[label] = s, colors.get(g, plots.PALETTE[0])
        styles[label] = {"linewidth": 0.9, "alpha": 0.8} if g == RUN_GROUP else {}
        legend[label] = {"color": line_colors[label]}
    for g, s in estimates.items():
        label = f"{g} (estimate)"
        series[label], line_colors[label] = s, colors.get(g, plots.PALETTE[0])
        styles[label] = {"linestyle": ":", "marker": ".", "markersize": 3, "linewidth": 1.0,
                         "alpha": 0.75}
        legend.setdefault("all (global)" if g == RUN_GROUP else g, {"color": line_colors[label]})
    if exact and estimates:
        legend["exact"] = {"color": "#6b7280"}
    if estimates:
        legend["estimate (sampled)"] = {"color": "#6b7280", "linestyle": ":", "marker": "."}
    lead = ("The L2 norm of the gradients: spikes and non-finite values are what the guard's "
            "grad_spike and nonfinite detectors act on (F2, F8).")
    if not series:
        return _section("grad-norm", lead, [_empty(
            "No gradient norm was recorded: the run had no guard handing norms to the recorder "
            "and the recorder's full and sampled tiers were off.")])
    svg = plots.lines(series, colors=line_colors, styles=styles, legend=list(legend.items()),
                      ylabel="gradient norm",
                      salt="grad-norm", alt="gradient norm over steps")
    caption = ("Exact gradient norm (solid): 'all (global)' every step from the guard, per "
               "group at the recorder's full tier. Sampled-tier estimates are dotted, kept "
               "apart from exact values. Red crosses: non-finite norms.")
    return _section("grad-norm", lead, [_figure(svg, caption)])


def _update_ratio_section(run: RunData, colors: dict[str, str]) -> str:
    series = {g: s for g in run.metrics.groups_of("update_ratio")
              if (s := run.metrics.series("update_ratio", g))}
    lead = ("‖Δw‖/‖w‖ per step: healthy training is often 1e-4–1e-2; a ratio falling "
            "for good means the step size is starving (F1), a jump means instability.")
    if not series:
        return _section("update-ratio", lead, [_empty(
            "No update ratio was recorded: the recorder's sampled tier was off (every=None) "
            "or has not run yet.")])
    svg = plots.lines(series, colors=colors, ylabel="update / param ratio",
                      salt="update-ratio", alt="update to parameter ratio per group")
    return _section("update-ratio", lead, [_figure(
        svg, "Update-to-parameter ratio per group, estimated from the sampled coordinates "
             "(log scale).")])


def _checkpoint_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per committed checkpoint: step, path, metrics, bytes, kept on disk."""
    on_disk = {c["step"]: c for c in run.checkpoints}
    saves: dict[Any, dict[str, Any]] = {}
    for record in run.checkpoint_audit:
        if record.get("event") == "save":
            saves[record.get("step")] = {"step": record.get("step"), "path": record.get("path"),
                                         "metrics": None, "bytes": record.get("bytes")}
    for event in run.events_of("checkpoint"):
        row = saves.setdefault(event.get("step"), {"step": event.get("step"), "bytes": None})
        row["path"] = event.get("path") or row.get("path")
        row["metrics"] = event.get("metrics")
    if not saves:
        for step, c in on_disk.items():
            saves[step] = {"step": step, "path": c["path"], "metrics": c["metrics"],
                           "bytes": c["bytes"]}
    rows = []
    for step, row in saves.items():
        disk = on_disk.get(step)
        if row.get("metrics") is None and disk is not None:
            row["metrics"] = disk["metrics"]
        row["kept"] = "yes" if disk is not None else "no"
        row["path"] = _relative(run, row.get("path"))
        rows.append(row)
    return sorted(rows, key=lambda r: (not isinstance(r["step"], int), r["step"] or 0))


def _relative(run: RunData, path: Any) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(run.run_dir.resolve()))
    except (ValueError, OSError):
        return str(path)


def _timeline_section(run: RunData) -> str:
    lead = ("When the guard acted (skips, clips, rollbacks, lr backoffs, accumulator resets, "
            "stops) and when checkpoints were committed, on the loss curve.")
    guard = run.guard or [{"step": e.get("step"), "detector": e.get("detector"),
                           "action": e.get("action"), "outcome": e.get("outcome"),
                           "message": e.get("message")} for e in run.events_of("guard")]
    checkpoints = _checkpoint_rows(run)
    marks = [plots.Mark(int(r["step"]), str(r["action"])) for r in guard
             if isinstance(r.get("step"), int) and r.get("action")]
    marks += [plots.Mark(int(r["step"]), "checkpoint") for r in checkpoints
              if isinstance(r.get("step"), int)]
    run_events = run.events_of("resume", "target_reached", "early_stop", "interrupted",
                               "halted")
    marks += [plots.Mark(int(e["step"]), str(e["event"])) for e in run_events
              if isinstance(e.get("step"), int)]
    parts = []
    loss = run.metrics.series("loss", RUN_GROUP)
    if marks:
        svg = plots.timeline(loss if loss is not None and len(loss) else None, marks,
                             salt="timeline")
        parts.append(_figure(svg, "Guard actions and run events at their steps: on the "
                             "training loss (top) and one row per kind (bottom)."))
    parts.append("<h3>Guard events</h3>")
    if guard:
        rows = [(r.get("step"), r.get("detector"), r.get("action"), r.get("outcome"),
                 r.get("message")) for r in guard]
        parts.append(_table(("step", "detector", "action", "outcome", "message"), rows,
                            cls="guard-events", numeric=(0,)))
    elif "guard.jsonl" in run.missing:
        parts.append(_empty("No guard events: guard.jsonl is absent (the run had no guard, "
                            "or stopped before its first step)."))
    else:
        parts.append(_empty("No guard events: the guard took no action in this run."))
    parts.append("<h3>Checkpoints</h3>")
    if checkpoints:
        rows = [(r["step"], r["path"], r.get("metrics"), _size(r.get("bytes")), r["kept"])
                for r in checkpoints]
        parts.append(_table(("step", "path", "metrics", "size", "kept"), rows,
                            cls="checkpoints", numeric=(0, 3), paths=(1,)))
    else:
        parts.append(_empty("No checkpoint was committed in this run."))
    resume = [(e.get("step"), "resume", f"from {e.get('path')} "
               f"(checkpoint step {e.get('checkpoint_step')})") for e in run.events_of("resume")]
    resume += [(e.get("step"), "restore fidelity",
                f"{e.get('metric')}: before {_cell(e.get('before'))}, after "
                f"{_cell(e.get('after'))}, delta {_cell(e.get('delta'))}")
               for e in run.events_of("restore_fidelity")]
    resume += [(r.get("step"), f"checkpoint {r.get('event')}",
                _cell({k: _relative(run, v) if k == "path" else v for k, v in r.items()
                       if k not in ("time", "event", "step", "pid", "host")
                       and v not in (None, "", [], {})}))
               for r in run.checkpoint_audit
               if r.get("event") in ("restore", "refused", "config_change", "save_failed")]
    if resume:
        parts.append("<h3>Resume and restore fidelity</h3>")
        parts.append(_table(("step", "event", "details"), resume, cls="resume", numeric=(0,)))
    if run_events:
        parts.append("<h3>Run events</h3>")
        event_rows = [(e.get("step"), e.get("event"),
                       _cell({k: v for k, v in e.items()
                              if k not in ("time", "wall_time", "step", "event")}))
                      for e in run_events]
        parts.append(_table(("step", "event", "details"), event_rows, cls="run-events",
                            numeric=(0,)))
    return _section("timeline", lead, parts)


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _throughput_section(run: RunData) -> str:
    lead = "How fast training ran: a drop marks a straggler, I/O stall or a slow checkpoint."
    samples = run.metrics.series("samples_per_second", RUN_GROUP)
    if samples is not None and len(samples):
        median = float(_median(samples))
        svg = plots.throughput(samples, ylabel="samples / s", salt="throughput")
        return _section("throughput", lead, [_figure(
            svg, f"Samples per second at every step (batch size / step time); median "
                 f"{median:,.0f} samples/s.")])
    step_time = run.metrics.series("step_time", RUN_GROUP)
    if step_time is not None and len(step_time):
        ok = step_time.values > 0
        rate = Series(step_time.steps[ok], 1.0 / step_time.values[ok], step_time.nonfinite_steps)
        median = float(_median(rate))
        svg = plots.throughput(rate, ylabel="steps / s", salt="throughput")
        return _section("throughput", lead, [_figure(
            svg, f"Optimizer steps per second (1 / step time); median {median:,.1f} steps/s.")])
    return _section("throughput", lead, [_empty(
        "No step times were recorded yet (the recorder reports step_time from the second "
        "step on).")])


def _median(series: Series) -> float:
    return float(np.median(series.values)) if len(series) else math.nan


def _config_section(run: RunData) -> str:
    parts = []
    info = (run.summary or {}).get("info")
    if isinstance(info, dict) and info:
        parts.append("<h3>Workload facts</h3>")
        parts.append(_table(("fact", "value"), list(_flatten(info)), cls="workload-info"))
    parts.append("<h3>config.toml</h3>")
    if run.config_text is not None:
        parts.append(f'<pre class="config">{escape(run.config_text)}</pre>')
    else:
        parts.append(_empty("config.toml is absent from the run directory."))
    parts.append("<h3>env.json</h3>")
    if run.env is not None:
        rows = list(_flatten(run.env))
        parts.append(_table(("key", "value"), rows, cls="env") if rows
                     else _empty("env.json is empty."))
    else:
        parts.append(_empty("env.json is absent from the run directory."))
    return _section("config", "What ran, and where: the validated configuration and the "
                    "environment.", parts)


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, _cell(value)


CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f3f4f6;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.page{max-width:1120px;margin:0 auto;padding:24px 20px 40px}
header.run,section,aside.notes{background:var(--card);border:1px solid var(--line);
border-radius:10px;padding:18px 24px;margin-top:16px}
header.run{margin-top:0}
.title-row{display:flex;align-items:center;gap:14px;flex-wrap:wrap}
h1{font-size:22px;margin:0;overflow-wrap:anywhere}
h2{font-size:17px;margin:0 0 4px}
h3{font-size:14px;margin:18px 0 6px}
p.path{color:var(--muted);margin:2px 0 0;font-size:12.5px;overflow-wrap:anywhere}
.status{display:inline-block;padding:2px 12px;border-radius:999px;font-weight:700;
font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.status-ok{background:#dcfce7;color:#166534}.status-warn{background:#fef3c7;color:#92400e}
.status-bad{background:#fee2e2;color:#991b1b}.status-info{background:#dbeafe;color:#1e40af}
.status-other{background:#e5e7eb;color:#374151}
dl.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));
gap:12px 24px;margin:16px 0 0}
dl.facts div{min-width:0}
dl.facts dt{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
dl.facts dd{margin:0;font-weight:600;overflow-wrap:anywhere}
nav.toc{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:4px 16px;
background:rgba(243,244,246,.95);padding:10px 4px;font-size:13px}
nav.toc a{color:var(--accent);text-decoration:none}
nav.toc a:hover{text-decoration:underline}
aside.notes{background:#fffbeb;border-color:#fde68a}
aside.notes ul{margin:4px 0 0;padding-left:20px}
p.lead{color:var(--muted);margin:0 0 10px}
figure{margin:12px 0 18px}
figure svg{display:block;width:100%;height:auto}
svg *{stroke-linejoin:round;stroke-linecap:butt}
figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
p.empty{margin:10px 0;padding:12px 16px;background:#f9fafb;border:1px dashed #d1d5db;
border-radius:8px;color:#4b5563}
.table-wrap{max-height:440px;overflow:auto;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid var(--line);vertical-align:top;
overflow-wrap:anywhere}
th{background:#f9fafb;font-weight:600;position:sticky;top:0;white-space:nowrap;
overflow-wrap:normal}
td.file{white-space:nowrap;overflow-wrap:normal}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:last-child td{border-bottom:none}
p.more{color:var(--muted);font-size:12px}
pre{background:#0f172a;color:#e2e8f0;padding:12px 14px;border-radius:8px;overflow:auto;
font-size:12.5px;line-height:1.45}
pre.diagnosis{background:#fef2f2;color:#7f1d1d;border:1px solid #fecaca;white-space:pre-wrap}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
@media print{nav.toc{display:none}section{break-inside:avoid}body{background:#fff}}
"""
