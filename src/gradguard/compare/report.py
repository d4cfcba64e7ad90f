"""The comparison report: one self-contained HTML page (tables + inline matplotlib SVG).

Sections: the verdicts (pairwise tests in words), the per-variant results
table (final and best metric with 95% t-intervals, time-to-target, stability,
cost), the evaluation curves of every variant with a band over its seeds, the
primary metric against compute seconds, the effective learning rate of each
variant side by side, the pairwise tests, every run, and each variant's
resolved optimizer settings. Figures are drawn on matplotlib's Agg canvas
(no pyplot state is touched) and inlined as SVG: the file references nothing
outside itself except links to each run's own report.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from gradguard.compare.runs import lr_quantiles, read_run

REPORT = "report.html"

PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#ca8a04",
           "#4b5563", "#65a30d", "#dc2626")

STYLE: dict[str, Any] = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8.0,
    "legend.frameon": False,
}

MAX_METRIC_PANELS = 6


def _rc() -> Any:
    return dict(STYLE)


def colors(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per variant."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _svg(fig: Any, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    rc: Any = {**STYLE, "svg.hashsalt": f"gradguard-compare-{salt}"}
    with matplotlib.rc_context(rc):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float) -> Any:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
    return fig


def _grid(n: int, ncols: int, height: float = 2.8) -> tuple[Any, list[Any]]:
    import matplotlib

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(10.0, height * nrows)
    with matplotlib.rc_context(_rc()):
        axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _aligned(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                      np.ndarray]:
    """Steps, mean, min and max over the seeds' curves (at steps any seed has)."""
    steps = sorted({s for c in curves for s in c})
    mean, low, high = [], [], []
    for s in steps:
        vals = [c[s] for c in curves if s in c and math.isfinite(c[s])]
        mean.append(float(np.mean(vals)) if vals else math.nan)
        low.append(min(vals) if vals else math.nan)
        high.append(max(vals) if vals else math.nan)
    return np.array(steps), np.array(mean), np.array(low), np.array(high)


def eval_curves(runs: dict[str, list[Any]], metrics: list[str], palette: dict[str, str], *,
                primary: str, target: float | None) -> str:
    """One panel per eval metric: each variant's mean over seeds, its min-max band shaded."""
    import matplotlib

    fig, axes = _grid(len(metrics), 2)
    with matplotlib.rc_context(_rc()):
        for ax, metric in zip(axes, metrics, strict=True):
            for name, outcomes in runs.items():
                curves = [{p.step: p.metrics[metric] for p in o.evals if metric in p.metrics}
                          for o in outcomes]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                steps, mean, low, high = _aligned(curves)
                ax.plot(steps, mean, color=palette[name], lw=1.6,
                        label=f"{name} (n={len(curves)})", marker="o" if len(steps) < 40 else None,
                        ms=2.5)
                ax.fill_between(steps, low, high, color=palette[name], alpha=0.18, lw=0)
            if metric == primary and target is not None:
                ax.axhline(target, color="#111827", ls="--", lw=0.9, label="target")
            ax.set_title(f"eval {metric}")
            ax.set_xlabel("step")
        axes[0].legend(loc="best")
        fig.tight_layout()
    return _svg(fig, "eval")


def metric_vs_seconds(runs: dict[str, list[Any]], palette: dict[str, str], *, primary: str,
                      target: float | None) -> str:
    """The primary metric of every run against its kept-work wall-clock seconds."""
    import matplotlib

    fig = _figure(10.0, 3.2)
    with matplotlib.rc_context(_rc()):
        ax = fig.add_subplot(1, 1, 1)
        for name, outcomes in runs.items():
            for i, o in enumerate(outcomes):
                pts = [(p.seconds, p.metrics[primary]) for p in o.evals if primary in p.metrics]
                if not pts:
                    continue
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, color=palette[name], lw=1.0, alpha=0.8,
                        label=name if i == 0 else None)
        if target is not None:
            ax.axhline(target, color="#111827", ls="--", lw=0.9, label="target")
        ax.set_xlabel("seconds (kept work, wall clock)")
        ax.set_title(f"eval {primary} against time, one line per run")
        ax.legend(loc="best")
        fig.tight_layout()
    return _svg(fig, "seconds")


