"""The report's plots: matplotlib figures on the Agg canvas, saved as inline SVG.

No pyplot and no global backend switch: each figure is a ``matplotlib.figure.Figure``
with its own ``FigureCanvasAgg``, drawn under a local ``rc_context``, so building a
report never changes the plotting state of the process that calls it. Long series
are thinned to at most :data:`MAX_POINTS` points (keeping each bucket's minimum and
maximum, so spikes survive), which bounds the size of the SVG whatever the run's
length.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from html import escape
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from .data import Distribution, Series

MAX_POINTS = 1000
"""Most points drawn per line (long series are thinned to bucket minima and maxima)."""

PANEL_POINTS = 500
"""Most points drawn per line or quantile band in a small-multiple panel."""

MAX_MARKERS = 150
"""A series with more points than this is drawn without markers."""

MAX_PANELS = 12
"""Most small-multiple panels (groups, evaluation metrics) in one figure."""

WIDTH = 10.0
"""Figure width in inches (the page scales the SVG to its column)."""

PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#ca8a04",
           "#4b5563", "#65a30d", "#dc2626")
RUN_COLOR = "#111827"
NONFINITE_COLOR = "#dc2626"

ACTION_STYLES: dict[str, tuple[str, str]] = {
    "skip": ("X", "#dc2626"),
    "clip": ("v", "#f59e0b"),
    "rollback": ("s", "#7c3aed"),
    "lr_backoff": ("D", "#b45309"),
    "reset_accumulators": ("P", "#0d9488"),
    "stop": ("*", "#111827"),
    "alert": ("o", "#6b7280"),
    "skip_batch": ("|", "#a78bfa"),
}
"""Marker and colour of each guard action on the timeline."""

EVENT_STYLES: dict[str, tuple[str, str]] = {
    "checkpoint": ("^", "#2563eb"),
    "resume": (">", "#0891b2"),
    "target_reached": ("*", "#16a34a"),
    "early_stop": ("p", "#4b5563"),
    "interrupted": ("8", "#f59e0b"),
    "halted": ("h", "#dc2626"),
}
"""Marker and colour of each run event on the timeline."""

STYLE: dict[str, Any] = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 9.0,
    "axes.labelcolor": "#374151",
    "axes.edgecolor": "#9ca3af",
    "axes.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "xtick.color": "#4b5563",
    "ytick.color": "#4b5563",
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "legend.fontsize": 8.0,
    "legend.frameon": False,
    "lines.linewidth": 1.4,
    "path.simplify": True,
    "path.simplify_threshold": 0.3,
    "figure.dpi": 100.0,
}


@dataclass
class Plot:
    """One rendered figure: inline SVG markup and its caption (plain text)."""

    svg: str
    caption: str


def group_colors(groups: Sequence[str]) -> dict[str, str]:
    """A stable colour per group label ("all", the run-wide values, is near-black)."""
    colors = {"all": RUN_COLOR}
    for i, g in enumerate(g for g in groups if g != "all"):
        colors[g] = PALETTE[i % len(PALETTE)]
    return colors


def text(value: object) -> str:
    """Text from a file made safe for matplotlib (no mathtext)."""
    return str(value).replace("$", r"\$")


# ------------------------------------------------------------ series helpers
@dataclass
class Buckets:
    """A long series summarised per bucket of consecutive points."""

    steps: np.ndarray
    """The step in the middle of each bucket."""
    low: np.ndarray
    high: np.ndarray
    middle: np.ndarray
    """The mean of each bucket (geometric when every value is positive)."""


def buckets(steps: np.ndarray, values: np.ndarray, count: int) -> Buckets:
    """``values`` in ``count`` buckets of consecutive points: minimum, maximum and mean."""
    n = len(values)
    starts = np.unique(np.linspace(0, n, count + 1).astype(np.int64)[:-1])
    sizes = np.diff(np.append(starts, n))
    positive = bool(np.all(values > 0))
    sums = np.add.reduceat(np.log(values) if positive else values, starts)
    middle = np.exp(sums / sizes) if positive else sums / sizes
    return Buckets(steps[starts + sizes // 2], np.minimum.reduceat(values, starts),
                   np.maximum.reduceat(values, starts), middle)


def draw_series(ax: Axes, steps: np.ndarray, values: np.ndarray, *, max_points: int,
                color: str, label: str | None = None, band_alpha: float = 0.18,
                **style: Any) -> None:
    """A line; a series longer than ``max_points`` becomes its bucket means (the line) and
    its bucket minima-maxima (a light band), so long noisy series stay readable."""
    if len(steps) <= max_points:
        ax.plot(steps, values, color=color, label=label, **style)
        return
    style.pop("marker", None)
    b = buckets(steps, values, max_points // 2)
    ax.fill_between(b.steps, b.low, b.high, color=color, alpha=band_alpha, linewidth=0)
    ax.plot(b.steps, b.middle, color=color, label=label, **style)


def stride(n: int, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` evenly spread points of ``n`` (first and last kept)."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def smoothing_window(n: int) -> int:
    """Points in the moving average of a series of ``n`` points (1: too short to smooth)."""
    if n < 15:
        return 1
    return int(min(500, max(3, round(n / 40))))


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Centred moving average (geometric when every value is positive)."""
    n = len(values)
    if window is None:
        window = smoothing_window(n)
    if n == 0 or window <= 1:
        return values
    positive = bool(np.all(values > 0))
    x = np.log(values) if positive else values
    c = np.concatenate([[0.0], np.cumsum(x)])
    half = window // 2
    idx = np.arange(n)
    lo, hi = np.clip(idx - half, 0, n), np.clip(idx + half + 1, 0, n)
    out = (c[hi] - c[lo]) / (hi - lo)
    return np.exp(out) if positive else out


