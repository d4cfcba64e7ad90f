"""The training loop behind ``gradguard train``: optimizer + recorder + guard + checkpointer.

One optimizer step::

    grad_accumulation x (next batch -> forward [autocast] -> loss / k -> backward)
    guard.step(loss)          (or optimizer.step() with the guard off)
    scheduler.step()          (when the step was applied)
    recorder.log(loss)        every log_every steps
    evaluate                  every eval_every steps, at each checkpoint and at the end
    checkpointer.save_async   every checkpoint.every steps (after the evaluation)

Data order is a function of (seed, epoch): epoch ``e`` visits the training
split in ``torch.randperm`` order from a generator seeded with
``seed * 1_000_003 + e``, so the data position is ``(epoch, batch)`` and a
resumed run sees exactly the batches the uninterrupted run would have.
Evaluation runs under ``torch.random.fork_rng``: it never changes what
training draws. Together with the checkpoint's RNG states, optimizer state and
the guard's history, a run resumed from a checkpoint ends with bit-identical
parameters to the run that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradguard import __version__
from gradguard.guard.audit import json_safe
from gradguard.run import rundir
from gradguard.run.config import (
    CLOSURE_CALLS_BACKWARD,
    FULL_BATCH_OPTIMIZERS,
    Config,
    ConfigError,
    dumps,
)
from gradguard.run.workload import Batch, TensorData, Workload

RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.early_stopping", "train.stop_at_target",
                     "run.output")
"""Config keys that may differ between a run and its ``--resume`` (extending a run)."""


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (exists, or does not hold this run)."""


@dataclass
class RunResult:
    """What :func:`train` did."""

    run_dir: Path
    status: str
    """``finished``, ``early_stopped``, ``target_reached``, ``converged``, ``interrupted``
    or ``halted``."""
    steps: int
    seconds: float
    final_metrics: dict[str, float]
    best: dict[str, Any]
    report: Path | None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {"interrupted": 130, "halted": 3}.get(self.status, 0)


# ============================================================== helpers
def _now() -> tuple[str, float]:
    t = time.time()
    iso = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")
    return iso.replace("+00:00", "Z"), t


class EventLog:
    """Appends run events (``events.jsonl``), one flushed line each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        iso, t = _now()
        record = {"time": iso, "wall_time": t, "step": step, "event": event, **fields}
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()


def environment(device: torch.device) -> dict[str, Any]:
    """Facts about where the run executes (env.json)."""
    env: dict[str, Any] = {
        "gradguard": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "started": _now()[0], "argv": sys.argv,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of ``epoch`` (a function of seed and epoch only)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class DataStream:
    """Mini-batches of a :class:`TensorData`, epoch after epoch, from a resumable position."""

    def __init__(self, data: TensorData, batch_size: int, seed: int, epoch: int = 0,
                 batch: int = 0) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.batch = batch
        self.batches_per_epoch = max(1, math.ceil(len(data) / batch_size))
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def next(self) -> Batch:
        if not self.data.tensors:
            return ()
        if self.batch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
        if self._order_epoch != self.epoch:
            self._order = epoch_order(self.seed, self.epoch, len(self.data))
            self._order_epoch = self.epoch
        assert self._order is not None
        start = self.batch * self.batch_size
        index = self._order[start:start + self.batch_size]
        self.batch += 1
        return self.data.batch(index)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.batch / self.batches_per_epoch


def _to(data: TensorData, device: torch.device, dtype: torch.dtype | None) -> TensorData:
    return TensorData(tuple(
        t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        for t in data.tensors))


def evaluate(workload: Workload, data: TensorData, batch_size: int,
             autocast: Callable[[], contextlib.AbstractContextManager[Any]],
             devices: list[int]) -> dict[str, float]:
    """The workload's metrics on ``data`` (chunk means weighted by chunk size)."""
    model = workload.model
    was_training = model.training
    model.eval()
    whole = bool(workload.info.get("eval_whole_split")) or not data.tensors
    totals: dict[str, float] = {}
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast():
            if whole:
                return {k: float(v) for k, v in workload.evaluate(model, data.all()).items()}
            n = len(data)
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(n, start + batch_size),
                                     device=data.tensors[0].device)
                metrics = workload.evaluate(model, data.batch(index))
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * len(index)
            return {k: v / n for k, v in totals.items()}
    finally:
        model.train(was_training)


