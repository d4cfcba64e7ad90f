"""Hyperparameter sweeps with Optuna: a search-space TOML, pruning, kill-and-continue.

**The search space** is a TOML file whose tables are config key paths, each
with the distribution of that key::

    [optimizer.lr]            # a float, sampled on a log scale
    low = 1e-4
    high = 1e-1
    log = true

    [optimizer.eps]
    low = 1e-10
    high = 1e-6
    log = true

    [train.batch_size]        # ints when low and high are ints; step optional
    low = 32
    high = 256
    step = 32

    [optimizer.name]          # categorical
    choices = ["adam", "adamw"]

A table is a parameter when it has ``low``/``high`` or ``choices``; other
tables nest (``[optimizer.groups.dense.lr]``). Each trial samples every
parameter (``trial.suggest_float`` / ``suggest_int`` / ``suggest_categorical``
named by the key path), applies them to the base config as overrides and trains
it with :func:`gradguard.run.train` in ``SWEEP/trials/trial-NNNN``.

**Pruning.** The runner's ``on_step`` hook reads the run's ``events.jsonl`` as it
grows; each evaluation's primary metric is reported to the trial at its step,
and when the pruner says so the hook raises ``optuna.TrialPruned``, which ends
``train`` and marks the trial pruned (its run directory keeps what it recorded,
without a summary.json).

**Storage and continuing.** The study lives in ``SWEEP/study.db`` (SQLite, a
local file) unless ``storage`` names an Optuna RDB URL (``postgresql://...``,
``mysql://...``, ``sqlite:///...``) or a journal file (any other path:
``optuna.storages.JournalStorage``), which several machines can share. Running
the same sweep again continues it until ``trials`` trials have finished
(complete or pruned). A trial left RUNNING by a killed process is marked failed
and retried with the same parameters: the retry resumes the killed trial's run
directory from its last checkpoint. A trial counts as killed when it was
started on this host by a process that no longer exists; with an RDB storage,
Optuna's heartbeat (``heartbeat`` seconds) also fails trials whose process on
another machine stopped beating, and they are retried the same way.

**The result.** ``SWEEP/best.toml`` is the base config with the best trial's
parameters, runnable with ``gradguard train``; ``SWEEP/sweep.json`` lists every
trial.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradguard.compare.experiment import load_base, read_toml
from gradguard.compare.runs import EVENTS, number
from gradguard.guard.audit import json_safe

STUDY_DB = "study.db"
TRIALS = "trials"
BEST = "best.toml"
SWEEP_JSON = "sweep.json"
LOGS = "logs"

MAX_RETRIES = 3
"""A killed trial is retried at most this many times."""

Log = Callable[[str], None]


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad space, config, storage or study)."""


# ================================================================ the space
@dataclass(frozen=True)
class Parameter:
    """One searched config key: ``kind`` float, int or categorical, and its range or choices."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Sample this parameter for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low or 0), int(self.high or 0),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low or 0.0), float(self.high or 0.0),
                                   step=None if self.step is None else float(self.step),
                                   log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of a sweep, in file order."""

    parameters: tuple[Parameter, ...]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """``{key path: value}`` for one trial."""
        return {p.key: p.suggest(trial) for p in self.parameters}

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]


_SPEC_KEYS = {"low", "high", "log", "step", "choices", "type"}


def parse_space(data: Mapping[str, Any], source: str = "space") -> SearchSpace:
    """Validate a search-space mapping; :class:`SweepError` lists every problem by key path."""
    params: list[Parameter] = []
    problems: list[str] = []

    def walk(prefix: str, table: Mapping[str, Any]) -> None:
        if any(k in table for k in ("low", "high", "choices")):
            param = _parameter(prefix, table, problems)
            if param is not None:
                params.append(param)
            return
        if not table and prefix:
            problems.append(f"{prefix}: empty table")
        for key, value in table.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, Mapping):
                walk(path, value)
            else:
                problems.append(f"{path}: expected a table with low/high or choices, got "
                                f"{value!r}")

    walk("", data)
    if not params and not problems:
        problems.append("no parameters: add tables such as [optimizer.lr] low = 1e-4 "
                        "high = 1e-1 log = true")
    if problems:
        raise SweepError(f"invalid search space in {source}:\n  " + "\n  ".join(problems))
    return SearchSpace(tuple(params))


