"""One data-parallel training run: DDP, agreed decisions, replica checks, state from rank 0.

:class:`DataParallel` is what ``gradguard train`` builds on every rank when it
runs under ``torchrun`` (see ``docs/distributed.md``); each of its methods that
communicates is a collective, called by every rank at the same point of the loop:

* :meth:`DataParallel.agree`: once per step, one all-gather of four numbers
  per rank (its loss, a non-finite flag, a stop request, its local gradient
  norm when measured). Every rank derives the same global loss (the mean;
  NaN when any rank's loss or local gradients are not finite), the same stop
  decision and the per-rank gradient-norm spread (M8). The guard judges the
  all-reduced gradients and this global loss, so its skip / clip / rollback /
  stop decisions are the same on every rank, and a NaN on one rank makes every
  rank skip the step.
* :meth:`DataParallel.check_replicas`: every ``check_every`` steps, bitwise
  checksums of the parameters and (replicated) optimizer state are gathered
  and compared with rank 0's (F3); a mismatch is audited like a guard
  detection and answered with ``resync_from_rank0`` (broadcast, then verified)
  or ``stop``.
* :meth:`DataParallel.checkpoint_extra` and :meth:`DataParallel.sync_from_rank0`:
  what checkpoints need from the other ranks (their RNG states, ZeRO's
  consolidated optimizer state) and how a restore on rank 0 reaches them.
* :class:`RollbackCheckpointer`: what the guard's ``rollback`` uses on every
  rank: rank 0's checkpoints, restored there and broadcast.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .collectives import (
    all_gather,
    all_gather_object,
    broadcast_object,
    broadcast_state,
    broadcast_tensors_,
)
from .consistency import Mismatch, checksums, compare
from .env import DistEnv
from .local_sgd import LocalSGD
from .probe import GradNormProbe
from .zero import ConsolidatedState, consolidated_view, is_zero, load_full_state

SPARSE_ALTERNATIVE = (
    "use the gloo backend (dist.backend = \"gloo\", CPU tensors), whose all-reduce takes sparse "
    "tensors, or dense embedding gradients (an nn.Embedding with sparse=False, e.g. "
    "workload.options.sparse = false for ctr; rowwise_adagrad, adagrad and adamw all take dense "
    "gradients)")


class DistributedConfigError(ValueError):
    """A combination that data-parallel training does not support; ``key`` is the config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def sparse_gradient_modules(model: torch.nn.Module) -> list[str]:
    """Names of the embedding modules that produce sparse gradients."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.sparse]


@dataclass
class Agreement:
    """What every rank agreed on for one step (identical on every rank)."""

    loss: Tensor
    """The global loss: the mean of the ranks' (weighted) losses; NaN when any rank's loss or
    local gradients are not finite."""
    nonfinite_ranks: list[int]
    """Ranks whose loss or local gradients were not finite (empty: none)."""
    stop: bool
    """Some rank was asked to stop (SIGINT/SIGTERM): every rank stops after this step."""
    grad_norms: list[float] | None
    """Each rank's local gradient norm before the reduction (None: not measured this step)."""
    local_losses: list[float]

    @property
    def spread(self) -> dict[str, float] | None:
        """``grad_norm_rank_spread`` (max - min) and friends, when the norms were measured."""
        if self.grad_norms is None:
            return None
        finite = [n for n in self.grad_norms if math.isfinite(n)]
        if len(finite) != len(self.grad_norms):
            return {"grad_norm_rank_spread": math.nan}
        return {"grad_norm_rank_spread": max(finite) - min(finite),
                "grad_norm_rank_min": min(finite), "grad_norm_rank_max": max(finite)}


