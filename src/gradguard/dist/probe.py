"""Per-rank gradient norms before the all-reduce (metric M8), from a DDP communication hook.

After ``backward()`` under DistributedDataParallel every rank holds the
*averaged* gradient; what each rank computed on its own shard of the batch is
gone. :class:`GradNormProbe` is a DDP communication hook that wraps the hook
that does the communication (the default all-reduce, or post-local SGD's):
when armed, it adds up the squares of each bucket's local gradients before
handing the bucket on, which costs one read of the gradients on measured steps
and nothing on the others. The numbers it gives are the norms of the local
gradients as they entered the reduction (with gradient accumulation: summed
over the micro-batches; in the last, partial batch of an epoch: scaled by the
shard's share of the samples).
"""

# no ``from __future__ import annotations``: DistributedDataParallel.register_comm_hook checks
# the hook's annotations against the real dist.GradBucket and Future types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from gradguard.guard import gradient_sum_of_squares

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class GradNormProbe:
    """A DDP communication hook that measures the local gradient norm when armed.

    ``ddp.register_comm_hook(probe, GradNormProbe.hook)``; ``probe.arm()`` before
    the backward pass whose gradients should be measured (the last micro-batch
    of a step); ``probe.take()`` afterwards returns the local sum of squares.

    Args:
        inner: the hook that communicates (default: all-reduce and average, which
            is what DDP does without a hook), called as ``inner(inner_state, bucket)``.
        inner_state: its state (default: the process group).
    """

    def __init__(self, inner: Hook | None = None, inner_state: Any = None) -> None:
        if inner is None:
            inner, inner_state = default_hooks.allreduce_hook, dist.group.WORLD
        self.inner = inner
        self.inner_state = inner_state
        self.armed = False
        self._sumsq: torch.Tensor | None = None

    @staticmethod
    def hook(probe: "GradNormProbe", bucket: dist.GradBucket
             ) -> torch.futures.Future[torch.Tensor]:
        """The function to register (``state`` is the probe)."""
        if probe.armed:
            buffer = bucket.buffer().detach()
            # one read-only pass (BLAS dot for large float tensors), as the guard measures
            part = gradient_sum_of_squares([buffer]).to(torch.float64)
            probe._sumsq = part if probe._sumsq is None else probe._sumsq + part
        return probe.inner(probe.inner_state, bucket)

    def arm(self) -> None:
        """Measure the buckets of the next backward pass."""
        self.armed = True
        self._sumsq = None

    def take(self) -> float | None:
        """The local gradients' sum of squares since :meth:`arm` (None: not armed); disarms."""
        if not self.armed:
            return None
        self.armed = False
        value, self._sumsq = self._sumsq, None
        return 0.0 if value is None else float(value)
