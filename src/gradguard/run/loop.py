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

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs on every rank with
:class:`gradguard.dist.DataParallel`: the model is wrapped in
``DistributedDataParallel``, each rank takes its shard (``index[rank::world]``)
of every global batch of ``batch_size x world`` samples (so the position is
still ``(epoch, batch)``, the same on every rank), one all-gather per step
agrees on the global loss, non-finite ranks and stop requests, the replicas are
compared every ``dist.check_every`` steps, evaluation runs on rank 0 and its
metrics are broadcast, and only rank 0 writes the run directory. See
docs/distributed.md.
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
                     "run.output", "dist.zero", "dist.check_every", "dist.on_mismatch",
                     "dist.spread_every", "dist.timeout", "dist.backend", "dist.bucket_cap_mb",
                     "dist.find_unused_parameters")
"""Config keys that may differ between a run and its ``--resume`` (extending a run; the
``dist`` keys: resuming with or without sharded optimizer state, other checks). Besides these,
``train.batch_size`` may change when the world size changes so that the global batch
(``batch_size x world size``) stays the same."""


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

    def __init__(self, path: Path | None) -> None:
        self.path = path
        """None: records are returned, not written (the other ranks of a distributed run)."""
        self._file = path.open("a", encoding="utf-8") if path is not None else None

    def write(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        iso, t = _now()
        record = {"time": iso, "wall_time": t, "step": step, "event": event, **fields}
        if self._file is not None:
            self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def environment(device: torch.device, dist: dict[str, Any] | None = None) -> dict[str, Any]:
    """Facts about where the run executes (env.json); ``dist``: the data-parallel job's."""
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
    env["world_size"] = int(dist["world_size"]) if dist else 1
    if dist:
        env["dist"] = dist
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
    """Mini-batches of a :class:`TensorData`, epoch after epoch, from a resumable position.

    With ``world_size`` > 1 (data-parallel), a step's global batch is the next
    ``batch_size * world_size`` samples of the epoch's order and this rank takes
    its shard ``index[rank::world_size]`` (as ``DistributedSampler`` strides), so
    the union of the ranks' shards is the batch a single process with the global
    batch size would take, and the position ``(epoch, batch)`` counts global
    batches: the same on every rank, and valid for any world size with the same
    global batch. :attr:`weight` is the last shard's share of the global batch
    times the world size (1 unless the epoch's last batch does not split evenly):
    scaling each rank's mean loss by it makes DDP's gradient average the global
    batch's mean gradient. A rank whose shard of a short last batch would be
    empty takes one sample with weight 0.
    """

    def __init__(self, data: TensorData, batch_size: int, seed: int, epoch: int = 0,
                 batch: int = 0, *, rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.batch = batch
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = max(1, math.ceil(len(data) / self.global_batch))
        self.weight = 1.0
        """The last shard's loss weight (see the class docstring)."""
        self.last_global_size = 0
        """Samples in the last global batch (all ranks together)."""
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
        start = self.batch * self.global_batch
        index = self._order[start:start + self.global_batch]
        self.batch += 1
        self.last_global_size = len(index)
        if self.world_size > 1:
            shard = index[self.rank::self.world_size]
            if len(shard) == 0:
                shard, self.weight = index[:1], 0.0
            else:
                self.weight = len(shard) * self.world_size / len(index)
            index = shard
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
    def _prepare_directory(self, world_size: int = 1) -> bool:
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
                old.setdefault("dist", new["dist"])  # a run started before [dist] existed
                changed = [k for k in _diff(_strip_none(old), _strip_none(new))
                           if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
                if "train.batch_size" in changed:
                    # another world size with the same global batch: the data position holds
                    old_world = _saved_world_size(d)
                    if (old.get("train", {}).get("batch_size", 0) * old_world
                            == self.config.train.batch_size * world_size):
                        changed.remove("train.batch_size")
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
        """Train (on this rank when ``torchrun`` started a data-parallel job); see :func:`train`."""
        from gradguard.dist import env as dist_env

        cfg = self.config
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        try:
            denv = dist_env.setup(cfg.run.device, cfg.dist.backend, cfg.dist.timeout)
        except dist_env.DistributedSetupError as exc:
            raise ConfigError([("dist", str(exc))]) from None
        try:
            return self._run(denv)
        finally:
            dist_env.teardown(denv)

    def _run(self, denv: Any) -> RunResult:
        from gradguard.run import workloads
        from gradguard.run.builders import build_optimizer, build_schedule, build_sinks

        cfg = self.config
        device = denv.device if denv is not None else torch.device(cfg.run.device)
        world = denv.world_size if denv is not None else 1
        rank0 = denv is None or denv.is_rank0
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        try:
            workload = workloads.load(cfg.workload.name, seed=cfg.run.seed,
                                      options=cfg.workload.options)
        except ValueError as exc:
            raise ConfigError([("workload", str(exc))]) from None
        if denv is not None:
            _refuse_data_parallel(cfg, workload)
        dtype = torch.float64 if cfg.run.precision == "fp64" else None
        workload.model.to(device=device, dtype=dtype)
        train_data = _to(workload.train, device, dtype)
        eval_data = _to(workload.eval, device, dtype)
        optimizer = build_optimizer(cfg, workload, zero=denv is not None and cfg.dist.zero)
        parallel = _data_parallel(cfg, denv, workload, optimizer) if denv is not None else None
        stream = DataStream(train_data, cfg.train.batch_size, cfg.run.seed,
                            rank=denv.rank if denv is not None else 0, world_size=world)
        micro = cfg.train.grad_accumulation
        if cfg.train.steps is not None:
            total_steps = cfg.train.steps
        else:
            assert cfg.train.epochs is not None
            total_steps = max(1, math.ceil(cfg.train.epochs * stream.batches_per_epoch / micro))
        scheduler = build_schedule(cfg, optimizer, total_steps)
        eval_every = cfg.train.eval_every or max(1, total_steps // 20)
        ckpt_every = cfg.checkpoint.every or eval_every

        # ---- the run directory: rank 0 prepares and writes it; the others learn the outcome
        resumable, refused = False, None
        if rank0:
            try:
                resumable = self._prepare_directory(world)
            except RunDirectoryError as exc:
                refused = str(exc)
        if parallel is not None:
            from gradguard.dist.collectives import broadcast_object

            refused, resumable = broadcast_object((refused, resumable), device=denv.comm_device)
        if refused is not None:
            raise RunDirectoryError(refused)
        d = self.run_dir
        dist_facts = parallel.describe() if parallel is not None else None
        if rank0:
            (d / rundir.CONFIG).write_text(dumps(cfg.to_dict()), encoding="utf-8")
            (d / rundir.ENV).write_text(json.dumps(environment(device, dist_facts), indent=1),
                                        encoding="utf-8")
        events = EventLog(d / rundir.EVENTS if rank0 else None)
        from gradguard.ckpt import Checkpointer, KeepBest

        keep_best = (KeepBest(workload.primary_metric, workload.mode, cfg.checkpoint.keep_best)
                     if cfg.checkpoint.keep_best else None)
        checkpointer = (Checkpointer(d / rundir.CHECKPOINTS, keep_last=cfg.checkpoint.keep_last,
                                     keep_every=cfg.checkpoint.keep_every, keep_best=keep_best,
                                     config=cfg.to_dict(),
                                     signing_key_file=cfg.checkpoint.signing_key_file)
                        if cfg.checkpoint.enabled and rank0 else None)
        ckpt_optimizer = (parallel.checkpoint_optimizer(optimizer) if parallel is not None
                          else optimizer)

        # ---- resume (rank 0 restores; the others receive its state)
        start_step = 0
        loop_state: dict[str, Any] = {}
        guard_state: dict[str, Any] | None = None
        resumed_info: Any = None
        if self.resume and resumable and cfg.checkpoint.enabled:
            if checkpointer is not None:
                resumed_info = checkpointer.latest()
                if resumed_info is not None:
                    checkpointer.restore(model=workload.model, optimizer=ckpt_optimizer,
                                         scheduler=scheduler, path=resumed_info.path)
            if parallel is not None:
                resumed_info = _resume_from_rank0(parallel, resumed_info, scheduler)
            if resumed_info is not None:
                start_step = resumed_info.step
                extra = resumed_info.extra or {}
                loop_state = dict(extra.get("loop", {}))
                guard_state = extra.get("guard")
                pos = resumed_info.data_position or {}
                stream.epoch, stream.batch = int(pos.get("epoch", 0)), int(pos.get("batch", 0))

        from gradguard.watch import Recorder

        if resumed_info is not None and rank0:
            _truncate_metrics(d / rundir.METRICS, start_step)
        sinks = build_sinks(cfg, d, d / rundir.METRICS) if rank0 else []
        embeddings = dict(workload.model.named_parameters())
        from gradguard.run.builders import embedding_names

        tables = [embeddings[n] for n in embedding_names(workload)]
        recorder = Recorder(optimizer, sinks, every=cfg.recorder.every if rank0 else None,
                            full_every=cfg.recorder.full_every if rank0 else None,
                            sample_size=cfg.recorder.sample_size, seed=cfg.run.seed,
                            batch_size=cfg.train.batch_size * micro * world, embeddings=tables,
                            start_step=start_step)
        audit_path = str(d / rundir.GUARD_AUDIT) if rank0 else None
        guard = None
        audit = None
        if cfg.guard.enabled:
            from gradguard.guard import Guard

            guard_ckpt: Any = checkpointer
            if parallel is not None and cfg.checkpoint.enabled:
                from gradguard.dist import RollbackCheckpointer

                guard_ckpt = RollbackCheckpointer(checkpointer, parallel)
            local_sgd = parallel is not None and parallel.local_sgd is not None
            guard = Guard(optimizer, guard_policy(cfg.guard.policy, workload.mode,
                                                  local_sgd=local_sgd),
                          guard_ckpt, recorder,
                          model=workload.model, scheduler=scheduler,
                          audit=audit_path, start_step=start_step,
                          seed=cfg.run.seed)
            if guard_state is not None:
                guard.load_state_dict(guard_state)
            audit = guard.audit
        elif parallel is not None:
            from gradguard.guard import AuditLog

            audit = AuditLog(audit_path)

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
                       ckpt_every, state, parallel=parallel, ckpt_optimizer=ckpt_optimizer,
                       audit=audit)
        events.write("start", start_step, workload=workload.name,
                     optimizer=_optimizer_name(cfg), steps=total_steps,
                     resumed_from=resumed_info.path if resumed_info else None,
                     primary_metric=workload.primary_metric, mode=workload.mode,
                     target=(None if workload.target is None else
                             {"metric": workload.target.metric, "value": workload.target.value,
                              "mode": workload.target.mode}),
                     info=json_safe({k: v for k, v in workload.info.items()
                                      if isinstance(v, int | float | str | bool)}),
                     world_size=world, **({"dist": dist_facts} if dist_facts else {}))
        if resumed_info is not None:
            events.write("resume", start_step, path=resumed_info.path,
                         checkpoint_step=resumed_info.step)
            ctx.fidelity(resumed_info)
        elif self.resume:
            ctx.say("[yellow]--resume: no checkpoint to resume from; starting from step 0[/]")
        return ctx.loop()


@dataclass
class _Resumed:
    """What every rank knows of the checkpoint rank 0 resumed from."""

    step: int
    path: str
    metrics: dict[str, Any]
    extra: dict[str, Any] | None
    data_position: dict[str, Any] | None


def _resume_from_rank0(parallel: Any, info: Any, scheduler: Any) -> _Resumed | None:
    """Send what rank 0 restored (``info``: its CheckpointInfo, or None) to every rank."""
    from gradguard.dist.collectives import broadcast_state

    payload = None
    if info is not None:
        payload = {"step": int(info.step), "path": str(info.path), "metrics": dict(info.metrics),
                   "extra": info.extra, "data_position": info.data_position}
    payload = broadcast_state(payload if parallel.is_rank0 else None,
                              device=parallel.env.comm_device)
    if payload is None:
        return None
    full = parallel.view.loaded if parallel.view is not None else None
    parallel.sync_from_rank0(scheduler=scheduler, optimizer_state=True,
                             full_optimizer_state=full)
    if parallel.view is not None:
        parallel.view.loaded = None
    parallel.load_checkpoint_extra((payload["extra"] or {}).get("dist"))
    return _Resumed(**payload)


def _refuse_data_parallel(cfg: Config, workload: Workload) -> None:
    """What cannot run data-parallel: full-batch workloads and closure-based optimizers."""
    if workload.full_batch:
        raise ConfigError([("workload", f"{workload.name} is a full-batch problem (every step "
                            "is the whole training split): there is no batch to split across "
                            "ranks; run it in one process")])
    names = ([cfg.optimizer.name] if cfg.optimizer.name is not None else
             [g.name for g in (cfg.optimizer.groups or {}).values()])
    for name in names:
        if name in FULL_BATCH_OPTIMIZERS:
            raise ConfigError([("optimizer.name", f"{name} re-evaluates the loss in a closure "
                                "(line search / full batch), which data-parallel training "
                                "does not coordinate; run it in one process")])


def _data_parallel(cfg: Config, denv: Any, workload: Workload, optimizer: Any) -> Any:
    """The :class:`gradguard.dist.DataParallel` of this rank (DDP around the model)."""
    from gradguard.dist import DataParallel, DistributedConfigError

    d = cfg.dist
    local = d.local_sgd
    try:
        return DataParallel(
            denv, workload.model, optimizer, check_every=d.check_every,
            on_mismatch=d.on_mismatch, spread_every=d.spread_every,
            local_sgd=(local.period, local.warmup_steps, local.subgroup_size) if local else None,
            find_unused_parameters=d.find_unused_parameters, bucket_cap_mb=d.bucket_cap_mb)
    except DistributedConfigError as exc:
        raise ConfigError([(exc.key, exc.message)]) from None


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


def guard_policy(policy: dict[str, Any], mode: str, *, local_sgd: bool = False
                 ) -> dict[str, Any]:
    """The configured policy, with the evaluation detectors judging in the workload's mode.

    ``plateau`` and ``overfitting`` read the primary metric; unless the config
    says otherwise, "better" means what the workload says (accuracy: higher).
    Under post-local SGD (``local_sgd``) the detectors that read rank-local values
    (:data:`~gradguard.run.config.RANK_LOCAL_DETECTORS`) only ``alert`` unless the
    config names another allowed action: their decisions may differ between ranks.
    """
    detectors = {name: dict(spec) for name, spec in policy.get("detectors", {}).items()}
    for name in ("plateau", "overfitting"):
        spec = detectors.setdefault(name, {})
        if name == "plateau" and spec.get("source") == "loss":
            continue
        spec.setdefault("mode", mode)
    if local_sgd:
        from gradguard.run.config import RANK_LOCAL_DETECTORS

        for name in RANK_LOCAL_DETECTORS:
            detectors.setdefault(name, {}).setdefault("action", "alert")
    return {**policy, "detectors": detectors}


def _saved_world_size(run_dir: Path) -> int:
    """The world size the run in ``run_dir`` last ran with (env.json; 1 if unknown)."""
    try:
        env = json.loads((run_dir / rundir.ENV).read_text(encoding="utf-8"))
        return int(env.get("world_size", 1))
    except (OSError, ValueError, TypeError):
        return 1


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
                 state: _LoopState, *, parallel: Any = None, ckpt_optimizer: Any = None,
                 audit: Any = None) -> None:
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
        self.parallel = parallel
        """The :class:`gradguard.dist.DataParallel` of a data-parallel run (None: one process)."""
        self.rank0 = parallel is None or parallel.is_rank0
        self.train_model: torch.nn.Module = (parallel.ddp if parallel is not None
                                             else workload.model)
        self.ckpt_optimizer = ckpt_optimizer if ckpt_optimizer is not None else optimizer
        self.checkpointing = cfg.checkpoint.enabled
        self.audit = guard.audit if guard is not None else audit
        self._audit_seen = len(self.audit.records) if self.audit is not None else 0
        self._agreed_stop = False
        from gradguard.run.console import Progress

        console = trainer.console
        if not self.rank0:  # one rank speaks for the job
            import io

            from rich.console import Console

            console = Console(file=io.StringIO())
        self.ui = Progress(console, enabled=trainer.progress if self.rank0 else False,
                           total=total_steps, start=state.step, run_dir=trainer.run_dir)

    def say(self, message: str) -> None:
        if self.rank0:
            self.ui.print(message)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """The workload's metrics now (data-parallel: rank 0 evaluates, every rank gets them)."""
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.rank0:
            metrics = evaluate(self.workload, self.eval_data, self.cfg.train.eval_batch_size,
                               self.autocast, self.devices)
            for name, mask in self.workload.slices.items():
                if not mask.any():
                    continue
                index = mask.nonzero().flatten().to(self.eval_data.tensors[0].device)
                part = evaluate(self.workload, TensorData(self.eval_data.batch(index)),
                                self.cfg.train.eval_batch_size, self.autocast, self.devices)
                metrics.update({f"{name}_{k}": v for k, v in part.items()})
        if self.parallel is not None:
            from gradguard.dist.collectives import broadcast_object

            metrics = broadcast_object(metrics, device=self.parallel.env.comm_device)
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
        if not self.checkpointing or step == self.state.last_ckpt_step:
            return
        st = self.state
        extra: dict[str, Any] = {
            "loop": {"best": st.best, "best_step": st.best_step, "bad_evals": st.bad_evals,
                     "samples": st.samples, "seconds": st.seconds,
                     "target_step": st.target_step},
            "guard": self.guard.state_dict() if self.guard is not None else None}
        if self.parallel is not None:  # every rank: gather RNG states, consolidate ZeRO shards
            extra["dist"] = self.parallel.checkpoint_extra(self.stream.global_batch)
        if self.checkpointer is None:  # not rank 0
            st.last_ckpt_step = step
            return
        metrics = dict(st.last_eval) if st.last_eval_step == step else {}
        kwargs = dict(
            model=self.workload.model, optimizer=self.ckpt_optimizer, scheduler=self.scheduler,
            metrics=metrics, data_position={**self.stream.position(), "step": step},
            extra=extra)
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
            loss = self.workload.loss(self.train_model, batch)
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
            parallel = self.parallel
            for i in range(micro):
                batch = self._next_batch()
                last = i == micro - 1
                if parallel is None:
                    total += self._forward_backward(batch, 1.0 / micro).float()
                else:  # sync the gradients once, at the last micro-batch
                    weight = self.stream.weight
                    if last:
                        parallel.arm(self._next_step())
                    with parallel.no_sync(not last):
                        loss_i = self._forward_backward(batch, weight / micro).float()
                    total += loss_i if weight == 1.0 else loss_i * weight
                self.state.samples += self.stream.last_global_size
            loss = total / micro
            step_closure = None
            if parallel is not None:
                agreed = parallel.agree(loss, stop=self.trainer._stop_signal is not None)
                self._agreed_stop = agreed.stop
                if agreed.spread is not None:  # M8, measured on this step's gradients
                    self.recorder.log(self._next_step(), **agreed.spread)
                loss = agreed.loss
                if agreed.nonfinite_ranks:
                    self._nonfinite_ranks(agreed)
                    if guard is None:  # nothing non-finite gets in, and no rank steps alone
                        return False, _value(loss)
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

    def _next_step(self) -> int:
        return (self.guard.step_count if self.guard is not None else self.state.step) + 1

    def _nonfinite_ranks(self, agreed: Any) -> None:
        """Audit which ranks had a non-finite loss or gradients (every rank skips the step)."""
        if self.audit is None:
            return
        self.audit.write(
            self._next_step(), "nonfinite_rank", "skip", "skipped on every rank",
            evidence={"ranks": agreed.nonfinite_ranks, "local_losses": agreed.local_losses},
            message=f"non-finite loss or gradients on rank(s) "
                    f"{', '.join(map(str, agreed.nonfinite_ranks))}: every rank skips this step")

    def _after_parallel_step(self, step: int) -> None:
        """Post-local SGD averaging, the gradient-norm spread, the replica check (every rank)."""
        parallel = self.parallel
        values = parallel.after_step(step)
        if values:
            self.recorder.log(step, **values)
        if parallel.replica_check_due(step):
            parallel.check_replicas(step, audit=self.audit, recorder=self.recorder,
                                    guard=self.guard, scheduler=self.scheduler)

    def _report_guard_events(self) -> None:
        """Print the guard's new audit records; every action but a plain skip is an event."""
        if self.audit is None:
            return
        records = self.audit.records
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
                    # data-parallel: a stop request travels with the step's agreement, and
                    # every rank stops after the same step (below)
                    if self.trainer._stop_signal is not None and self.parallel is None:
                        st.status = "interrupted"
                        break
                    try:
                        _, loss = self.one_step()
                        if self.parallel is not None:
                            self._after_parallel_step(self.guard.step_count if self.guard
                                                      is not None else st.step + 1)
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
                    due_ckpt = self.checkpointing and step % self.ckpt_every == 0
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
                    if self._agreed_stop and not stop:
                        st.status = "interrupted"
                        break
            return self._finish()
        finally:
            self._restore_signals(previous_handlers)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0].get("lr", math.nan))

    def _final_replica_check(self) -> None:
        """Compare the replicas once more at the end (unless they may differ by design now)."""
        from gradguard.guard import TrainingHalted

        parallel, st = self.parallel, self.state
        if parallel.check_every is None or parallel.last_check_step == st.step:
            return
        local = parallel.local_sgd
        if local is not None and local.local and not parallel.just_averaged:
            return  # post-local SGD between averagings: the replicas differ by design
        try:
            parallel.check_replicas(st.step, audit=self.audit, recorder=self.recorder,
                                    guard=self.guard, scheduler=self.scheduler)
        except TrainingHalted as exc:
            st.status, st.halted = "halted", str(exc)
            self.events.write("halted", st.step, diagnosis=str(exc))
            self.say(f"[bold red]halted[/] at step {st.step}: {exc}")
        self._report_guard_events()

    def _finish(self) -> RunResult:
        st, d = self.state, self.trainer.run_dir
        if st.last_eval_step != st.step and st.status != "halted":
            stopped_because = st.status
            self._judge(st.step, self.evaluate(st.step))
            if stopped_because != "finished":  # keep why the run stopped (converged, ...)
                st.status = stopped_because
        if self.parallel is not None and st.status != "halted":
            self._final_replica_check()
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
        if self.parallel is not None:
            p = self.parallel
            summary["dist"] = {**p.describe(), "replica_checks": p.checks,
                               "replica_mismatches": p.mismatches,
                               "replicas_consistent": p.last_consistent,
                               "last_check_step": p.last_check_step}
        self.events.write("finished", st.step, status=st.status, steps=st.step, seconds=st.seconds)
        self.recorder.close()
        if self.guard is not None:
            self.guard.close()
        elif self.audit is not None:
            self.audit.close()
        self.events.close()
        report: Path | None = None
        if self.rank0:
            (d / rundir.SUMMARY).write_text(json.dumps(json_safe(summary), indent=1,
                                                       allow_nan=False), encoding="utf-8")
            try:
                if self.cfg.run.report:
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