def _parameter(key: str, spec: Mapping[str, Any], problems: list[str]) -> Parameter | None:
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        problems.append(f"{key}: unknown field(s) {', '.join(unknown)}; allowed: low, high, "
                        "log, step, choices, type")
        return None
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) - {"choices", "type"}:
            problems.append(f"{key}: choices cannot be combined with low/high/log/step")
            return None
        if not isinstance(choices, list) or not choices:
            problems.append(f"{key}.choices: a non-empty list")
            return None
        if not all(isinstance(c, str | int | float | bool) for c in choices):
            problems.append(f"{key}.choices: strings, numbers or booleans (Optuna stores them)")
            return None
        return Parameter(key, "categorical", choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if low is None or high is None:
        problems.append(f"{key}: give both low and high")
        return None
    if isinstance(low, bool) or isinstance(high, bool) or not all(
            isinstance(v, int | float) for v in (low, high)):
        problems.append(f"{key}: low and high are numbers, got {low!r} and {high!r}")
        return None
    kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int)
                                and not isinstance(spec.get("step"), float) else "float")
    if kind not in ("int", "float"):
        problems.append(f"{key}.type: 'int' or 'float', got {kind!r}")
        return None
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        problems.append(f"{key}.log: true or false")
        return None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        problems.append(f"{key}: need low <= high (finite), got {low} and {high}")
        return None
    if log and low <= 0:
        problems.append(f"{key}: log = true needs low > 0, got {low}")
        return None
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float)
                             or step <= 0):
        problems.append(f"{key}.step: a positive number")
        return None
    if step is not None and log:
        problems.append(f"{key}: step and log = true cannot be combined (Optuna)")
        return None
    return Parameter(key, kind, low=low, high=high, log=log, step=step)


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read and validate a search-space TOML file."""
    return parse_space(read_toml(path, "search-space file", SweepError), str(path))


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The base config mapping with each ``key.path`` set to its value (a copy)."""
    data = copy.deepcopy(dict(base))
    for key, value in params.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SweepError(f"{key}: {part} is a value in the config, not a table")
            node = child
        node[parts[-1]] = value
    return data


# ================================================================ storage
def make_storage(sweep_dir: Path, storage: str | None, *, heartbeat: int | None = 60) -> Any:
    """``SWEEP/study.db`` by default; an RDB URL (``scheme://``) or a journal file path.

    RDB storages get Optuna's heartbeat (``heartbeat`` seconds, grace twice that):
    a trial whose process stopped beating is failed by the next worker that
    starts a trial, and :func:`retry_trial` queues it again.
    """
    import inspect

    import optuna

    if storage is None:
        url = f"sqlite:///{(sweep_dir / STUDY_DB).resolve()}"
    elif "://" in storage:
        url = storage
    else:
        from optuna.storages.journal import JournalFileBackend

        path = Path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if heartbeat:
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params
                    else "failed_trial_callback")
        kwargs = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat,
                  callback: retry_trial}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # sqlalchemy raises many kinds for a bad URL
        raise SweepError(f"--storage {url}: {type(exc).__name__}: {exc}") from None


def retry_trial(study: Any, trial: Any) -> bool:
    """Queue a failed trial again: same parameters, same run directory (it resumes there).

    The retry's user attribute ``retry_history`` lists the trials it retries
    (oldest first); a trial is retried at most :data:`MAX_RETRIES` times.
    Returns whether a retry was queued.
    """
    import optuna

    history = [*trial.user_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        return False
    attrs = {k: v for k, v in trial.user_attrs.items()
             if k not in ("worker", "status", "interrupted", "pruned_at_step")}
    attrs["retry_history"] = history
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params,
        distributions=trial.distributions, user_attrs=attrs))
    return True