class DataParallel:
    """The data-parallel side of one run on one rank (see the module docstring).

    Args:
        env: this process's place in the job (:func:`gradguard.dist.env.setup`).
        model: the model, already on ``env.device``; wrapped in
            ``DistributedDataParallel`` (:attr:`ddp`), which broadcasts rank 0's
            parameters and buffers now.
        optimizer: the optimizer (a ``ZeroRedundancyOptimizer`` for sharded state).
        check_every: steps between replica checks (None: never).
        on_mismatch: ``"resync_from_rank0"`` or ``"stop"``.
        spread_every: steps between per-rank gradient-norm measurements (None: never).
        local_sgd: ``(period, warmup_steps, subgroup_size)`` for post-local SGD, or None.
        find_unused_parameters, bucket_cap_mb: passed to ``DistributedDataParallel``.
    """

    def __init__(self, env: DistEnv, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 check_every: int | None = 100, on_mismatch: str = "resync_from_rank0",
                 spread_every: int | None = 10,
                 local_sgd: tuple[int, int, int] | None = None,
                 find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0) -> None:
        if on_mismatch not in ("resync_from_rank0", "stop"):
            raise ValueError(f"on_mismatch={on_mismatch!r}: allowed 'resync_from_rank0', 'stop'")
        self.env = env
        self.module = model
        self.optimizer = optimizer
        self.check_every = check_every
        self.on_mismatch = on_mismatch
        self.spread_every = spread_every
        self.zero = is_zero(optimizer)
        self.view: ConsolidatedState | None = (consolidated_view(optimizer)  # type: ignore[arg-type]
                                               if self.zero else None)
        sparse = sparse_gradient_modules(model)
        if sparse and env.backend == "nccl":
            raise DistributedConfigError(
                "dist.backend", f"sparse embedding gradients ({', '.join(sparse)}) cannot be "
                f"all-reduced by NCCL; {SPARSE_ALTERNATIVE}")
        if sparse and self.zero:
            raise DistributedConfigError(
                "dist.zero", f"ZeroRedundancyOptimizer needs dense gradients, and "
                f"{', '.join(sparse)} produce sparse ones; use dist.zero = false (replicated "
                "optimizer state, sparse gradients all-reduced by gloo) or dense embeddings")
        if sparse and local_sgd is not None:
            raise DistributedConfigError(
                "dist.local_sgd", f"post-local SGD averages dense parameters and is not supported "
                f"with sparse embedding gradients ({', '.join(sparse)}); use synchronous DDP "
                "(no dist.local_sgd) or dense embeddings")
        self.local_sgd: LocalSGD | None = None
        if local_sgd is not None:
            period, warmup, subgroup = local_sgd
            self.local_sgd = LocalSGD(period, warmup, subgroup or env.local_world_size)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids,
                                           bucket_cap_mb=bucket_cap_mb,
                                           find_unused_parameters=find_unused_parameters)
        self.probe: GradNormProbe | None = None
        if self.local_sgd is not None:
            self.probe = GradNormProbe(self.local_sgd.hook, self.local_sgd.hook_state)
        elif spread_every is not None:
            self.probe = GradNormProbe()
        if self.probe is not None:
            self.ddp.register_comm_hook(self.probe, GradNormProbe.hook)
        self.checks = 0
        """Replica comparisons so far (restored with checkpoints)."""
        self.mismatches = 0
        """Comparisons that found a replica differing from rank 0's."""
        self.last_check_step: int | None = None
        self.last_consistent: bool | None = None
        self.just_averaged = False
        """Post-local SGD: whether the last :meth:`after_step` averaged the parameters."""
        self._check_due = False

    # ----------------------------------------------------------------- facts
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0

    @property
    def replicated_optimizer_state(self) -> bool:
        """Whether every rank holds the same optimizer state (not ZeRO, not local SGD's phase)."""
        if self.zero:
            return False
        return self.local_sgd is None or not self.local_sgd.local

    def checkpoint_optimizer(self, optimizer: Any) -> Any:
        """What to give the Checkpointer for ``optimizer`` (ZeRO: its consolidated view)."""
        if self.zero and optimizer is self.optimizer:
            return self.view
        return optimizer

    def describe(self) -> dict[str, Any]:
        return {**self.env.describe(), "zero": self.zero,
                "local_sgd": (None if self.local_sgd is None else {
                    "period": self.local_sgd.period, "warmup_steps": self.local_sgd.warmup_steps,
                    "subgroup_size": self.local_sgd.subgroup_size}),
                "check_every": self.check_every, "on_mismatch": self.on_mismatch,
                "spread_every": self.spread_every}

    # ----------------------------------------------------------------- a step
    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """DDP's ``no_sync()`` when ``skip`` (micro-batches before the last of a step)."""
        if skip:
            with self.ddp.no_sync():
                yield
        else:
            yield

    def arm(self, step: int) -> None:
        """Before the last backward pass of ``step``: measure the local gradients if due.

        Post-local SGD measures every step (a rank's gradients are its own there,
        and a non-finite one must make every rank skip).
        """
        if self.probe is None:
            return
        local = self.local_sgd is not None and self.local_sgd.local
        if local or (self.spread_every is not None and step % self.spread_every == 0):
            self.probe.arm()

    def agree(self, loss: Tensor | float, stop: bool) -> Agreement:
        """One all-gather: the global loss, who is not finite, whether to stop, gradient norms."""
        sumsq = self.probe.take() if self.probe is not None else None
        local = torch.as_tensor(loss, dtype=torch.float64).detach().reshape(()).to(
            self.env.comm_device)
        bad = ~torch.isfinite(local)
        if sumsq is not None and not math.isfinite(sumsq):
            bad = torch.ones((), dtype=torch.bool, device=local.device)
        vector = torch.stack([
            torch.where(bad, torch.zeros_like(local), local), bad.to(torch.float64),
            torch.tensor(float(stop), dtype=torch.float64, device=local.device),
            torch.tensor(math.nan if sumsq is None else sumsq, dtype=torch.float64,
                         device=local.device)])
        gathered = all_gather(vector, self.env.comm_device)  # (world, 4)
        host = gathered.cpu().tolist()
        nonfinite = [r for r, row in enumerate(host) if row[1] != 0.0]
        total = 0.0
        for row in host:  # rank order: the same sum on every rank
            total += row[0]
        mean = math.nan if nonfinite else total / self.world_size
        norms = None
        if sumsq is not None:
            norms = [math.sqrt(row[3]) if row[3] >= 0 else math.nan for row in host]
        global_loss = torch.tensor(mean, dtype=torch.float32)
        if isinstance(loss, Tensor):
            global_loss = global_loss.to(loss.device)
        return Agreement(global_loss, nonfinite, any(row[2] != 0.0 for row in host), norms,
                         [row[0] if row[1] == 0.0 else math.nan for row in host])

    def after_step(self, step: int) -> dict[str, float]:
        """After every loop step, on every rank: post-local SGD's averaging when due.

        Returns the replica spread measured just before an averaging (else empty).
        """
        if self.local_sgd is None:
            return {}
        averaged = self.local_sgd.averages_next()
        spread = self.local_sgd.step(list(self.module.parameters()),
                                     measure=self.spread_every is not None)
        self.just_averaged = averaged
        if spread is None:
            return {}
        return {"replica_spread": spread[0], "replica_spread_max": spread[1]}

    # ------------------------------------------------------------- consistency
    def replica_check_due(self, step: int) -> bool:
        """Whether the replicas should be compared after ``step``.

        Every ``check_every`` steps; under post-local SGD the replicas are equal
        only right after an averaging (or during the warm-up), so a due check
        waits for the next one.
        """
        if self.check_every is None:
            return False
        if step % self.check_every == 0:
            self._check_due = True
        if not self._check_due:
            return False
        if self.local_sgd is not None and self.local_sgd.local and not self.just_averaged:
            return False
        self._check_due = False
        return True

    def compare_replicas(self) -> Mismatch | None:
        """Gather every rank's checksums and compare them with rank 0's (a collective)."""
        state_opt = self.optimizer if self.replicated_optimizer_state else None
        local = checksums(self.module, state_opt)
        digest = hashlib.sha256("\n".join(local.names).encode()).digest()[:8]
        header = torch.tensor([len(local.names), int.from_bytes(digest, "little", signed=True)],
                              dtype=torch.int64)
        headers = all_gather(header, self.env.comm_device).cpu()
        if bool((headers == headers[0]).all()):
            values = all_gather(local.values, self.env.comm_device).cpu()
            return compare([local.names] * self.world_size, list(values))
        every = all_gather_object((local.names, local.values))
        return compare([n for n, _ in every], [v for _, v in every])

    def check_replicas(self, step: int, *, audit: Any, recorder: Any = None, guard: Any = None,
                       scheduler: Any = None) -> Mismatch | None:
        """Compare the replicas; on a mismatch act as configured and audit it.

        ``audit`` is the guard's :class:`~gradguard.guard.AuditLog` (or one of its
        own); the detection counts in ``guard.detections`` / ``guard.counts`` when
        a guard is given. ``resync_from_rank0`` broadcasts rank 0's parameters,
        buffers, replicated optimizer state and scheduler, then compares again
        (the outcome says whether that verified); ``stop`` (or a resync that does
        not verify) raises :class:`~gradguard.guard.TrainingHalted`.
        """
        from gradguard.guard import TrainingHalted

        mismatch = self.compare_replicas()
        self.checks += 1
        self.last_check_step = step
        self.last_consistent = mismatch is None
        if mismatch is None:
            if recorder is not None:
                recorder.log(step, replica_mismatch_total=float(self.mismatches))
            return None
        self.mismatches += 1
        if recorder is not None:
            recorder.log(step, replica_mismatch_total=float(self.mismatches))
        evidence = {**mismatch.evidence(), "world_size": self.world_size,
                    "optimizer_state_compared": self.replicated_optimizer_state}
        action = self.on_mismatch
        outcome = "halted"
        if action == "resync_from_rank0":
            self.sync_from_rank0(scheduler=scheduler,
                                 optimizer_state=self.replicated_optimizer_state)
            after = self.compare_replicas()
            self.last_consistent = after is None
            outcome = ("resynced from rank 0 (verified)" if after is None else
                       "unavailable: the replicas still differ after the resync")
            if after is not None:
                evidence["after_resync"] = after.evidence()
        if guard is not None:  # in the guard's counts, as its own detections are
            guard.detections["replica_mismatch"] = guard.detections.get("replica_mismatch", 0) + 1
            guard.counts[action] = guard.counts.get(action, 0) + 1
            if outcome.startswith("unavailable"):
                guard.counts["stop"] = guard.counts.get("stop", 0) + 1
        if outcome.startswith("resynced"):
            audit.write(step, "replica_mismatch", action, outcome, evidence=evidence,
                        message=mismatch.message())
            return mismatch
        diagnosis = "\n".join([
            f"Training halted by gradguard.dist at step {step}.",
            f"Why: {mismatch.message()} (dist.on_mismatch = {self.on_mismatch!r}"
            + ("; the resync did not make them equal" if action != "stop" else "") + ").",
            "What to try: look for code that changes parameters outside the optimizer on some "
            "ranks, ranks that skip steps alone, or non-deterministic kernels; resume from the "
            "last checkpoint (rank 0's state), or set dist.on_mismatch = \"resync_from_rank0\" "
            "(F3).",
            f"Audit log: {getattr(audit, 'path', None)}",
            "See docs/distributed.md."])
        if action != "stop":  # the resync that did not verify, then the stop
            audit.write(step, "replica_mismatch", action, outcome, evidence=evidence,
                        message=mismatch.message())
        audit.write(step, "replica_mismatch", "stop", "halted", evidence=evidence,
                    message=mismatch.message(), diagnosis=diagnosis)
        raise TrainingHalted(diagnosis, step=step, detector="replica_mismatch",
                             evidence=evidence, records=audit.records[-20:])

    # ------------------------------------------------------------- state sync
    def sync_from_rank0(self, *, scheduler: Any = None, optimizer_state: bool = True,
                        full_optimizer_state: dict[str, Any] | None = None) -> None:
        """Make every rank's state rank 0's (a collective).

        Parameters and buffers are broadcast in place; the optimizer state
        (replicated: rank 0's ``state_dict()``; ZeRO: ``full_optimizer_state``,
        the full dict rank 0 restored, of which each rank keeps its partition)
        when ``optimizer_state``; the scheduler's state when given.
        """
        tensors = [*self.module.parameters(), *self.module.buffers()]
        broadcast_tensors_(tensors, src=0, device=self.env.comm_device)
        if optimizer_state:
            if self.zero:
                full = broadcast_state(full_optimizer_state if self.is_rank0 else None, src=0,
                                       device=self.env.comm_device)
                if full is not None and not self.is_rank0:
                    load_full_state(self.optimizer, full)  # type: ignore[arg-type]
            else:
                state = broadcast_state(self.optimizer.state_dict() if self.is_rank0 else None,
                                        src=0, device=self.env.comm_device)
                if not self.is_rank0:
                    self.optimizer.load_state_dict(state)
        if scheduler is not None:
            sched = broadcast_object(scheduler.state_dict() if self.is_rank0 else None, src=0,
                                     device=self.env.comm_device)
            if not self.is_rank0:
                scheduler.load_state_dict(sched)

    # ------------------------------------------------------------- checkpoints
    def checkpoint_extra(self, global_batch: int) -> dict[str, Any]:
        """What a checkpoint needs from every rank (a collective; call it on every rank).

        Consolidates ZeRO's shards on rank 0 (its ``state_dict()`` is then
        current), and gathers each rank's torch RNG state (CUDA too), so a
        resume with the same world size gives each rank its own generator back.
        """
        if self.view is not None:
            self.view.consolidate(to=0)
        rng = all_gather(torch.get_rng_state(), self.env.comm_device).cpu()
        extra: dict[str, Any] = {
            "world_size": self.world_size, "backend": self.env.backend, "zero": self.zero,
            "global_batch": global_batch, "rng_torch": list(rng),
            "local_sgd": self.local_sgd.state_dict() if self.local_sgd is not None else None,
            "replica_checks": self.checks, "replica_mismatches": self.mismatches,
        }
        if self.env.device.type == "cuda":
            cuda = all_gather(torch.cuda.get_rng_state(self.env.device), self.env.comm_device)
            extra["rng_cuda"] = list(cuda.cpu())
        return extra

    def load_checkpoint_extra(self, extra: dict[str, Any] | None) -> None:
        """Each rank's RNG state (same world size only), local SGD's counters, the counts."""
        if not extra:
            return
        if int(extra.get("world_size", 0)) == self.world_size:
            torch.set_rng_state(extra["rng_torch"][self.rank].to(torch.uint8).cpu())
            if self.env.device.type == "cuda" and extra.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(extra["rng_cuda"][self.rank].to(torch.uint8).cpu(),
                                         self.env.device)
        if self.local_sgd is not None and extra.get("local_sgd"):
            self.local_sgd.load_state_dict(extra["local_sgd"])
        self.checks = int(extra.get("replica_checks", 0))
        self.mismatches = int(extra.get("replica_mismatches", 0))


