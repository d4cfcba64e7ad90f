"""Post-local SGD: local steps, parameters averaged every ``period`` steps (torch's averagers).

The pieces are torch's own (``torch.distributed.algorithms``):

* ``PostLocalSGDState`` + ``post_localSGD_hook``, the DDP communication hook:
  gradients are all-reduced over the whole job for ``warmup_steps`` steps, then
  only within a subgroup (``subgroup_size`` ranks; 1: none at all);
* ``PeriodicModelAverager``: after the optimizer step, every ``period`` steps,
  the parameters are averaged over the job (one all-reduce).

``torch.distributed.optim.PostLocalSGDOptimizer`` is exactly "the wrapped
optimizer's ``step()``, then ``averager.average_parameters()``"; here the two
halves are called separately because the optimizer step goes through the
guard (which may skip it, and passes the clip divisor), and the averaging must
run on every rank at every loop step whatever each rank's guard decided, so
that the collectives stay in step. The averager's counter and the hook's
warm-up counter are saved with checkpoints (:meth:`LocalSGD.state_dict`).

Between averagings the replicas drift apart by design; :meth:`LocalSGD.step`
measures how far, just before each averaging: the root-mean-square distance of
the ranks' parameter vectors from their average, relative to the average's
norm (``replica_spread``), and the largest rank's (``replica_spread_max``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState,
    post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from .collectives import all_gather


class LocalSGD:
    """Post-local SGD for one DDP model: its communication hook, averager and spread meter.

    Args:
        period: steps between parameter averagings.
        warmup_steps: steps of ordinary synchronous DDP first.
        subgroup_size: ranks that keep all-reducing gradients every step after
            the warm-up (1: none; it must divide the world size).
    """

    def __init__(self, period: int, warmup_steps: int = 0, subgroup_size: int = 1) -> None:
        world = dist.get_world_size()
        if subgroup_size < 1 or world % subgroup_size:
            from .runtime import DistributedConfigError

            raise DistributedConfigError(
                "dist.local_sgd.subgroup_size", f"{subgroup_size} must divide the world size "
                f"{world}")
        self.period = period
        self.warmup_steps = warmup_steps
        self.subgroup_size = subgroup_size
        subgroup = None
        if subgroup_size > 1:
            subgroup, _ = dist.new_subgroups(group_size=subgroup_size)
        # a subgroup of one has nothing to all-reduce: post_local_gradient_allreduce=False
        # makes the hook return each rank's local gradient as it is
        self.hook_state = PostLocalSGDState(
            process_group=None, subgroup=subgroup, start_localSGD_iter=warmup_steps,
            post_local_gradient_allreduce=subgroup_size > 1)
        self.hook = post_localSGD_hook
        self.averager = PeriodicModelAverager(period=period, warmup_steps=warmup_steps)
        self.last_spread: tuple[float, float] | None = None

    @property
    def local(self) -> bool:
        """Whether gradients are rank-local now (the warm-up is over)."""
        return self.hook_state.iter >= self.hook_state.start_localSGD_iter

    def averages_next(self) -> bool:
        """Whether the next :meth:`step` averages the parameters."""
        s, a = self.averager.step, self.averager
        return s >= a.warmup_steps and (s - a.warmup_steps) % a.period == 0

    def step(self, params: list[torch.nn.Parameter], measure: bool = True
             ) -> tuple[float, float] | None:
        """After each loop step, on every rank: average when due; return the spread measured.

        Returns ``(replica_spread, replica_spread_max)`` when the parameters were
        averaged and ``measure`` is set, else None.
        """
        averaging = self.averages_next()
        before = None
        if averaging and measure:
            before = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
        self.averager.average_parameters(params)
        if before is None:
            return None
        after = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
        local = torch.stack([(before - after).square().sum(), after.square().sum()])
        gathered = all_gather(local)
        distances = gathered[:, 0].clamp_min(0).sqrt()
        norm = float(gathered[0, 1].sqrt())
        scale = norm if norm > 0 else 1.0
        rms = float(distances.square().mean().sqrt()) / scale
        worst = float(distances.max()) / scale
        self.last_spread = (rms, worst)
        return self.last_spread

    def state_dict(self) -> dict[str, Any]:
        return {"averager_step": int(self.averager.step), "hook_iter": int(self.hook_state.iter)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averager.step = int(state.get("averager_step", 0))
        self.hook_state.iter = int(state.get("hook_iter", 0))