def _process_token(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def worker_id() -> dict[str, Any]:
    """Who runs a trial: host, pid and the pid's start token (stored as a user attribute)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": _process_token(os.getpid())}


def _is_dead(worker: Any) -> bool:
    """Whether the recorded worker process is gone (only decidable on its own host)."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    token = worker.get("token")
    return token is not None and _process_token(pid) != token


def recover(study: Any, storage: Any, say: Log) -> list[int]:
    """Fail the trials a killed process left RUNNING and retry them; return their numbers.

    Trials interrupted by Ctrl-C (failed, with the ``interrupted`` attribute) that
    were not retried yet are retried too.
    """
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    recovered = []
    everything = study.get_trials(deepcopy=False)
    retried = {n for t in everything for n in t.user_attrs.get("retry_history", [])}
    for trial in everything:
        if (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")
                and trial.number not in retried and retry_trial(study, trial)):
            recovered.append(trial.number)
            say(f"trial {trial.number} was interrupted: retrying it with the same parameters")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(trial.user_attrs.get("worker")):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if retry_trial(study, storage.get_trial(trial_id)):
            recovered.append(trial.number)
        say(f"trial {trial.number} was left running by a killed process "
            f"(pid {trial.user_attrs['worker'].get('pid')}): marked failed, retrying it with the "
            "same parameters")
    return recovered


# ================================================================ the objective
class EvalReporter:
    """The ``on_step`` hook: report each new evaluation to the trial; prune when told to.

    It reads ``events.jsonl`` from where it stopped (only when the file grew),
    so a trial resumed in an existing run directory reports the evaluations of
    the earlier process too (each step once).
    """

    def __init__(self, trial: Any, run_dir: Path, metric: str, *, prune: bool = True,
                 last_step: int | None = None) -> None:
        self.trial = trial
        self.path = run_dir / EVENTS
        self.metric = metric
        self.prune = prune
        self.last_step = last_step
        self.offset = 0
        self.reported: dict[int, float] = {}

    def poll(self) -> None:
        """Read new evaluations and report them (raises ``optuna.TrialPruned``)."""
        import optuna

        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size <= self.offset:
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        new = False
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict) or event.get("event") != "eval":
                continue
            step = event.get("step")
            value = number((event.get("metrics") or {}).get(self.metric))
            if not isinstance(step, int) or value is None or step in self.reported:
                continue
            if not math.isfinite(value):
                continue
            self.trial.report(value, step)
            self.reported[step] = value
            new = True
        step = max(self.reported) if self.reported else 0
        if self.last_step is not None and step >= self.last_step:
            return  # the trial is complete: its result counts, whatever the pruner thinks
        if new and self.prune and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", step)
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} "
                                     f"{self.reported[step]:.6g}")

    def __call__(self, trainer: Any, step: int) -> None:
        self.poll()


class TrialHalted(RuntimeError):
    """The guard halted the trial's training (a diverging configuration)."""


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the study's trials, the best one and the files written."""

    sweep_dir: Path
    study_name: str
    storage: str
    direction: str
    metric: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    recovered: list[int] = field(default_factory=list)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.best is not None else 1


def _toml_value(value: Any) -> str:
    from gradguard.run import config

    return config.dumps({"v": value}).split("=", 1)[1].strip()