@dataclass
class RestoredCheckpoint:
    """The part of a ``CheckpointInfo`` every rank gets after a restore on rank 0."""

    step: int
    path: str


class RollbackCheckpointer:
    """Rank 0's checkpoints, as the guard's ``rollback`` sees them on every rank.

    The guard calls ``wait()``, ``steps()`` and ``restore(...)``; its decisions
    are the same on every rank, so every rank calls them at the same point.
    Rank 0 answers from its :class:`~gradguard.ckpt.Checkpointer` and broadcasts
    the answer; a restore loads there and reaches the other ranks through
    :meth:`DataParallel.sync_from_rank0`. A checkpoint that does not verify
    raises the same error on every rank, so every rank's rollback moves on to
    the same older one.
    """

    def __init__(self, checkpointer: Any, parallel: DataParallel) -> None:
        self.checkpointer = checkpointer if parallel.is_rank0 else None
        self.parallel = parallel

    def wait(self) -> Any:
        from gradguard.ckpt import CheckpointError, CheckpointWriteError

        error = None
        if self.checkpointer is not None:
            try:
                self.checkpointer.wait()
            except CheckpointError as err:
                error = str(err)
        error = broadcast_object(error, src=0, device=self.parallel.env.comm_device)
        if error is not None:
            raise CheckpointWriteError(error)
        return None

    def steps(self) -> list[int]:
        steps: list[int] | None = (self.checkpointer.steps() if self.checkpointer is not None
                                   else None)
        result = broadcast_object(steps, src=0, device=self.parallel.env.comm_device)
        return list(result or [])

    def restore(self, *, model: torch.nn.Module | None, optimizer: Any = None,
                scheduler: Any = None, path: str | None = None, rng: bool = True,
                **kwargs: Any) -> Any:
        from gradguard.ckpt import CheckpointCorruptError, CheckpointError

        p = self.parallel
        info = None
        outcome: tuple[str, Any] = ("ok", None)
        if self.checkpointer is not None:
            try:
                info = self.checkpointer.restore(model=model,
                                                 optimizer=p.checkpoint_optimizer(optimizer),
                                                 scheduler=scheduler, path=path, rng=rng,
                                                 **kwargs)
                outcome = ("ok", (int(info.step), str(info.path)))
            except CheckpointCorruptError as err:
                outcome = ("corrupt", (str(err), err.path, list(err.problems)))
            except CheckpointError as err:
                outcome = ("error", f"{type(err).__name__}: {err}")
        outcome = broadcast_object(outcome, src=0, device=p.env.comm_device)
        kind = outcome[0]
        detail: Any = outcome[1]
        if kind == "corrupt":
            message, where, problems = detail
            raise CheckpointCorruptError(message, path=where, problems=problems)
        if kind == "error":
            raise CheckpointError(f"rank 0 could not restore a checkpoint: {detail}")
        full = p.view.loaded if p.view is not None else None
        p.sync_from_rank0(scheduler=scheduler, optimizer_state=optimizer is not None,
                          full_optimizer_state=full)
        if p.view is not None:
            p.view.loaded = None
        if info is not None:
            return info
        step, where = detail
        return RestoredCheckpoint(step, where)
