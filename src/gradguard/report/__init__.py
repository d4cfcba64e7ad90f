"""gradguard.report: one self-contained HTML page about a training run.

``build_report(RUN_DIR)`` reads a run directory (the layout of
``gradguard.run.rundir``: metrics.jsonl, events.jsonl, guard.jsonl, checkpoints/,
summary.json, config.toml, env.json) and writes ``RUN_DIR/report.html``: the run's
outcome, then loss and evaluation, effective learning rate, accumulator, gradient
norm, update ratio, a timeline of guard actions and checkpoints, throughput and
the configuration. Plots are matplotlib figures inlined as SVG; the file references
nothing outside itself. ``load_run`` gives the parsed pieces. See ``docs/report.md``.
"""

from .data import Distribution, MetricIndex, ReportError, RunData, Series, load_run
from .html import SECTIONS, build_report, render_report

__all__ = [
    "SECTIONS",
    "Distribution",
    "MetricIndex",
    "ReportError",
    "RunData",
    "Series",
    "build_report",
    "load_run",
    "render_report",
]