def lr_panels(runs: dict[str, list[Any]], palette: dict[str, str]) -> str | None:
    """One panel per variant: the effective lr's median (line) and p10-p90 band per group.

    Across seeds, each quantile is the median of the seeds' values at that step.
    """
    import matplotlib

    data: dict[str, dict[str, tuple[str, list[dict[int, dict[str, float]]]]]] = {}
    for name, outcomes in runs.items():
        groups: dict[str, tuple[str, list[dict[int, dict[str, float]]]]] = {}
        for o in outcomes:
            for group, (kind, series) in lr_quantiles(o.run_dir).items():
                groups.setdefault(group, (kind, []))[1].append(series)
        if groups:
            data[name] = groups
    if not data:
        return None
    fig, axes = _grid(len(data), 3, height=2.6)
    line_styles = ("-", "--", ":", "-.")
    lows, highs = [], []
    with matplotlib.rc_context(_rc()):
        for ax, (name, groups) in zip(axes, data.items(), strict=True):
            kinds = set()
            for j, (group, (kind, seeds)) in enumerate(groups.items()):
                kinds.add(kind)
                steps = sorted({s for series in seeds for s in series})
                q = {k: np.array([np.median([series[s][k] for series in seeds if s in series])
                                  for s in steps]) for k in ("p10", "p50", "p90")}
                x = np.array(steps)
                positive = q["p50"] > 0
                if not positive.any():
                    continue
                ax.plot(x, q["p50"], color=palette[name], ls=line_styles[j % len(line_styles)],
                        lw=1.4, label=group if len(groups) > 1 else None)
                if kind == "effective_lr":
                    ax.fill_between(x, q["p10"], q["p90"], color=palette[name], alpha=0.18, lw=0)
                finite = np.concatenate([q["p10"], q["p90"]])
                finite = finite[np.isfinite(finite) & (finite > 0)]
                if finite.size:
                    lows.append(float(finite.min()))
                    highs.append(float(finite.max()))
            label = "effective lr" if kinds == {"effective_lr"} else "scheduled lr"
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("step")
            if len(groups) > 1:
                ax.legend(loc="best")
        for ax in axes:
            if lows:
                ax.set_yscale("log")
                ax.set_ylim(min(lows) / 1.5, max(highs) * 1.5)
        fig.tight_layout()
    return _svg(fig, "lr")


# ================================================================== HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;
 padding:0 1rem;color:#111827;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;
 border-bottom:1px solid #e5e7eb;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border-bottom:1px solid #e5e7eb;padding:.25rem .5rem;text-align:right;vertical-align:top}