def run_sweep(config: str | os.PathLike[str] | Mapping[str, Any],
              space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpace, *,
              trials: int, output: str | os.PathLike[str] | None = None,
              storage: str | None = None, study_name: str | None = None,
              overrides: Sequence[str] = (), objective: str = "final",
              pruner: str = "median", seed: int | None = 0, heartbeat: int | None = 60,
              direction: str | None = None, log: Log | None = print) -> SweepResult:
    """Run (or continue) an Optuna sweep of ``config`` over ``space`` until ``trials`` finished.

    Args:
        config: the base config (TOML path or mapping).
        space: the search space (TOML path, mapping or :class:`SearchSpace`).
        trials: finished trials (complete or pruned) the study should have.
        output: the sweep directory (default ``runs/<config name>-sweep``).
        storage: None (``SWEEP/study.db``), an RDB URL, or a journal file path.
        study_name: default: the sweep directory's name.
        overrides: ``KEY.PATH=VALUE`` applied to the base config (``--set``).
        objective: ``"final"`` (the primary metric at the end) or ``"best"``.
        pruner: ``"median"`` (``MedianPruner(n_startup_trials=3)``),
            ``"hyperband"`` or ``"none"``.
        seed: the TPE sampler's seed (None: random); a continued sweep offsets it by
            the number of trials the study already holds, so it draws new points.
        heartbeat: Optuna heartbeat interval in seconds for RDB storages (None: off).
        direction: ``"minimize"``/``"maximize"`` (default: the workload's mode).
        log: where progress lines go (None: nowhere).
    """
    import optuna
    from optuna.trial import TrialState

    from gradguard.run import ConfigError, RunDirectoryError, train
    from gradguard.run import config as run_config

    say = log or (lambda message: None)
    if trials < 1:
        raise SweepError(f"--trials {trials}: at least 1")
    if objective not in ("final", "best"):
        raise SweepError(f"--objective {objective!r}: 'final' or 'best'")
    base, name = load_base(config, overrides)
    search = space if isinstance(space, SearchSpace) else (
        parse_space(space) if isinstance(space, Mapping) else load_space(space))
    sweep_dir = Path(output) if output is not None else Path("runs") / f"{name}-sweep"
    # validate the base config with the first choices, and learn the workload's direction
    probe = apply_params(base, {p.key: (p.choices[0] if p.kind == "categorical" else p.low)
                                for p in search.parameters})
    probe.setdefault("run", {})["output"] = str(sweep_dir / TRIALS / "probe")
    try:
        cfg = run_config.parse(probe, "the base config with the space's first values")
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    metric, mode = _primary(cfg)
    if direction is None:
        direction = "maximize" if mode == "max" else "minimize"
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"direction {direction!r}: 'minimize' or 'maximize'")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    store = make_storage(sweep_dir, storage, heartbeat=heartbeat)
    study_name = study_name or sweep_dir.resolve().name
    pruners: dict[str, Any] = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    if pruner not in pruners:
        raise SweepError(f"--pruner {pruner!r}: one of {', '.join(pruners)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=store, study_name=study_name,
                                    direction="maximize" if direction == "maximize" else "minimize",
                                    load_if_exists=True, pruner=pruners[pruner]())
    except ValueError as exc:
        raise SweepError(f"study {study_name}: {exc}") from None
    # A continued sweep (or a second worker) must not replay the first one's draws:
    # the sampler's seed is offset by the number of trials the study already has.
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(
        seed=None if seed is None else seed + 1_000_003 * existing)
    if study.direction.name.lower() != direction:
        raise SweepError(f"study {study_name} in this storage maximises/minimises differently "
                         f"({study.direction.name.lower()}, asked {direction}); use another "
                         "--study-name")
    recovered = recover(study, store, say)

    def objective_fn(trial: optuna.Trial) -> float:
        params = search.suggest(trial)
        run_dir = Path(trial.user_attrs.get("run_dir")
                       or sweep_dir / TRIALS / f"trial-{trial.number:04d}")
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_id())
        data = apply_params(base, params)
        data.setdefault("run", {})["output"] = str(run_dir)
        data["run"].setdefault("report", False)  # a trial's report costs more than a short trial
        cfg = run_config.parse(data, f"trial {trial.number}")
        reporter = EvalReporter(trial, run_dir, metric, prune=pruner != "none",
                                last_step=cfg.train.steps)
        say(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                  else f"{k}={v}" for k, v in params.items()))
        log_path = sweep_dir / LOGS / f"trial-{trial.number:04d}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        from rich.console import Console

        with log_path.open("a", encoding="utf-8") as fh:
            console = Console(file=fh, highlight=False, width=120, color_system=None)
            result = train(cfg, resume=True, progress=False, console=console, on_step=reporter)
        reporter.poll()
        trial.set_user_attr("status", result.status)
        if result.status == "interrupted":
            trial.set_user_attr("interrupted", True)
            raise KeyboardInterrupt
        if result.status == "halted":
            raise TrialHalted(f"the guard halted training: {result.summary.get('halted')}")
        value = (result.best.get("value") if objective == "best"
                 else result.final_metrics.get(metric))
        if value is None or not math.isfinite(float(value)):
            raise TrialHalted(f"{metric} is {value!r} at the end")
        say(f"trial {trial.number}: {objective} {metric} {float(value):.6g}")
        return float(value)

    def finished_count() -> int:
        return len(study.get_trials(deepcopy=False,
                                    states=(TrialState.COMPLETE, TrialState.PRUNED)))

    interrupted = False
    failures = 0
    while True:
        remaining = trials - finished_count()
        if remaining <= 0:
            break
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        try:
            study.optimize(objective_fn, n_trials=remaining,
                           catch=(ConfigError, RunDirectoryError, TrialHalted, ValueError,
                                  RuntimeError, FloatingPointError),
                           callbacks=[_pruned_note(say), optuna.study.MaxTrialsCallback(
                               trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: run the same command again to continue the sweep")
            break
        failures += len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
        if failures > max(3, trials):
            say(f"stopping: {failures} trials failed (see {sweep_dir / LOGS})")
            break
    return _finish(study, sweep_dir, base, metric, direction, storage, recovered, interrupted,
                   say)


def _pruned_note(say: Log) -> Callable[[Any, Any], None]:
    from optuna.trial import TrialState

    def note(study: Any, trial: Any) -> None:
        if trial.state == TrialState.PRUNED:
            say(f"trial {trial.number}: pruned at step {trial.user_attrs.get('pruned_at_step')}")
        elif trial.state == TrialState.FAIL:
            say(f"trial {trial.number}: failed ({trial.user_attrs.get('status', 'error')}; see "
                "its log)")

    return note


def _primary(cfg: Any) -> tuple[str, str]:
    """The workload's primary metric and mode (the workload is built once to ask it)."""
    from gradguard.run import workloads

    try:
        workload = workloads.load(cfg.workload.name, seed=cfg.run.seed,
                                  options=cfg.workload.options)
    except ValueError as exc:
        raise SweepError(f"workload: {exc}") from None
    return workload.primary_metric, workload.mode


def _finish(study: Any, sweep_dir: Path, base: Mapping[str, Any], metric: str, direction: str,
            storage: str | None, recovered: list[int], interrupted: bool, say: Log
            ) -> SweepResult:
    from optuna.trial import TrialState

    from gradguard.run import config as run_config

    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"), "status": t.user_attrs.get("status"),
             "pruned_at_step": t.user_attrs.get("pruned_at_step"),
             "retry_of": (t.user_attrs.get("retry_history") or [None])[0],
             "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}}
            for t in study.get_trials(deepcopy=False)]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = None
    best_path = None
    if complete:
        trial = study.best_trial
        best = {"number": trial.number, "value": trial.value, "params": trial.params,
                "run_dir": trial.user_attrs.get("run_dir")}
        data = apply_params(base, trial.params)
        data.setdefault("run", {})["output"] = str(sweep_dir / "best-run")
        run_config.parse(data, "the best config")
        header = (f"# The best configuration of sweep {study.study_name} ({sweep_dir}):\n"
                  f"# trial {trial.number}, {metric} = {trial.value:.6g} ({direction}).\n"
                  + "".join(f"# {k} = {_toml_value(v)}\n" for k, v in trial.params.items())
                  + "# Train it: gradguard train " + str(sweep_dir / BEST) + "\n\n")
        best_path = sweep_dir / BEST
        best_path.write_text(header + run_config.dumps(data), encoding="utf-8")
        say(f"best: trial {trial.number}, {metric} {trial.value:.6g}; config written to "
            f"{best_path}")
    storage_text = storage or f"sqlite:///{(sweep_dir / STUDY_DB).resolve()}"
    result = SweepResult(sweep_dir, study.study_name, storage_text, direction, metric, rows, best,
                         best_path, recovered, interrupted)
    (sweep_dir / SWEEP_JSON).write_text(json.dumps(json_safe({
        "kind": "gradguard.sweep", "schema": 1, "study": study.study_name,
        "storage": storage_text, "direction": direction, "metric": metric, "best": best,
        "best_config": str(best_path) if best_path else None, "trials": rows}), indent=1,
        allow_nan=False) + "\n", encoding="utf-8")
    return result