def _log_scale(ax: Axes, arrays: Sequence[np.ndarray], *, min_ratio: float = 1.0) -> bool:
    """Use a log y axis when the values are positive and span more than ``min_ratio``."""
    finite = [a[np.isfinite(a)] for a in arrays if len(a)]
    values = np.concatenate(finite) if finite else np.array([])
    positive = values[values > 0]
    if not len(positive) or len(positive) < len(values) * 0.5:
        return False
    if positive.max() / positive.min() <= min_ratio:
        return False
    ax.set_yscale("log", nonpositive="mask")
    return True


def _mark_nonfinite(ax: Axes, steps: np.ndarray, label: str | None = "non-finite") -> None:
    """Red crosses along the top edge at the steps where a value was NaN or infinite."""
    if not len(steps):
        return
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.scatter(steps, np.full(len(steps), 0.97), transform=transform, marker="x", s=28,
               color=NONFINITE_COLOR, linewidths=1.4, zorder=5, clip_on=False, label=label)


# ------------------------------------------------------------ figures
@contextmanager
def _figure(height: float, salt: str) -> Iterator[Figure]:
    rc: Any = {**STYLE, "svg.hashsalt": salt}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(WIDTH, height))
        FigureCanvasAgg(fig)
        yield fig


def _fit(fig: Figure, rows: int = 1, *, top: float = 0.3, bottom: float = 0.5,
         left: float = 0.85, right: float = 0.2, vgap: float = 0.6, wgap: float = 0.85,
         ncols: int = 1) -> None:
    """Fixed margins in inches (cheaper than a layout engine, and the same on every page)."""
    width, height = fig.get_size_inches()
    axes_height = (height - top - bottom - (rows - 1) * vgap) / rows
    axes_width = (width - left - right - (ncols - 1) * wgap) / ncols
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, hspace=vgap / max(axes_height, 0.1),
                        wspace=wgap / max(axes_width, 0.1))


_SVG_START = re.compile(r"<svg\b")
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_STYLE_BLOCK = re.compile(r"\s*<defs>\s*<style[^>]*>.*?</style>\s*</defs>", re.S)
_XMLNS = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_GROUP_ID = re.compile(r'<g id="[^"]*"')
_PATH_DATA = re.compile(r' d="([^"]*)"')
_DECIMAL = re.compile(r"(-?\d+\.\d)\d+")


def to_svg(fig: Figure, label: str) -> str:
    """The figure as inline SVG markup: no XML prolog, DOCTYPE, metadata or namespace URLs.

    Element ids that matter (clip paths, markers) are salted hashes, unique per
    figure; the per-element group ids matplotlib writes are dropped, since several
    figures share one HTML document.
    """
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[_SVG_START.search(svg).start():]  # type: ignore[union-attr]
    svg = _METADATA.sub("", svg, count=1)
    svg = _STYLE_BLOCK.sub("", svg, count=1)
    head, rest = svg.split(">", 1)
    head = _XMLNS.sub("", head)
    svg = f'{head} role="img" aria-label="{escape(label)}">{rest}'
    svg = _GROUP_ID.sub("<g", svg)
    # coordinates to 0.1 pt (a 10-inch figure is 720 pt wide): a third smaller
    svg = _PATH_DATA.sub(lambda m: ' d="' + _DECIMAL.sub(r"\1", m.group(1)) + '"', svg)
    return svg.strip()