th{background:#f9fafb}td.l,th.l{text-align:left}
.muted{color:#6b7280}.ok{color:#15803d}.bad{color:#b91c1c}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}
figcaption{font-size:.8rem;color:#4b5563}
ul.verdicts li{margin:.3rem 0}code{font-size:.85em}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.3em}
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _interval(d: dict[str, Any]) -> str:
    if d.get("mean") is None:
        return "–"
    text = _num(d["mean"])
    if d.get("low") is not None:
        text += f" <span class=muted>[{_num(d['low'])}, {_num(d['high'])}]</span>"
    if d.get("n_nonfinite"):
        text += f" <span class=bad>({d['n_nonfinite']} non-finite)</span>"
    return text


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    head = "".join(f"<th class=l>{h}</th>" if i < left else f"<th>{h}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td class=l>{c}</td>" if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings(settings: Any) -> str:
    if not isinstance(settings, dict):
        return ""
    if "groups" in settings:
        return "; ".join(f"{escape(g)}: {_settings(s)}" for g, s in settings["groups"].items())
    return ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in settings.items()
                     if v is not None)


def render(summary: dict[str, Any], output: Path) -> str:
    """The report's HTML for a compare summary (its run directories are read for the plots)."""
    names = list(summary["variants"])
    palette = colors(names)
    primary = summary.get("primary_metric") or "metric"
    mode = summary.get("mode", "min")
    target = summary.get("target")
    results = summary["results"]
    runs: dict[str, list[Any]] = {n: [] for n in names}
    for run in summary["runs"]:
        runs[run["variant"]].append(read_run(run["run_dir"], target=target))

    parts = [f"<h1>Optimizer comparison: {escape(str(summary.get('config')))}</h1>",
             f"<p class=muted>workload <b>{escape(str(summary.get('workload')))}</b>, primary "
             f"metric <b>{escape(primary)}</b> ({'higher' if mode == 'max' else 'lower'} is "
             f"better), target {_num(target)}; seeds {summary.get('seeds')}; "
             f"{len(summary['runs'])} runs; written "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>"]

    verdicts = summary["pairwise"]["final"]
    parts.append("<h2>Verdict</h2>")
    if summary.get("ranking"):
        lead = summary["ranking"][0]
        parts.append(f"<p>Best mean final {escape(primary)}: <b>{escape(lead)}</b> "
                     f"({_interval(results[lead]['final'])}, 95% t-interval over seeds).</p>")
    if verdicts:
        parts.append(f"<p>On the evaluation metric (final {escape(primary)}):</p>")
        parts.append("<ul class=verdicts>" + "".join(f"<li>{escape(t['verdict'])}</li>"
                                                    for t in verdicts) + "</ul>")
        parts.append("<p>On optimisation (final training loss):</p>")
        parts.append("<ul class=verdicts>" + "".join(
            f"<li>{escape(t['verdict'])}</li>" for t in summary["pairwise"]["train_loss"])
                     + "</ul>")
    else:
        parts.append("<p class=muted>One variant: nothing to test against.</p>")

    rows = []
    for n in names:
        r = results[n]
        ttt = r["time_to_target"]
        cost = r["cost"]
        stab = r["stability"]
        swatch = f"<span class=swatch style='background:{palette[n]}'></span>"
        incomplete = f" <span class=bad>({len(r['incomplete'])} incomplete)</span>" \
            if r["incomplete"] else ""
        rows.append([
            f"{swatch}{escape(n)}{incomplete}", _interval(r["final"]), _interval(r["best"]),
            _interval(r["train_loss"]),
            f"{ttt['reached']}/{ttt['runs']}",
            _num(ttt["steps"]["median"]) if ttt["steps"]["median"] is not None else "not reached",
            _num(ttt["seconds"]["median"]) if ttt["seconds"]["median"] is not None
            else "not reached",
            str(stab["skipped_steps"]["total"]), str(stab["rollbacks"]["total"]),
            str(stab["halted"]), _interval(cost["compute_seconds"]),
            _interval(cost["seconds_per_unit"])])
    parts.append("<h2>Results per variant</h2>")
    parts.append(_table(
        ["variant", f"final {escape(primary)}", f"best {escape(primary)}",
         "final training loss", "reached target",
         "median steps to target", "median s to target", "skipped steps", "rollbacks",
         "halted", "compute s / run", f"s per unit of {escape(primary)}"], rows))
    parts.append("<p class=muted>Means over seeds with the 95% Student-t interval in brackets. "
                 "Time to target: the first evaluation at which the primary metric reaches the "
                 "target; the median counts a run that never reached it as infinitely late. "
                 "Seconds are wall-clock seconds of kept work (see docs/compare.md). Cost per "
                 "unit: seconds between the first and the last evaluation divided by the "
                 "improvement between them. Final training loss: the mean of the last 10% of "
                 "the logged mini-batch losses.</p>")

    others = {m for outcomes in runs.values() for o in outcomes for p in o.evals
              for m in p.metrics} - {primary}
    metrics = [primary, *sorted(others)]
    metrics = metrics[:MAX_METRIC_PANELS]
    parts.append("<h2>Evaluation curves</h2>")
    parts.append(f"<figure>{eval_curves(runs, metrics, palette, primary=primary, target=target)}"
                 "<figcaption>Mean over seeds (line) and the range of the seeds (band) at each "
                 "evaluation.</figcaption></figure>")
    parts.append(f"<figure>{metric_vs_seconds(runs, palette, primary=primary, target=target)}"
                 "<figcaption>Each run's primary metric against its wall-clock seconds."
                 "</figcaption></figure>")
    parts.append("<h2>Effective learning rate</h2>")
    lr_svg = lr_panels(runs, palette)
    parts.append(f"<figure>{lr_svg}<figcaption>Per variant and parameter group: the median over "
                 "seeds of the recorder's effective-lr median (line) and of its p10 and p90 "
                 "(band); a variant whose optimizer has no state schema shows the scheduled lr."
                 "</figcaption></figure>" if lr_svg else
                 "<p class=muted>No learning rate was recorded.</p>")

    parts.append("<h2>Pairwise tests</h2>")
    test_rows = []
    for which in ("final", "best", "train_loss"):
        for t in summary["pairwise"][which]:
            test_rows.append([
                escape(t["a"]), escape(t["b"]), escape(t["metric"]), _num(t["mean_a"]),
                _num(t["mean_b"]), _num(t["difference"]), _num(t["hedges_g"], 3),
                _num(t["paired_p"], 3), _num(t.get("paired_p_holm"), 3),
                _num(t["welch_p"], 3), _num(t.get("welch_p_holm"), 3),
                _num(t["mann_whitney_p"], 3),
                f"<span class={'ok' if t['significant'] else 'muted'}>"
                f"{'significant' if t['significant'] else 'not significant'}</span>"])
    parts.append(_table(["a", "b", "metric", "mean a", "mean b", "a − b", "Hedges' g",
                         "paired p", "Holm", "Welch p", "Holm", "Mann-Whitney p",
                         f"at α={summary['alpha']}"],
                        test_rows, left=3) if test_rows else
                 "<p class=muted>No pairs.</p>")

    parts.append("<h2>Runs</h2>")
    run_rows = []
    for run in summary["runs"]:
        ttt = run["time_to_target"]
        link = Path(run["run_dir"]) / "report.html"
        try:
            href = os.path.relpath(link, output)
        except ValueError:
            href = str(link)
        run_rows.append([
            escape(run["variant"]), str(run["seed"]), escape(run["status"]), _num(run["steps"]),
            _num(run["final"]), f"{_num(run['best'])} @ {_num(run['best_step'])}",
            f"{ttt['steps']} steps, {_num(ttt['seconds'])} s" if ttt else "not reached",
            _num(run["compute_seconds"]), str(run["skipped_steps"]), str(run["rollbacks"]),
            f"<a href='{escape(href)}'>{escape(str(run['run_dir']))}</a>"])
    parts.append(_table(["variant", "seed", "status", "steps", "final", "best @ step",
                         "time to target", "compute s", "skipped", "rollbacks", "run"],
                        run_rows, left=1))

    parts.append("<h2>Variants</h2>")
    parts.append(_table(["variant", "overrides", "optimizer settings (defaults filled in)"],
                        [[escape(n), escape(" ".join(v["overrides"])) or "–",
                          _settings(v.get("optimizer_settings"))]
                         for n, v in summary["variants"].items()], left=3))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>compare: {escape(str(summary.get('config')))}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def write_report(output: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write ``OUTPUT/report.html`` for a compare summary; returns its path."""
    out = Path(output)
    path = out / REPORT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(summary, out), encoding="utf-8")
    os.replace(tmp, path)
    return path


def text_summary(summary: dict[str, Any]) -> str:
    """The comparison in a few terminal lines: one per variant, then the verdicts."""
    primary = summary.get("primary_metric") or "metric"

    def ci(d: dict[str, Any]) -> str:
        if d.get("mean") is None:
            return "-"
        if d.get("low") is None:
            return f"{d['mean']:.5g}"
        return f"{d['mean']:.5g} [{d['low']:.5g}, {d['high']:.5g}]"

    rows = []
    for name, r in summary["results"].items():
        ttt = r["time_to_target"]
        median = ttt["steps"]["median"]
        rows.append([name, ci(r["final"]), ci(r["best"]), ci(r["train_loss"]),
                     f"{ttt['reached']}/{ttt['runs']}"
                     + (f", median {median:.0f} steps" if median is not None else ""),
                     str(r["stability"]["skipped_steps"]["total"]),
                     str(r["stability"]["rollbacks"]["total"]),
                     f"{r['cost']['compute_seconds']['mean']:.3g}"
                     if r["cost"]["compute_seconds"]["mean"] is not None else "-"])
    headers = ["variant", f"final {primary} (95% CI)", f"best {primary} (95% CI)",
               "train loss (95% CI)", "reached target", "skipped", "rollbacks", "s/run"]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    lines += [fmt.format(*row).rstrip() for row in rows]
    for test in summary["pairwise"]["final"]:
        lines.append("- " + test["verdict"])
    return "\n".join(lines)