def _is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


# ============================================================== the run
class Trainer:
    """One run of a config in a run directory. Use :func:`train`."""

    def __init__(self, config: Config, *, resume: bool = False, overwrite: bool = False,
                 console: Any = None, progress: bool | None = None,
                 on_step: Callable[[Trainer, int], None] | None = None) -> None:
        if config.run.output is None:
            raise ConfigError([("run.output", "no run directory given")])
        self.config = config
        self.run_dir = Path(config.run.output)
        self.resume = resume
        self.overwrite = overwrite
        self.console = console
        self.progress = progress
        self.on_step = on_step
        self._stop_signal: str | None = None

    # --------------------------------------------------------- directory
    def _prepare_directory(self) -> bool:
        """Create or reuse the run directory; True when there is a run to resume."""
        d = self.run_dir
        exists = d.exists() and any(d.iterdir())
        if d.exists() and not d.is_dir():
            raise RunDirectoryError(f"run directory {d} exists and is not a directory")
        if exists and self.resume:
            saved = d / rundir.CONFIG
            if saved.exists():
                from gradguard.run.config import tomllib

                old = tomllib.loads(saved.read_text(encoding="utf-8"))
                new = self.config.to_dict()
                changed = [k for k in _diff(_strip_none(old), _strip_none(new))
                           if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
                if changed:
                    raise RunDirectoryError(
                        f"--resume: the config differs from the one {d} was started with, at: "
                        f"{', '.join(changed)}. A resumed run must use the same config (only "
                        f"{', '.join(RESUMABLE_CHANGES)} may change); start a new run directory "
                        "or pass --overwrite to discard this one")
            return (d / rundir.CHECKPOINTS).exists()
        if exists and not self.overwrite:
            raise RunDirectoryError(
                f"run directory {d} exists and is not empty; nothing was written. Pass --resume to "
                "continue that run, --overwrite to replace it, or choose another run.output")
        if exists and self.overwrite:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        return False

    # --------------------------------------------------------- run
    def run(self) -> RunResult:
        from gradguard.run import workloads
        from gradguard.run.builders import build_optimizer, build_schedule, build_sinks

        cfg = self.config
        device = torch.device(cfg.run.device)
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        try:
            workload = workloads.load(cfg.workload.name, seed=cfg.run.seed,
                                      options=cfg.workload.options)
        except ValueError as exc:
            raise ConfigError([("workload", str(exc))]) from None
        dtype = torch.float64 if cfg.run.precision == "fp64" else None
        workload.model.to(device=device, dtype=dtype)
        train_data = _to(workload.train, device, dtype)
        eval_data = _to(workload.eval, device, dtype)
        optimizer = build_optimizer(cfg, workload)
        stream = DataStream(train_data, cfg.train.batch_size, cfg.run.seed)
        micro = cfg.train.grad_accumulation
        if cfg.train.steps is not None:
            total_steps = cfg.train.steps
        else:
            assert cfg.train.epochs is not None
            total_steps = max(1, math.ceil(cfg.train.epochs * stream.batches_per_epoch / micro))
        scheduler = build_schedule(cfg, optimizer, total_steps)
        eval_every = cfg.train.eval_every or max(1, total_steps // 20)
        ckpt_every = cfg.checkpoint.every or eval_every

        resumable = self._prepare_directory()
        d = self.run_dir
        (d / rundir.CONFIG).write_text(dumps(cfg.to_dict()), encoding="utf-8")
        (d / rundir.ENV).write_text(json.dumps(environment(device), indent=1), encoding="utf-8")
        events = EventLog(d / rundir.EVENTS)
        from gradguard.ckpt import Checkpointer, KeepBest

        keep_best = (KeepBest(workload.primary_metric, workload.mode, cfg.checkpoint.keep_best)
                     if cfg.checkpoint.keep_best else None)
        checkpointer = (Checkpointer(d / rundir.CHECKPOINTS, keep_last=cfg.checkpoint.keep_last,
                                     keep_every=cfg.checkpoint.keep_every, keep_best=keep_best,
                                     config=cfg.to_dict(),
                                     signing_key_file=cfg.checkpoint.signing_key_file)
                        if cfg.checkpoint.enabled else None)

        # ---- resume
        start_step = 0
        loop_state: dict[str, Any] = {}
        guard_state: dict[str, Any] | None = None
        resumed_info = None
        if self.resume and resumable and checkpointer is not None:
            resumed_info = checkpointer.latest()
            if resumed_info is not None:
                checkpointer.restore(model=workload.model, optimizer=optimizer,
                                     scheduler=scheduler, path=resumed_info.path)
                start_step = resumed_info.step
                extra = resumed_info.extra or {}
                loop_state = dict(extra.get("loop", {}))
                guard_state = extra.get("guard")
                pos = resumed_info.data_position or {}
                stream.epoch, stream.batch = int(pos.get("epoch", 0)), int(pos.get("batch", 0))

        from gradguard.watch import Recorder

        if resumed_info is not None:
            _truncate_metrics(d / rundir.METRICS, start_step)
        sinks = build_sinks(cfg, d, d / rundir.METRICS)
        embeddings = dict(workload.model.named_parameters())
        from gradguard.run.builders import embedding_names

        tables = [embeddings[n] for n in embedding_names(workload)]
        recorder = Recorder(optimizer, sinks, every=cfg.recorder.every,
                            full_every=cfg.recorder.full_every,
                            sample_size=cfg.recorder.sample_size, seed=cfg.run.seed,
                            batch_size=cfg.train.batch_size * micro, embeddings=tables,
                            start_step=start_step)
        guard = None
        if cfg.guard.enabled:
            from gradguard.guard import Guard

            guard = Guard(optimizer, guard_policy(cfg.guard.policy, workload.mode),
                          checkpointer, recorder,
                          model=workload.model, scheduler=scheduler,
                          audit=str(d / rundir.GUARD_AUDIT), start_step=start_step,
                          seed=cfg.run.seed)
            if guard_state is not None:
                guard.load_state_dict(guard_state)

        devices = ([device.index or 0] if device.type == "cuda" else [])

        def autocast() -> contextlib.AbstractContextManager[Any]:
            if cfg.run.precision == "bf16":
                return torch.autocast(device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        state = _LoopState(
            step=start_step, best=loop_state.get("best"), best_step=loop_state.get("best_step"),
            bad_evals=int(loop_state.get("bad_evals", 0)),
            samples=int(loop_state.get("samples", 0)),
            seconds=float(loop_state.get("seconds", 0.0)),
            target_step=loop_state.get("target_step"))
        ctx = _Context(self, cfg, workload, optimizer, scheduler, stream, eval_data, recorder,
                       guard, checkpointer, events, autocast, devices, total_steps, eval_every,
                       ckpt_every, state)
        events.write("start", start_step, workload=workload.name,
                     optimizer=_optimizer_name(cfg), steps=total_steps,
                     resumed_from=resumed_info.path if resumed_info else None,
                     primary_metric=workload.primary_metric, mode=workload.mode,
                     target=(None if workload.target is None else
                             {"metric": workload.target.metric, "value": workload.target.value,
                              "mode": workload.target.mode}),
                     info=json_safe({k: v for k, v in workload.info.items()
                                      if isinstance(v, int | float | str | bool)}))
        if resumed_info is not None:
            events.write("resume", start_step, path=resumed_info.path,
                         checkpoint_step=resumed_info.step)
            ctx.fidelity(resumed_info)
        elif self.resume:
            ctx.say("[yellow]--resume: no checkpoint to resume from; starting from step 0[/]")
        return ctx.loop()


@dataclass
class _LoopState:
    step: int
    best: float | None
    best_step: int | None
    bad_evals: int
    samples: int
    seconds: float
    target_step: int | None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    last_loss: float = float("nan")
    last_ckpt_step: int = -1
    status: str = "finished"
    halted: str | None = None


def guard_policy(policy: dict[str, Any], mode: str) -> dict[str, Any]:
    """The configured policy, with the evaluation detectors judging in the workload's mode.

    ``plateau`` and ``overfitting`` read the primary metric; unless the config
    says otherwise, "better" means what the workload says (accuracy: higher).
    """
    detectors = {name: dict(spec) for name, spec in policy.get("detectors", {}).items()}
    for name in ("plateau", "overfitting"):
        spec = detectors.setdefault(name, {})
        if name == "plateau" and spec.get("source") == "loss":
            continue
        spec.setdefault("mode", mode)
    return {**policy, "detectors": detectors}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records newer than the resumed step (the stopped run's lost steps come again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if int(json.loads(line)["step"]) <= step and line.endswith("\n"):
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _value(loss: Any) -> float:
    return math.nan if loss is None else float(loss)


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    return value


def _optimizer_name(cfg: Config) -> str:
    spec = cfg.optimizer
    if spec.name is not None:
        return spec.name
    assert spec.groups is not None
    return "hybrid(" + ", ".join(f"{g}={s.name}" for g, s in spec.groups.items()) + ")"


class _Context:
    """The live objects of one run and the loop over them."""

    def __init__(self, trainer: Trainer, cfg: Config, workload: Workload,
                 optimizer: torch.optim.Optimizer, scheduler: Any, stream: DataStream,
                 eval_data: TensorData, recorder: Any, guard: Any, checkpointer: Any,
                 events: EventLog, autocast: Callable[[], contextlib.AbstractContextManager[Any]],
                 devices: list[int], total_steps: int, eval_every: int, ckpt_every: int,
                 state: _LoopState) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.workload = workload
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream = stream
        self.eval_data = eval_data
        self.recorder = recorder
        self.guard = guard
        self.checkpointer = checkpointer
        self.events = events
        self.autocast = autocast
        self.devices = devices
        self.total_steps = total_steps
        self.eval_every = eval_every
        self.ckpt_every = ckpt_every
        self.state = state
        self.full_batch = workload.full_batch
        self.closure_based = (cfg.optimizer.name in FULL_BATCH_OPTIMIZERS)
        self.closure_backward = cfg.optimizer.name in CLOSURE_CALLS_BACKWARD
        self._audit_seen = len(guard.audit.records) if guard is not None else 0
        from gradguard.run.console import Progress

        self.ui = Progress(trainer.console, enabled=trainer.progress, total=total_steps,
                           start=state.step, run_dir=trainer.run_dir)

    def say(self, message: str) -> None:
        self.ui.print(message)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        metrics = evaluate(self.workload, self.eval_data, self.cfg.train.eval_batch_size,
                           self.autocast, self.devices)
        for name, mask in self.workload.slices.items():
            if not mask.any():
                continue
            index = mask.nonzero().flatten().to(self.eval_data.tensors[0].device)
            part = evaluate(self.workload, TensorData(self.eval_data.batch(index)),
                            self.cfg.train.eval_batch_size, self.autocast, self.devices)
            metrics.update({f"{name}_{k}": v for k, v in part.items()})
        seconds = time.perf_counter() - started
        self.recorder.log(step, **{f"eval_{k}": v for k, v in metrics.items()})
        self.events.write("eval", step, metrics=metrics, seconds=seconds)
        self.state.last_eval = metrics
        self.state.last_eval_step = step
        return metrics

    def fidelity(self, info: Any) -> None:
        """After a restore: evaluate again and record the delta against the saved metric."""
        primary = self.workload.primary_metric
        metrics = self.evaluate(info.step)
        before = (info.metrics or {}).get(primary)
        after = metrics.get(primary)
        if before is not None and after is not None:
            delta = float(after) - float(before)
            self.events.write("restore_fidelity", info.step, metric=primary, before=before,
                              after=after, delta=delta)
            self.recorder.log(info.step, restore_fidelity_delta=delta)
            self.say(f"resumed from step {info.step}: {primary} {before:.6g} before the save, "
                     f"{after:.6g} after the restore (delta {delta:+.3g})")

    def _judge(self, step: int, metrics: dict[str, float]) -> bool:
        """Best / target / early stopping after an evaluation; True to stop."""
        st, wl = self.state, self.workload
        value = metrics.get(wl.primary_metric)
        if value is None:
            raise ConfigError([("workload", f"{wl.name}'s evaluate() returned no "
                                f"{wl.primary_metric!r} (its primary metric); it returned "
                                f"{', '.join(metrics)}")])
        if self.guard is not None:
            self.guard.observe_eval(value, step)
        early = self.cfg.train.early_stopping
        min_delta = early.min_delta if early is not None else 0.0
        if _is_better(value, st.best, wl.mode, min_delta):
            st.best, st.best_step, st.bad_evals = value, step, 0
        else:
            st.bad_evals += 1
        if wl.target is not None and st.target_step is None and wl.target.reached(value):
            st.target_step = step
            self.events.write("target_reached", step, metric=wl.primary_metric, value=value,
                              target=wl.target.value, seconds=st.seconds)
            self.say(f"[green]target reached[/] at step {step}: {wl.primary_metric} "
                     f"{value:.6g} ({wl.target.mode} {wl.target.value:.6g})")
            if self.cfg.train.stop_at_target:
                st.status = "target_reached"
                return True
        if early is not None and st.bad_evals >= early.patience:
            self.events.write("early_stop", step, metric=wl.primary_metric, best=st.best,
                              best_step=st.best_step, patience=early.patience)
            self.say(f"early stopping at step {step}: no {wl.primary_metric} improvement for "
                     f"{st.bad_evals} evaluations (best {st.best:.6g} at step {st.best_step})")
            st.status = "early_stopped"
            return True
        return False

    # ------------------------------------------------------------ checkpoints
    def save(self, step: int, *, blocking: bool) -> None:
        if self.checkpointer is None or step == self.state.last_ckpt_step:
            return
        st = self.state
        metrics = dict(st.last_eval) if st.last_eval_step == step else {}
        kwargs = dict(
            model=self.workload.model, optimizer=self.optimizer, scheduler=self.scheduler,
            metrics=metrics, data_position={**self.stream.position(), "step": step},
            extra={"loop": {"best": st.best, "best_step": st.best_step,
                            "bad_evals": st.bad_evals, "samples": st.samples,
                            "seconds": st.seconds, "target_step": st.target_step},
                   "guard": self.guard.state_dict() if self.guard is not None else None})
        from gradguard.ckpt import CheckpointError

        self._note_async()
        try:
            if blocking or not self.cfg.checkpoint.async_save:
                self._committed(step, self.checkpointer.save(step, **kwargs), metrics)
            else:
                self.checkpointer.save_async(step, **kwargs)
                self._pending_ckpt = (step, metrics)
        except (CheckpointError, OSError) as exc:
            self._failed(step, exc)
        st.last_ckpt_step = step

    _pending_ckpt: tuple[int, dict[str, float]] | None = None
    ckpt_saved = 0
    ckpt_failed = 0

    def _note_async(self) -> None:
        """Record the previous async save once it has committed (or failed)."""
        if self._pending_ckpt is None or self.checkpointer is None:
            return
        from gradguard.ckpt import CheckpointError

        step, metrics = self._pending_ckpt
        self._pending_ckpt = None
        try:
            info = self.checkpointer.wait()
        except (CheckpointError, OSError) as exc:
            self._failed(step, exc)
            return
        if info is not None:
            self._committed(step, info, metrics)

    def _committed(self, step: int, info: Any, metrics: dict[str, float]) -> None:
        self.ckpt_saved += 1
        self.events.write("checkpoint", step, path=info.path, metrics=metrics)
        self.recorder.log(step, checkpoint_saves_total=float(self.ckpt_saved),
                          checkpoint_last_success_time=time.time(), checkpoint_step=float(step))

    def _failed(self, step: int, exc: BaseException) -> None:
        """A save that failed does not stop training: it is reported, and the next one retries."""
        self.ckpt_failed += 1
        self.events.write("checkpoint_failed", step, error=f"{type(exc).__name__}: {exc}")
        self.recorder.log(step, checkpoint_failures_total=float(self.ckpt_failed))
        self.say(f"[bold red]checkpoint of step {step} failed[/]: {type(exc).__name__}: {exc} "
                 "(training goes on; the next save tries again)")

    # ------------------------------------------------------------ one step
    def _forward_backward(self, batch: Batch, scale: float) -> torch.Tensor:
        with self.autocast():
            loss = self.workload.loss(self.workload.model, batch)
        (loss * scale).backward() if scale != 1.0 else loss.backward()
        return loss.detach()

    def _next_batch(self) -> Batch:
        while True:
            batch = self.stream.next()
            if self.guard is None or not self.guard.skip_batch():
                return batch

    def one_step(self) -> tuple[bool, float]:
        """One optimizer step; returns (applied, loss)."""
        optimizer, guard = self.optimizer, self.guard
        micro = self.cfg.train.grad_accumulation
        optimizer.zero_grad(set_to_none=True)
        if self.full_batch:
            batch = self.stream.data.all()
            self.state.samples += len(self.stream.data)

            def closure() -> torch.Tensor:
                # line search / Newton differentiate the returned loss themselves;
                # torch.optim.LBFGS reads the gradients its closure computed
                if self.closure_backward:
                    optimizer.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        return self._forward_backward(batch, 1.0)
                with self.autocast():
                    value: torch.Tensor = self.workload.loss(self.workload.model, batch)
                return value

            step_closure: Callable[[], Any] | None = closure if self.closure_based else None
            # the guard judges the gradient at the current point before the step
            loss = (self._forward_backward(batch, 1.0)
                    if guard is not None or not self.closure_based else None)
        else:
            total = torch.zeros((), device=self.stream.data.tensors[0].device
                                if self.stream.data.tensors else None)
            for _ in range(micro):
                batch = self._next_batch()
                total += self._forward_backward(batch, 1.0 / micro).float()
                self.state.samples += len(batch[0]) if batch else 0
            loss = total / micro
            step_closure = None
        if guard is not None:
            # the recorder labels records by the guard's step (which counts skipped steps
            # too, and goes back on a rollback), like the loss, evaluations and checkpoints
            self.recorder.step = guard.step_count
            result = guard.step(loss, closure=step_closure)
            applied = result.applied
            loss_value = result.loss if result.loss is not None else _value(loss)
        else:
            value = optimizer.step(step_closure) if step_closure is not None else optimizer.step()
            applied = True
            loss_value = _value(value if loss is None else loss)
        if applied and self.scheduler is not None:
            self.scheduler.step()
        return applied, loss_value

    def _report_guard_events(self) -> None:
        """Print the guard's new audit records; every action but a plain skip is an event."""
        if self.guard is None:
            return
        records = self.guard.audit.records
        for record in records[self._audit_seen:]:
            action, outcome = record.get("action"), record.get("outcome")
            if record.get("detector") == "rollback" and action == "skip_batch":
                continue
            if outcome != "alerted":  # alerts are logged by the guard itself (gradguard.guard)
                self.say(f"[bold yellow]guard[/] step {record.get('step')}: "
                         f"{record.get('detector')} -> {action} ({outcome}): "
                         f"{record.get('message', '')}")
            if action != "skip":
                self.events.write("guard", int(record.get("step") or 0), action=action,
                                  detector=record.get("detector"), outcome=outcome,
                                  message=record.get("message"))
        self._audit_seen = len(records)

    # ------------------------------------------------------------ the loop
    def loop(self) -> RunResult:
        from gradguard.guard import TrainingHalted

        st, cfg = self.state, self.cfg
        previous_handlers = self._install_signals()
        started = time.perf_counter()
        seconds_before = st.seconds
        stop = False
        try:
            with self.ui:
                while st.step < self.total_steps and not stop:
                    if self.trainer._stop_signal is not None:
                        st.status = "interrupted"
                        break
                    try:
                        _, loss = self.one_step()
                    except TrainingHalted as exc:
                        st.status, st.halted = "halted", str(exc)
                        st.step = self.guard.step_count if self.guard is not None else st.step + 1
                        self._report_guard_events()
                        self.events.write("halted", st.step, diagnosis=str(exc))
                        self.say(f"[bold red]halted[/] at step {st.step}: {exc}")
                        break
                    st.step = self.guard.step_count if self.guard is not None else st.step + 1
                    st.seconds = seconds_before + time.perf_counter() - started
                    st.last_loss = loss
                    step = st.step
                    self._report_guard_events()
                    if step % cfg.train.log_every == 0 or step == self.total_steps:
                        self.recorder.log(step, loss=loss, epoch=self.stream.epochs_done,
                                          samples_seen=float(st.samples))
                    due_ckpt = self.checkpointer is not None and step % self.ckpt_every == 0
                    if step % self.eval_every == 0 or due_ckpt or step == self.total_steps:
                        metrics = self.evaluate(step)
                        stop = self._judge(step, metrics)
                        self.ui.eval(step, self.workload.primary_metric,
                                     metrics[self.workload.primary_metric])
                    if self.closure_based:
                        diag = getattr(self.optimizer, "diagnostics", None)
                        if diag is not None:
                            self.recorder.log(step, grad_norm_fullbatch=diag.grad_norm,
                                              step_length=diag.step_length,
                                              loss_decrease=diag.loss_decrease,
                                              line_search_evals=float(diag.line_search_evals),
                                              func_evals=float(diag.func_evals))
                            if diag.done:
                                st.status = "converged" if diag.converged else "finished"
                                self.say(f"{type(self.optimizer).__name__} stopped at step "
                                         f"{step}: {diag.criterion}")
                                stop = True
                    if due_ckpt and not stop:
                        self.save(step, blocking=False)
                    self.ui.update(step, loss, self._lr(), self.recorder)
                    if self.trainer.on_step is not None:
                        self.trainer.on_step(self.trainer, step)
            return self._finish()
        finally:
            self._restore_signals(previous_handlers)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0].get("lr", math.nan))

    def _finish(self) -> RunResult:
        st, d = self.state, self.trainer.run_dir
        if st.last_eval_step != st.step and st.status != "halted":
            stopped_because = st.status
            self._judge(st.step, self.evaluate(st.step))
            if stopped_because != "finished":  # keep why the run stopped (converged, ...)
                st.status = stopped_because
        self._note_async()
        if st.status != "halted":
            self.save(st.step, blocking=True)
        if self.checkpointer is not None:
            self.checkpointer.wait()
        if st.status == "interrupted":
            self.events.write("interrupted", st.step, signal=self.trainer._stop_signal)
            self.say(f"[yellow]interrupted[/] ({self.trainer._stop_signal}) at step {st.step}: "
                     f"checkpoint saved; continue with --resume")
        wl = self.workload
        summary = {
            "status": st.status, "steps": st.step, "total_steps": self.total_steps,
            "seconds": st.seconds, "samples": st.samples, "workload": wl.name,
            "optimizer": _optimizer_name(self.cfg), "primary_metric": wl.primary_metric,
            "mode": wl.mode, "final": st.last_eval, "final_step": st.last_eval_step,
            "best": {"value": st.best, "step": st.best_step},
            "target": (None if wl.target is None else {
                "metric": wl.target.metric, "value": wl.target.value, "mode": wl.target.mode,
                "reached_step": st.target_step}),
            "last_loss": st.last_loss,
            "guard": ({"counts": self.guard.counts, "detections": self.guard.detections}
                      if self.guard is not None else None),
            "checkpoints": {"saved": self.ckpt_saved, "failed": self.ckpt_failed},
            "halted": st.halted,
            "info": json_safe({k: v for k, v in wl.info.items()
                                if isinstance(v, int | float | str | bool)}),
        }
        self.events.write("finished", st.step, status=st.status, steps=st.step, seconds=st.seconds)
        self.recorder.close()
        if self.guard is not None:
            self.guard.close()
        self.events.close()
        (d / rundir.SUMMARY).write_text(json.dumps(json_safe(summary), indent=1,
                                                   allow_nan=False), encoding="utf-8")
        report: Path | None = None
        try:
            from gradguard.report import build_report

            report = build_report(d)
        except Exception as exc:  # the run's results are saved; a report failure is reported
            self.say(f"[red]report failed[/]: {type(exc).__name__}: {exc}")
        self.ui.summary(summary, report)
        return RunResult(d, st.status, st.step, st.seconds, dict(st.last_eval),
                         {"value": st.best, "step": st.best_step}, report, summary)

    # ------------------------------------------------------------ signals
    def _install_signals(self) -> dict[int, Any]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self.trainer._stop_signal is not None:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.trainer._stop_signal = signal.Signals(signum).name
            self.say(f"[yellow]{signal.Signals(signum).name}[/]: finishing this step, saving a "
                     "checkpoint (press Ctrl-C again to abort without saving)")

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train(config: Config, *, resume: bool = False, overwrite: bool = False,
          console: Any = None, progress: bool | None = None,
          on_step: Callable[[Trainer, int], None] | None = None) -> RunResult:
    """Run ``config``: train, evaluate, checkpoint, report. See the module docstring.

    ``resume`` continues the run in ``run.output`` from its newest good
    checkpoint (or starts it when there is none); ``overwrite`` replaces an
    existing run directory. Without either, an existing non-empty run directory
    is refused (:class:`RunDirectoryError`) and nothing is written to it.
    ``progress``: None shows a live progress bar on a terminal and periodic
    lines otherwise; False prints only events and the summary.
    """
    return Trainer(config, resume=resume, overwrite=overwrite, console=console,
                   progress=progress, on_step=on_step).run()

