"""What `gradguard train` shows while it runs: a live progress bar, events, a summary table.

On a terminal: a rich progress bar with loss, learning rate, throughput and
ETA. Elsewhere (CI logs, pipes): one plain line per evaluation. Guard events
and checkpoints are printed as they happen in both cases.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any


class Progress:
    """The run's console output (a context manager around the loop)."""

    def __init__(self, console: Any, *, enabled: bool | None, total: int, start: int,
                 run_dir: Path) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(highlight=False)
        live = self.console.is_terminal if enabled is None else enabled
        self.live = bool(live) and self.console.is_terminal
        self.quiet = enabled is False
        self.total = total
        self.start_step = start
        self.run_dir = run_dir
        self._progress: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_eval = ""

    def __enter__(self) -> Progress:
        if self.live:
            from rich import progress as rp

            self._progress = rp.Progress(
                rp.TextColumn("[bold]train[/]"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn("loss {task.fields[loss]}"), rp.TextColumn("lr {task.fields[lr]}"),
                rp.TextColumn("{task.fields[speed]}"), rp.TextColumn("{task.fields[eval]}"),
                rp.TimeElapsedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total,
                                                 completed=self.start_step, loss="-", lr="-",
                                                 speed="", eval="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def print(self, message: str) -> None:
        self.console.print(message)

    def update(self, step: int, loss: float, lr: float, recorder: Any) -> None:
        if self._progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.1f} steps/s"
        if recorder.batch_size:
            speed += f" {rate * recorder.batch_size:,.0f} samples/s"
        self._progress.update(self._task, completed=step, loss=_fmt(loss), lr=_fmt(lr),
                              speed=speed, eval=self._last_eval)

    def eval(self, step: int, metric: str, value: float) -> None:
        self._last_eval = f"{metric} {_fmt(value)}"
        if self._progress is None and not self.quiet:
            elapsed = time.perf_counter() - self._t0
            done = step - self.start_step
            eta = (elapsed / done * (self.total - step)) if done > 0 else math.nan
            self.console.print(f"step {step}/{self.total}  {self._last_eval}  "
                               f"elapsed {elapsed:.1f}s  eta {eta:.0f}s")

    def summary(self, summary: dict[str, Any], report: Path | None) -> None:
        from rich.table import Table

        table = Table(title=f"run {summary['status']}: {self.run_dir}", show_header=True)
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("workload", str(summary["workload"]))
        table.add_row("optimizer", str(summary["optimizer"]))
        table.add_row("steps", f"{summary['steps']} / {summary['total_steps']}")
        table.add_row("time", f"{summary['seconds']:.1f} s")
        for key, value in summary["final"].items():
            table.add_row(f"final {key}", _fmt(value))
        best = summary["best"]
        if best["value"] is not None:
            table.add_row(f"best {summary['primary_metric']}",
                          f"{_fmt(best['value'])} (step {best['step']})")
        target = summary["target"]
        if target is not None:
            reached = target["reached_step"]
            table.add_row("target", f"{summary['primary_metric']} {target['mode']} "
                          f"{_fmt(target['value'])}: "
                          + (f"reached at step {reached}" if reached is not None
                             else "not reached"))
        guard = summary.get("guard")
        if guard and guard["counts"]:
            table.add_row("guard actions",
                          ", ".join(f"{k}={v}" for k, v in guard["counts"].items()))
        self.console.print(table)
        if report is not None:
            self.console.print(f"report: {report}")


def _fmt(value: float) -> str:
    if value is None or not isinstance(value, int | float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"