def _grid(fig: Figure, n: int, ncols: int) -> list[Axes]:
    """``n`` panels in rows of ``ncols``; the unused cells of the last row are hidden."""
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def _share_steps(axes: Sequence[Axes], ncols: int) -> None:
    """One step range for every panel; "step" under the lowest panel of each column."""
    lows, highs = zip(*(ax.get_xlim() for ax in axes), strict=True)
    for i, ax in enumerate(axes):
        ax.set_xlim(min(lows), max(highs))
        if i + ncols >= len(axes):
            ax.set_xlabel("step")


def training_loss(loss: Series, *, target: float | None, mode: str, salt: str) -> Plot:
    """The training loss: raw (thin) and smoothed (thick), non-finite steps marked."""
    with _figure(3.4, salt) as fig:
        ax = fig.add_subplot()
        smoothed = smoothing_window(len(loss)) > 1
        if len(loss) <= MAX_POINTS:
            ax.plot(loss.steps, loss.values, color=PALETTE[0], alpha=0.35 if smoothed else 1.0,
                    linewidth=0.8 if smoothed else 1.6, label="loss")
        else:
            b = buckets(loss.steps, loss.values, MAX_POINTS // 2)
            ax.fill_between(b.steps, b.low, b.high, color=PALETTE[0], alpha=0.2, linewidth=0,
                            label="loss (range)")
        if smoothed:
            idx = stride(len(loss), MAX_POINTS)
            ax.plot(loss.steps[idx], smooth(loss.values)[idx], color=PALETTE[0], linewidth=2.0,
                    label="moving average")
        if target is not None:
            ax.axhline(target, color=PALETTE[2], linestyle="--", linewidth=1.2,
                       label=f"target {'≤' if mode == 'min' else '≥'} {target:g}")
        _mark_nonfinite(ax, loss.nonfinite_steps)
        _log_scale(ax, [loss.values], min_ratio=30.0)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(loc="upper right", ncols=4)
        _fit(fig)
        svg = to_svg(fig, "training loss over steps")
    nonfinite = len(loss.nonfinite_steps)
    window = smoothing_window(len(loss))
    raw = "thin line" if len(loss) <= MAX_POINTS else "light band: the range over each " \
        f"{len(loss) // (MAX_POINTS // 2)} points"
    caption = f"Training loss at {len(loss):,} logged steps"
    if window > 1:
        caption += f" ({raw}) and its moving average over {window} points (thick line)"
    if nonfinite:
        caption += f"; {nonfinite} non-finite value(s) marked with red crosses"
    caption += "."
    return Plot(svg, caption)


def evaluation(evals: dict[str, Series], *, primary: str | None, target: float | None,
               mode: str, best_step: int | None, salt: str) -> Plot:
    """One panel per evaluation metric; the target on the primary metric's panel."""
    names = sorted(evals, key=lambda n: (n != primary, n))[:MAX_PANELS]
    ncols = min(3, len(names))
    rows = math.ceil(len(names) / ncols)
    with _figure(2.6 * rows + 0.3, salt) as fig:
        panels = _grid(fig, len(names), ncols)
        for i, (ax, name) in enumerate(zip(panels, names, strict=True)):
            series = evals[name]
            color = PALETTE[i % len(PALETTE)]
            draw_series(ax, series.steps, series.values, max_points=PANEL_POINTS, color=color,
                        marker="o" if len(series) <= MAX_MARKERS else "", markersize=3)
            if name == primary:
                ax.set_title(f"{text(name)} (primary)")
                if target is not None:
                    ax.axhline(target, color=PALETTE[2], linestyle="--", linewidth=1.2,
                               label=f"target {'≤' if mode == 'min' else '≥'} {target:g}")
                if best_step is not None and best_step in series.steps:
                    j = int(np.flatnonzero(series.steps == best_step)[0])
                    ax.scatter([best_step], [series.values[j]], marker="*", s=110,
                               color=PALETTE[6], zorder=4, label="best")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(loc="best")
            else:
                ax.set_title(text(name))
            _mark_nonfinite(ax, series.nonfinite_steps, label=None)
        _share_steps(panels, ncols)
        _fit(fig, rows, ncols=ncols, top=0.35, vgap=0.75)
        svg = to_svg(fig, "evaluation metrics over steps")
    more = len(evals) - len(names)
    caption = ("Evaluation metrics, one panel each" +
               (f", the target as a dashed line on the primary metric ({primary})"
                if target is not None and primary in evals else "") +
               (f"; {more} more metric(s) not drawn" if more > 0 else "") + ".")
    return Plot(svg, caption)


def _band(ax: Axes, dist: Distribution, color: str) -> list[np.ndarray]:
    idx = stride(len(dist), PANEL_POINTS)
    steps = dist.steps[idx]
    q = {k: v[idx] for k, v in dist.quantiles.items()}
    ax.fill_between(steps, q["p01"], q["p99"], color=color, alpha=0.15, linewidth=0)
    ax.fill_between(steps, q["p10"], q["p90"], color=color, alpha=0.35, linewidth=0)
    ax.plot(steps, q["p50"], color=color, linewidth=1.6)
    return [q["p01"], q["p99"], q["p50"]]


def quantile_bands(dists: dict[str, Distribution], *, colors: dict[str, str], ylabel: str,
                   overlay: dict[str, Series] | None = None, overlay_label: str = "",
                   salt: str, alt: str) -> str:
    """Small multiples, one panel per group: p01-p99 and p10-p90 bands, the median line."""
    groups = list(dists)[:MAX_PANELS]
    ncols = 1 if len(groups) == 1 else 2
    rows = math.ceil(len(groups) / ncols)
    height = (2.9 if ncols == 1 else 2.4) * rows + 0.5
    with _figure(height, salt) as fig:
        axes = _grid(fig, len(groups), ncols)
        for ax, group in zip(axes, groups, strict=True):
            arrays = _band(ax, dists[group], colors.get(group, PALETTE[0]))
            line = (overlay or {}).get(group)
            if line is not None and len(line):
                draw_series(ax, line.steps, line.values, max_points=PANEL_POINTS,
                            color=RUN_COLOR, linestyle="--", linewidth=1.1)
                arrays.append(line.values)
            _log_scale(ax, arrays)
            ax.set_title(text(group))
            ax.set_ylabel(ylabel)
        _share_steps(axes, ncols)
        handles = [Patch(color="#6b7280", alpha=0.2, label="p01–p99"),
                   Patch(color="#6b7280", alpha=0.5, label="p10–p90"),
                   Line2D([], [], color="#6b7280", linewidth=1.6, label="median (p50)")]
        if overlay:
            handles.append(Line2D([], [], color=RUN_COLOR, linestyle="--", linewidth=1.1,
                                  label=overlay_label))
        fig.legend(handles=handles, loc="upper right", ncols=len(handles),
                   bbox_to_anchor=(1 - 0.2 / WIDTH, 1.0))
        _fit(fig, rows, ncols=ncols, top=0.6, vgap=0.75)
        return to_svg(fig, alt)


def lines(series: dict[str, Series], *, colors: dict[str, str], ylabel: str, salt: str,
          alt: str, styles: dict[str, dict[str, Any]] | None = None,
          legend: Sequence[tuple[str, dict[str, Any]]] | None = None, log: bool = True,
          height: float = 3.4) -> str:
    """One line per labelled series (label -> series); non-finite steps marked once.

    ``legend`` replaces the per-series legend with the given entries (label, Line2D
    style), e.g. one per group plus one per line style. A legend of more than six
    entries goes to the right of the axes.
    """
    with _figure(height, salt) as fig:
        ax = fig.add_subplot()
        bad: list[np.ndarray] = []
        for label, s in series.items():
            style: dict[str, Any] = dict((styles or {}).get(label, {}))
            if len(s) > MAX_MARKERS:
                style.pop("marker", None)
            if len(s):
                draw_series(ax, s.steps, s.values, max_points=MAX_POINTS,
                            color=colors.get(label, PALETTE[0]), label=text(label), **style)
            bad.append(s.nonfinite_steps)
        nonfinite = np.unique(np.concatenate(bad)) if bad else np.array([])
        _mark_nonfinite(ax, nonfinite)
        if log:
            _log_scale(ax, [s.values for s in series.values()])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if legend is None:
            handles, _ = ax.get_legend_handles_labels()
        else:
            handles = [Line2D([], [], label=text(lab), **st) for lab, st in legend]
            if len(nonfinite):
                handles.append(Line2D([], [], color=NONFINITE_COLOR, marker="x",
                                      linestyle="", label="non-finite"))
        right = 0.2
        if len(handles) <= 6:
            ax.legend(handles=handles, loc="best")
        else:
            ncols = math.ceil(len(handles) / 12)
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      ncols=ncols)
            right = 0.3 + 1.6 * ncols
        _fit(fig, right=right)
        return to_svg(fig, alt)


