"""Multi-seed comparisons: every (variant, seed) pair trained as its own run, then summarised.

A *variant* is the base config with changes: an optimizer name (``--optimizers
adam``: the ``[optimizer]`` table becomes ``{name = "adam"}``, the optimizer's
default hyperparameters; the base config's own table is kept when it already
names that optimizer) and/or config overrides (``--variant fast:optimizer.lr=0.01``,
repeatable; overrides of a name given in ``--optimizers`` apply on top of it).
Each (variant, seed) pair is a run directory ``OUTPUT/runs/VARIANT/seed-N``
trained by :func:`gradguard.run.train` in a worker process
(``python -m gradguard.compare._worker``), several at a time when the machine
has the cores. A compare is resumable: a run whose
``summary.json`` says it is done and whose config is the planned one is reused,
any other is continued with ``train(resume=True)`` (exact resume from its newest
checkpoint, or a fresh start when it has none).

The summary (:func:`summarize`) is computed from the run directories alone
(:mod:`gradguard.compare.runs`), written to ``OUTPUT/summary.json`` and
``OUTPUT/report.html``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from gradguard.compare import stats
from gradguard.compare.runs import CONFIG, RunOutcome, read_run, read_summary
from gradguard.guard.audit import json_safe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PLAN = "compare.json"
SUMMARY = "summary.json"
REPORT = "report.html"
RUNS = "runs"
LOGS = "logs"

EXTENDABLE = ("train.steps", "train.epochs", "train.early_stopping", "train.stop_at_target")
"""Config keys a finished run may be extended by (the runner's ``--resume`` allows them)."""

INTERRUPT_GRACE = 10.0
"""Seconds the workers get to stop on their own after Ctrl-C before they are sent SIGTERM."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")

Log = Callable[[str], None]


class CompareError(ValueError):
    """A comparison that cannot run as asked (bad config, variant, seeds, or output directory)."""


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: an optimizer name and/or config overrides on the base config."""

    name: str
    optimizer: str | None = None
    overrides: tuple[str, ...] = ()

    def apply(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The base config mapping with this variant's changes (a copy)."""
        from gradguard.run import config

        data = copy.deepcopy(dict(base))
        if self.optimizer is not None:
            current = data.get("optimizer")
            same = (isinstance(current, dict) and current.get("name") == self.optimizer
                    and "groups" not in current)
            data["optimizer"] = dict(current) if same and current else {"name": self.optimizer}
        return config.apply_overrides(data, list(self.overrides))


def parse_variants(optimizers: str | Sequence[str] | None = None,
                   variants: Sequence[str] = ()) -> list[Variant]:
    """Variants from ``--optimizers a,b`` and ``--variant NAME:KEY=VALUE`` options.

    A ``--variant`` whose NAME is one of the optimizers adds its override to that
    optimizer's variant; other names make new variants (in order of appearance).
    """
    if isinstance(optimizers, str):
        optimizers = [o for o in optimizers.split(",")]
    names = [o.strip() for o in optimizers or ()]
    found: dict[str, Variant] = {}
    for name in names:
        if not name:
            raise CompareError("--optimizers: an empty name (write them comma-separated, e.g. "
                               "adagrad,adam,sgd)")
        if name in found:
            raise CompareError(f"--optimizers: {name!r} is given twice")
        found[name] = Variant(name, optimizer=name)
    for item in variants:
        name, sep, override = item.partition(":")
        name = name.strip()
        if not sep or not name or "=" not in override:
            raise CompareError(f"--variant {item!r}: write NAME:KEY.PATH=VALUE, e.g. "
                               "fast:optimizer.lr=0.01")
        old = found.get(name, Variant(name))
        found[name] = Variant(name, old.optimizer, (*old.overrides, override.strip()))
    for name in found:
        if not _NAME.match(name):
            raise CompareError(f"variant name {name!r}: use letters, digits and _ . + = - "
                               "(it names a directory)")
    return list(found.values())


def parse_seeds(seeds: int | str | Sequence[int], base_seed: int = 0) -> list[int]:
    """``5`` -> five seeds from the config's ``run.seed``; ``"0,3,7"`` or a list -> those."""
    if isinstance(seeds, str):
        text = seeds.strip()
        if "," not in text:
            try:
                seeds = int(text)
            except ValueError:
                raise CompareError(f"--seeds {seeds!r}: a count (5) or a comma-separated "
                                   "list of seeds (0,3,7)") from None
        else:
            try:
                seeds = [int(s) for s in text.split(",") if s.strip()]
            except ValueError:
                raise CompareError(f"--seeds {seeds!r}: seeds are integers >= 0") from None
    if isinstance(seeds, int):
        if seeds < 1:
            raise CompareError(f"--seeds {seeds}: at least one seed")
        return [base_seed + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out or any(s < 0 for s in out) or len(set(out)) != len(out):
        raise CompareError(f"seeds {out}: distinct integers >= 0, at least one")
    return out


def load_base(source: str | os.PathLike[str] | Mapping[str, Any],
              overrides: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The base config mapping (TOML file or mapping) with ``--set`` overrides, and its name."""
    from gradguard.run import ConfigError, config

    if isinstance(source, Mapping):
        data, name = copy.deepcopy(dict(source)), "config"
    else:
        data, name = read_toml(source, "config file"), Path(source).stem
    try:
        return config.apply_overrides(data, list(overrides)), name
    except ConfigError as exc:
        raise CompareError(str(exc)) from None


def read_toml(path: str | os.PathLike[str], what: str,
              error: type[ValueError] = CompareError) -> dict[str, Any]:
    """The TOML file ``path`` as a mapping; a missing file or bad TOML raises ``error``
    naming the file (``what`` says which file: "config file", "search-space file")."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"no such {what}: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{p}: not valid TOML: {exc}") from None


@dataclass
class RunSpec:
    """One planned run: variant, seed, run directory and its full config mapping."""

    variant: str
    seed: int
    run_dir: Path
    data: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


def plan(base: Mapping[str, Any], variants: Sequence[Variant], seeds: Sequence[int],
         output: Path) -> list[RunSpec]:
    """Every (variant, seed) run, each config validated (all problems raised together)."""
    from gradguard.run import ConfigError, config

    specs, problems = [], []
    for variant in variants:
        try:
            data = variant.apply(base)
        except ConfigError as exc:
            problems.append(f"variant {variant.name}: {exc}")
            continue
        for seed in seeds:
            run_dir = output / RUNS / variant.name / f"seed-{seed}"
            item = copy.deepcopy(data)
            run = item.setdefault("run", {})
            if not isinstance(run, dict):
                problems.append(f"variant {variant.name}: [run] is not a table")
                break
            run["seed"] = seed
            run["output"] = str(run_dir)
            try:
                config.parse(item, f"variant {variant.name}")
            except ConfigError as exc:
                problems.append(str(exc))
                break
            specs.append(RunSpec(variant.name, seed, run_dir, item))
    if problems:
        raise CompareError("\n".join(problems))
    return specs


def optimizer_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """An ``[optimizer]`` table with every hyperparameter resolved (given value or default)."""
    from gradguard.run import config

    def one(spec: Mapping[str, Any]) -> dict[str, Any]:
        name = spec.get("name")
        out: dict[str, Any] = {"name": name}
        try:
            cls = config.optimizer_class(str(name))
            params = inspect.signature(cls).parameters
            defaults = {k: p.default for k, p in params.items()
                        if k not in ("params", "impl") and p.default is not inspect.Parameter.empty}
        except (ValueError, KeyError, TypeError):
            defaults = {}
        given = {k: v for k, v in spec.items() if k != "name"}
        for key, value in {**defaults, **given}.items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    if isinstance(section.get("groups"), Mapping):
        return {"groups": {g: {"params": s.get("params"), **one(s)}
                           for g, s in section["groups"].items()}}
    return one(section)


# ================================================================== execution
def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return [_strip(v) for v in value]
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def run_state(spec: RunSpec) -> str:
    """``"done"`` (reuse), ``"resume"`` (continue or start) for a planned run.

    Raises :class:`CompareError` when the directory holds a run of another config
    (beyond the keys a finished run may be extended by).
    """
    from gradguard.run import config

    saved = spec.run_dir / CONFIG
    if not saved.is_file():
        return "resume"
    try:
        old = _strip(tomllib.loads(saved.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError):
        raise CompareError(f"{saved}: unreadable config of an earlier run; remove that run "
                           "directory or pass --overwrite") from None
    new = _strip(config.parse(spec.data).to_dict())
    changed = [k for k in _differences(old, new) if k != "run.output"]
    blocking = [k for k in changed if not any(k == e or k.startswith(e + ".") for e in EXTENDABLE)]
    if blocking:
        raise CompareError(f"{spec.run_dir} holds a run of a different config (differs at "
                           f"{', '.join(blocking)}); pass --overwrite to redo the comparison or "
                           "choose another --output")
    summary = read_summary(spec.run_dir)
    if summary is not None and not changed and summary.get("status") != "interrupted":
        return "done"
    return "resume"


def execute(task: dict[str, Any]) -> dict[str, Any]:
    """Train one planned run (in a worker process or in-process); never raises."""
    started = time.perf_counter()
    out = {"variant": task["variant"], "seed": task["seed"], "status": "failed",
           "error": None, "seconds": 0.0}
    try:
        from rich.console import Console

        from gradguard.run import config, train

        if task.get("threads"):
            import torch

            torch.set_num_threads(int(task["threads"]))
        cfg = config.parse(task["data"])
        Path(task["log"]).parent.mkdir(parents=True, exist_ok=True)
        with open(task["log"], "a", encoding="utf-8") as fh:
            console = Console(file=fh, highlight=False, width=120, force_terminal=False,
                              color_system=None)
            result = train(cfg, resume=True, progress=False, console=console)
        out["status"] = result.status
    except Exception as exc:  # reported per run; the others go on
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = time.perf_counter() - started
    return out


@dataclass
class CompareResult:
    """What :func:`run_compare` did: the summary and where things were written."""

    output: Path
    summary: dict[str, Any]
    report: Path | None
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 all runs done, 1 some run failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


def default_workers(pending: int) -> int:
    """One worker per core, no more than there are runs to do."""
    return max(1, min(os.cpu_count() or 1, pending))


def run_compare(config: str | os.PathLike[str] | Mapping[str, Any], *,
                optimizers: str | Sequence[str] | None = None, variants: Sequence[str] = (),
                seeds: int | str | Sequence[int] = 3, output: str | os.PathLike[str] | None = None,
                workers: int | None = None, target: float | None = None,
                overrides: Sequence[str] = (), overwrite: bool = False,
                log: Log | None = print) -> CompareResult:
    """Run (or resume) a comparison and write its summary and report.

    Args:
        config: the base config (TOML path or mapping).
        optimizers: optimizer names (``"adagrad,adam"`` or a list), one variant each.
        variants: ``"NAME:KEY.PATH=VALUE"`` overrides (see the module docstring).
        seeds: a count (seeds ``run.seed``, ``run.seed + 1``, ...) or the seeds.
        output: the compare directory (default ``runs/<config name>-compare``).
        workers: worker processes (default: one per core, at most one per pending
            run); 1 trains in this process. A run whose config sets no
            ``run.threads`` gets ``cores // workers`` torch threads.
        target: the primary metric's target for time-to-target (default: the
            workload's documented target).
        overrides: ``KEY.PATH=VALUE`` applied to the base config (``--set``).
        overwrite: delete the compare directory first (else it is resumed).
        log: where progress lines go (None: nowhere).

    Raises:
        CompareError: bad input; nothing is trained.
    """
    say = log or (lambda message: None)
    base, name = load_base(config, overrides)
    found = parse_variants(optimizers, variants)
    if not found:
        section = base.get("optimizer")
        found = [Variant(str(section.get("name") or "base")
                         if isinstance(section, dict) else "base")]
    base_seed = base.get("run", {}).get("seed", 0) if isinstance(base.get("run"), dict) else 0
    seed_list = parse_seeds(seeds, int(base_seed or 0))
    out = Path(output) if output is not None else Path("runs") / f"{name}-compare"
    if target is not None and not math.isfinite(float(target)):
        raise CompareError(f"--target {target}: a finite number")
    specs = plan(base, found, seed_list, out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    states = {spec.label: run_state(spec) for spec in specs}
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, name, base, found, seed_list, specs, target)

    result = CompareResult(out, {}, None)
    pending = [s for s in specs if states[s.label] != "done"]
    result.reused = [s.label for s in specs if states[s.label] == "done"]
    if result.reused:
        say(f"reusing {len(result.reused)} finished run(s) of {len(specs)}")
    n_workers = default_workers(len(pending)) if workers is None else max(1, int(workers))
    n_workers = min(n_workers, max(1, len(pending)))
    cores = os.cpu_count() or 1
    tasks = []
    for spec in pending:
        run = spec.data.get("run", {})
        threads = (None if run.get("threads") is not None or n_workers == 1
                   else max(1, cores // n_workers))
        tasks.append({"variant": spec.variant, "seed": spec.seed, "data": spec.data,
                      "threads": threads,
                      "log": str(out / LOGS / f"{spec.variant}-seed-{spec.seed}.log")})
    if tasks:
        say(f"training {len(tasks)} run(s) with {n_workers} worker(s); logs in {out / LOGS}")
    done = len(result.reused)

    def finished(outcome: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        label = f"{outcome['variant']} seed {outcome['seed']}"
        if outcome["error"] is not None:
            result.failed[label] = outcome["error"]
            say(f"[{done}/{len(specs)}] {label}: FAILED {outcome['error']}")
            return
        if outcome["status"] == "interrupted":
            result.interrupted = True
        else:
            result.ran.append(label)
        say(f"[{done}/{len(specs)}] {label}: {outcome['status']} ({outcome['seconds']:.1f} s)")

    if n_workers == 1:
        for task in tasks:
            finished(execute(task))
            if result.interrupted:
                break
    elif tasks:
        _run_pool(tasks, n_workers, finished, result, say, out / LOGS)
    if result.interrupted:
        say(f"interrupted: run the same command again to continue ({out})")
    result.summary = summarize(out)
    (out / SUMMARY).write_text(json.dumps(json_safe(result.summary), indent=1, allow_nan=False)
                               + "\n", encoding="utf-8")
    from gradguard.compare.report import write_report

    result.report = write_report(out, result.summary)
    return result


class _Workers:
    """``n`` worker processes (``python -m gradguard.compare._worker``), one task each at a time.

    Subprocesses rather than ``multiprocessing``: the caller's ``__main__`` is not
    re-imported, so scripts and notebooks need no ``__main__`` guard. Workers
    share this process's process group (Ctrl-C reaches them; the runner stops
    cleanly); SIGTERM to this process is forwarded to them.
    """

    def __init__(self, n: int, log_dir: Path) -> None:
        import selectors
        import subprocess

        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[str]] = []
        self.selector = selectors.DefaultSelector()
        self.busy: dict[int, dict[str, Any]] = {}
        self.idle: list[int] = []
        for i in range(n):
            with (log_dir / f"worker-{i}.err").open("a", encoding="utf-8") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gradguard.compare._worker"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
            self.procs.append(proc)
            self.selector.register(proc.stdout, selectors.EVENT_READ, i)  # type: ignore[arg-type]
            self.idle.append(i)

    def run(self, queue: list[dict[str, Any]], finished: Callable[[dict[str, Any]], None],
            stop: Callable[[], bool]) -> None:
        """Hand out ``queue`` (popped as it goes) until it and the busy workers are done."""
        while queue or self.busy:
            while self.idle and queue and not stop():
                i = self.idle.pop()
                task = queue.pop(0)
                stdin = self.procs[i].stdin
                try:
                    assert stdin is not None
                    stdin.write(json.dumps(task) + "\n")
                    stdin.flush()
                except (OSError, AssertionError):
                    finished(_failure(task, f"worker {i} is gone (exit status "
                                      f"{self.procs[i].poll()})"))
                    continue
                self.busy[i] = task
            if not self.busy:
                return
            self._collect(self.selector.select(), finished)

    def drain(self, finished: Callable[[dict[str, Any]], None], grace: float) -> None:
        """After an interrupt: wait for the busy workers; SIGTERM those still busy after ``grace``.

        A Ctrl-C on the terminal reaches the workers too (one process group) and
        the runner stops at a checkpoint; a second signal would make it abort,
        so the workers are signalled only if they did not stop on their own.
        """
        import signal
        import time

        deadline = time.monotonic() + grace
        signalled = False
        while self.busy:
            timeout = None if signalled else max(0.0, deadline - time.monotonic())
            events = self.selector.select(timeout)
            if not events and not signalled:
                self.signal(signal.SIGTERM)
                signalled = True
            self._collect(events, finished)

    def _collect(self, events: list[Any], finished: Callable[[dict[str, Any]], None]) -> None:
        for key, _ in events:
            i = int(key.data)
            stdout = self.procs[i].stdout
            line = stdout.readline() if stdout is not None else ""
            running = self.busy.pop(i) if i in self.busy else None
            if line:
                finished(json.loads(line))
                self.idle.append(i)
                continue
            self.selector.unregister(key.fileobj)
            if running is not None:
                finished(_failure(running, f"the worker process died (exit status "
                                  f"{self.procs[i].wait()}); see worker-{i}.err in the logs"))

    def signal(self, signum: int) -> None:
        for i in self.busy:
            if self.procs[i].poll() is None:
                self.procs[i].send_signal(signum)

    def close(self) -> None:
        import contextlib

        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except Exception:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.selector.close()


def _failure(task: dict[str, Any], error: str) -> dict[str, Any]:
    return {"variant": task["variant"], "seed": task["seed"], "status": "failed",
            "error": error, "seconds": 0.0}


def _run_pool(tasks: list[dict[str, Any]], n_workers: int,
              finished: Callable[[dict[str, Any]], None], result: CompareResult,
              say: Log, log_dir: Path) -> None:
    import signal
    import threading

    on_main = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if on_main:
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}
    workers = _Workers(n_workers, log_dir)
    queue = list(tasks)
    try:
        try:
            workers.run(queue, finished, lambda: result.interrupted)
        except KeyboardInterrupt:
            result.interrupted = True
            say("interrupted: the running runs save a checkpoint and stop; waiting for them")
            if on_main:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            workers.drain(finished, grace=INTERRUPT_GRACE)
    finally:
        workers.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _write_plan(out: Path, name: str, base: Mapping[str, Any], variants: Sequence[Variant],
                seeds: Sequence[int], specs: Sequence[RunSpec], target: float | None) -> None:
    first = {s.variant: s for s in specs}
    plan_data = {
        "schema": 1, "config": name, "base": base, "seeds": list(seeds), "target": target,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "variants": [{"name": v.name, "optimizer": v.optimizer, "overrides": list(v.overrides),
                      "optimizer_settings": optimizer_settings(
                          first[v.name].data.get("optimizer", {}))} for v in variants],
        "runs": [{"variant": s.variant, "seed": s.seed,
                  "run_dir": str(Path(RUNS) / s.variant / f"seed-{s.seed}")} for s in specs],
    }
    (out / PLAN).write_text(json.dumps(json_safe(plan_data), indent=1, allow_nan=False) + "\n",
                            encoding="utf-8")


# ================================================================== summary
def read_plan(output: str | os.PathLike[str]) -> dict[str, Any]:
    """The plan a compare directory was run with (``compare.json``)."""
    path = Path(output) / PLAN
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: not found; is {output} a compare directory?") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON: {exc}") from None
    return dict(data)


def _median_with_misses(values: Sequence[float | None]) -> float | None:
    """The median where a run that never reached the target counts as infinitely late."""
    if not values:
        return None
    median = float(np.median([math.inf if v is None else float(v) for v in values]))
    return median if math.isfinite(median) else None


def _per_variant(outcomes: list[RunOutcome], all_outcomes: list[RunOutcome]) -> dict[str, Any]:
    steps = [o.target_step for o in outcomes]
    seconds = [o.target_seconds for o in outcomes]
    reached = [o for o in outcomes if o.target_step is not None]
    return {
        "runs": len(all_outcomes),
        "complete": len(outcomes),
        "incomplete": [{"run_dir": str(o.run_dir), "status": o.status}
                       for o in all_outcomes if o not in outcomes],
        "final": stats.describe([o.final for o in outcomes]),
        "best": stats.describe([o.best for o in outcomes]),
        "train_loss": stats.describe([o.train_loss for o in outcomes]),
        "time_to_target": {
            "target": outcomes[0].target if outcomes else None,
            "reached": len(reached), "runs": len(outcomes),
            "not_reached": [str(o.run_dir) for o in outcomes if o.target_step is None],
            "steps": {**stats.describe([float(s) for s in steps if s is not None]),
                      "per_run": steps, "median": _median_with_misses(
                          [None if s is None else float(s) for s in steps])},
            "seconds": {**stats.describe([s for s in seconds if s is not None]),
                        "per_run": seconds, "median": _median_with_misses(seconds)},
        },
        "stability": {
            "skipped_steps": {"total": sum(o.skipped_steps for o in outcomes),
                              "per_run": [o.skipped_steps for o in outcomes]},
            "rollbacks": {"total": sum(o.rollbacks for o in outcomes),
                          "per_run": [o.rollbacks for o in outcomes]},
            "halted": sum(1 for o in outcomes if o.status == "halted"),
        },
        "cost": {
            "compute_seconds": stats.describe([o.compute_seconds for o in outcomes]),
            "train_seconds": stats.describe([o.train_seconds for o in outcomes]),
            "seconds_per_unit": stats.describe([o.seconds_per_unit for o in outcomes]),
            "no_improvement": sum(1 for o in outcomes if o.seconds_per_unit is None),
        },
    }


def summarize(output: str | os.PathLike[str]) -> dict[str, Any]:
    """The comparison's summary, computed from its run directories (see docs/compare.md)."""
    out = Path(output)
    plan_data = read_plan(out)
    target = plan_data.get("target")
    runs = plan_data.get("runs", [])
    outcomes: dict[str, list[RunOutcome]] = {v["name"]: [] for v in plan_data["variants"]}
    seeds_of: dict[str, list[int]] = {name: [] for name in outcomes}
    by_run: dict[tuple[str, int], RunOutcome] = {}
    for item in runs:
        outcome = read_run(out / item["run_dir"], target=target)
        outcomes[item["variant"]].append(outcome)
        seeds_of[item["variant"]].append(int(item["seed"]))
        by_run[item["variant"], int(item["seed"])] = outcome
    known = [o for group in outcomes.values() for o in group if o.primary]
    primary = known[0].primary if known else None
    mode: stats.Mode = "max" if known and known[0].mode == "max" else "min"
    if any(o.primary != primary or o.mode != mode for o in known):
        raise CompareError("the runs disagree on the primary metric or its direction: "
                           + ", ".join(sorted({f"{o.primary} ({o.mode})" for o in known})))
    if target is None:
        targets = {o.target for o in known}
        target = targets.pop() if len(targets) == 1 else None
    complete = {name: [o for o in group if o.complete and o.final is not None]
                for name, group in outcomes.items()}
    per_variant = {name: {**_per_variant(complete[name], outcomes[name]),
                          "seeds": seeds_of[name]} for name in outcomes}
    metric = primary or "metric"
    seed_of = {id(o): seed for (_, seed), o in by_run.items()}
    complete_seeds = {n: [seed_of[id(o)] for o in complete[n]] for n in outcomes}
    pairwise = {
        "final": stats.compare_all({n: [o.final for o in complete[n]] for n in outcomes},
                                   metric=f"final {metric}", mode=mode, seeds=complete_seeds),
        "best": stats.compare_all({n: [o.best for o in complete[n]] for n in outcomes},
                                  metric=f"best {metric}", mode=mode, seeds=complete_seeds),
        "train_loss": stats.compare_all({n: [o.train_loss for o in complete[n]]
                                         for n in outcomes}, metric="final training loss",
                                        mode="min", seeds=complete_seeds),
    }
    ranked = sorted((n for n in outcomes if per_variant[n]["final"]["mean"] is not None),
                    key=lambda n: per_variant[n]["final"]["mean"], reverse=(mode == "max"))
    return {
        "schema": 1,
        "kind": "gradguard.compare",
        "output": str(out),
        "config": plan_data.get("config"),
        "workload": _workload_of(out, known),
        "primary_metric": primary,
        "mode": mode,
        "target": target,
        "seeds": plan_data.get("seeds"),
        "variants": {v["name"]: {"optimizer": v.get("optimizer"), "overrides": v["overrides"],
                                 "optimizer_settings": v.get("optimizer_settings")}
                     for v in plan_data["variants"]},
        "results": per_variant,
        "ranking": ranked,
        "pairwise": pairwise,
        "runs": [{"variant": item["variant"], "seed": item["seed"],
                  **by_run[item["variant"], int(item["seed"])].to_dict()} for item in runs],
        "alpha": stats.ALPHA,
    }


def _workload_of(out: Path, outcomes: list[RunOutcome]) -> str | None:
    for o in outcomes:
        summary = read_summary(o.run_dir)
        if summary and summary.get("workload"):
            return str(summary["workload"])
    return None
