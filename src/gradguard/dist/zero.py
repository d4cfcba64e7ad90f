"""Sharded optimizer state: ``ZeroRedundancyOptimizer`` around a gradguard optimizer; checkpoints.

``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO stage 1) gives each
rank the optimizer state of a partition of the parameters; after its local
step it broadcasts the updated parameters. Its ``state_dict()`` needs
``consolidate_state_dict()`` first (a collective that gathers every shard on
one rank) and then has the *same format* as the wrapped optimizer's own
``state_dict()``: state keyed by the global parameter index, the full param
groups. So a checkpoint of the consolidated state is an ordinary checkpoint of
the wrapped optimizer: it restores into a plain optimizer in one process, or
into ZeRO on any number of ranks (``load_state_dict`` keeps each rank's
partition). :class:`ConsolidatedState` is what :class:`gradguard.ckpt.Checkpointer`
is given for that: it reports the wrapped optimizer's class, so the
checkpoint's optimizer configuration hash equals that of a replicated run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer


def make_zero(params: Iterable[torch.nn.Parameter], optimizer_class: type[torch.optim.Optimizer],
              **hyperparameters: Any) -> ZeroRedundancyOptimizer:
    """``ZeroRedundancyOptimizer`` over ``params``; each shard steps with ``optimizer_class``."""
    return ZeroRedundancyOptimizer(list(params), optimizer_class=optimizer_class,
                                   **hyperparameters)


def is_zero(optimizer: Any) -> bool:
    return isinstance(optimizer, ZeroRedundancyOptimizer)


class ConsolidatedState:
    """A ``ZeroRedundancyOptimizer`` as the checkpointer sees it: the whole state, one format.

    * ``state_dict()``: the consolidated state (call :meth:`consolidate` on every
      rank first; only rank 0 holds the result);
    * ``load_state_dict(full)``: loads this rank's partition and keeps ``full``
      in :attr:`loaded` so the caller can send it to the other ranks;
    * ``param_groups``: the full param groups (every parameter, every
      hyperparameter of the wrapped optimizer).

    Build it with :func:`consolidated_view`, whose class carries the wrapped
    optimizer's module and name (what a checkpoint records as the optimizer class).
    """

    def __init__(self, zero: ZeroRedundancyOptimizer) -> None:
        self.zero = zero
        self.loaded: dict[str, Any] | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.zero.param_groups

    @property
    def state(self) -> Any:
        return self.zero.optim.state

    def consolidate(self, to: int = 0) -> None:
        """Gather every rank's shard on rank ``to`` (a collective: every rank calls it)."""
        self.zero.consolidate_state_dict(to=to)

    def state_dict(self) -> dict[str, Any]:
        return self.zero.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict
        load_full_state(self.zero, state_dict)


def load_full_state(zero: ZeroRedundancyOptimizer, state_dict: dict[str, Any]) -> None:
    """Load a full (consolidated, or plain optimizer) state dict; this rank keeps its partition.

    ``ZeroRedundancyOptimizer.load_state_dict`` edits the dict it is given, so it
    gets a copy; afterwards the wrapper's own ``state`` (a stale copy that only
    ``state_dict()`` reads, and overwrites) is emptied, so nothing reads
    another rank's state from it.
    """
    mine = dict(state_dict)
    mine["state"] = dict(state_dict["state"])
    mine["param_groups"] = copy.deepcopy(state_dict["param_groups"])
    zero.load_state_dict(mine)
    zero.state.clear()


_VIEW_CLASSES: dict[type, type[ConsolidatedState]] = {}


def consolidated_view(zero: ZeroRedundancyOptimizer) -> ConsolidatedState:
    """A :class:`ConsolidatedState` whose class name is the wrapped optimizer's.

    The checkpoint records the class of the state it holds (for the configuration
    hash); the consolidated state *is* the wrapped optimizer's, so a checkpoint
    written under ZeRO and one written by a replicated run are interchangeable.
    """
    inner = type(zero.optim)
    cls = _VIEW_CLASSES.get(inner)
    if cls is None:
        cls = type(inner.__name__, (ConsolidatedState,),
                   {"__module__": inner.__module__, "__qualname__": inner.__qualname__,
                    "__doc__": f"The consolidated ZeRO state of a {inner.__qualname__}."})
        _VIEW_CLASSES[inner] = cls
    return cls(zero)