def throughput(series: Series, *, ylabel: str, salt: str) -> str:
    """Raw rate (thin) and its moving average (thick)."""
    with _figure(3.0, salt) as fig:
        ax = fig.add_subplot()
        if len(series) <= MAX_POINTS:
            ax.plot(series.steps, series.values, color=PALETTE[5], alpha=0.3, linewidth=0.8,
                    label="per step")
        else:
            b = buckets(series.steps, series.values, MAX_POINTS // 2)
            ax.fill_between(b.steps, b.low, b.high, color=PALETTE[5], alpha=0.2, linewidth=0,
                            label="range")
        idx = stride(len(series), MAX_POINTS)
        ax.plot(series.steps[idx], smooth(series.values)[idx], color=PALETTE[5], linewidth=2.0,
                label="moving average")
        _log_scale(ax, [series.values], min_ratio=100.0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best", ncols=2)
        _fit(fig)
        return to_svg(fig, ylabel + " over steps")


@dataclass
class Mark:
    """One marker on the timeline: a step, its row (action or event kind) and a label."""

    step: int
    kind: str


def timeline(loss: Series | None, marks: Sequence[Mark], *, salt: str) -> str:
    """The loss (top) with every guard action marked on it, and one row per kind (bottom)."""
    kinds = list(dict.fromkeys(m.kind for m in marks))
    styles = {**EVENT_STYLES, **ACTION_STYLES}
    rows = max(1, len(kinds))
    strip = 0.45 + 0.28 * rows
    legend_rows = 0
    height = (3.0 + 0.2 * math.ceil((len(kinds) + 1) / 7) if loss is not None else 0.6) + strip
    with _figure(height, salt) as fig:
        if loss is not None:
            top, bottom = fig.subplots(2, 1, sharex=True,
                                       gridspec_kw={"height_ratios": [3.0, strip]})
            draw_series(top, loss.steps, loss.values, max_points=MAX_POINTS, color="#9ca3af",
                        linewidth=0.8, label="training loss", band_alpha=0.35)
            _log_scale(top, [loss.values], min_ratio=30.0)
            for kind in kinds:
                if kind in ("skip_batch",):
                    continue
                at = np.array([m.step for m in marks if m.kind == kind], dtype=np.float64)
                if not len(loss):
                    continue
                y = np.interp(at, loss.steps, loss.values)
                marker, color = styles.get(kind, (".", "#6b7280"))
                top.scatter(at, y, marker=marker, color=color, s=90 if marker == "*" else 46,
                            zorder=4,
                            edgecolors="white", linewidths=0.5, label=text(kind))
            top.set_ylabel("training loss")
            ncols = min(7, len(kinds) + 1)
            legend_rows = math.ceil((len(kinds) + 1) / ncols)
            top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.01), ncols=ncols)
        else:
            bottom = fig.add_subplot()
        for row, kind in enumerate(kinds):
            steps_of = [m.step for m in marks if m.kind == kind]
            marker, color = styles.get(kind, (".", "#6b7280"))
            bottom.scatter(steps_of, [row] * len(steps_of), marker=marker, color=color,
                           s=80 if marker == "*" else 40, zorder=3)
        bottom.set_yticks(range(len(kinds)), [text(k) for k in kinds])
        bottom.set_ylim(-0.7, rows - 0.3)
        bottom.invert_yaxis()
        bottom.grid(axis="y", visible=False)
        bottom.set_xlabel("step")
        _fit(fig, 2 if loss is not None else 1, left=1.35, vgap=0.25,
             top=0.3 + 0.2 * legend_rows)
        return to_svg(fig, "timeline of guard actions and run events")
