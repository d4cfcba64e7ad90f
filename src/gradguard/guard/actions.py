"""Actions: what the guard does about a detection.

=======================  ============================================================
action                   effect
=======================  ============================================================
``skip``                 the step is not applied: parameters, state, step counters
                         unchanged (decided before the step)
``clip``                 the gradients are scaled down to the spike threshold, inside
                         the optimizer's fused kernel (``grad_scale``)
``lr_backoff``           every group's learning rate times ``factor`` (not below
                         ``floor``), at most once per ``cooldown`` steps
``reset_accumulators``   adaptive state back to its initial value (Adagrad's ``sum``,
                         or scaled by ``scale``); moments zeroed and bias correction
                         restarted (Adam family); momentum cleared
``rollback``             the newest checkpoint before the trouble restored (model,
                         optimizer, scheduler), the next ``skip_batches`` batches
                         dropped, the learning rate times ``lr_factor``
``stop``                 :class:`TrainingHalted` raised, carrying a diagnosis
``alert``                logged (``logging`` and the audit log) and counted, nothing else
=======================  ============================================================

The functions here act on optimizers and checkpoints; they decide nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.optim.base import Optimizer as GradguardOptimizer

CLIP_EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""

BIAS_CORRECTED: frozenset[str] = frozenset({"Adam", "AdamW", "NAdam", "Adamax", "RAdam"})
"""Algorithms whose step counter drives bias correction: a reset restarts it."""

ACCUMULATOR_KEYS: tuple[str, ...] = ("sum", "n")
"""Summed (never decaying) accumulators, which ``reset_accumulators(scale=...)`` scales."""

_TORCH_RESETTABLE: frozenset[str] = frozenset({
    "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"})


class TrainingHalted(RuntimeError):
    """Raised by the guard's ``stop`` action; ``str(err)`` is a diagnosis for people.

    Attributes: ``step`` (the guard step), ``detector`` (what fired last),
    ``evidence`` (its numbers), ``diagnosis`` (the message), ``records`` (the
    audit records that led here, newest last).
    """

    def __init__(self, diagnosis: str, *, step: int, detector: str,
                 evidence: Mapping[str, Any] | None = None,
                 records: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(diagnosis)
        self.diagnosis = diagnosis
        self.step = step
        self.detector = detector
        self.evidence = dict(evidence or {})
        self.records = list(records)


class ActionUnavailable(RuntimeError):
    """An action cannot run here (no checkpoint to roll back to, unknown optimizer state)."""


def clip_divisor(norm: float, max_norm: float) -> float | None:
    """What to divide the gradients by so their norm is at most ``max_norm``; None if it is.

    ``(norm + 1e-6) / max_norm``, the inverse of ``clip_grad_norm_``'s coefficient.
    """
    divisor = (norm + CLIP_EPS) / max_norm
    return divisor if divisor > 1.0 else None


def lr_backoff(optimizer: torch.optim.Optimizer, factor: float, floor: float = 0.0,
               scheduler: Any = None) -> dict[str, Any]:
    """Multiply every group's ``lr`` by ``factor``, not below ``floor``; returns the evidence.

    A group's ``initial_lr`` (set by LR schedulers) and the scheduler's
    ``base_lrs`` are scaled by the same ratio, so a scheduler does not undo the cut.
    """
    before = [_lr(group) for group in optimizer.param_groups]
    after = []
    for i, group in enumerate(optimizer.param_groups):
        new = max(before[i] * factor, min(floor, before[i]))
        _scale_group_lr(group, new / before[i] if before[i] > 0 else 1.0, new)
        if scheduler is not None and hasattr(scheduler, "base_lrs") and before[i] > 0:
            scheduler.base_lrs[i] *= new / before[i]
        after.append(new)
    return {"lr_before": before, "lr_after": after, "factor": factor, "floor": floor}


def set_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float], scheduler: Any = None) -> None:
    """Set each group's ``lr`` (and ``initial_lr`` / the scheduler's ``base_lrs`` in proportion)."""
    for i, (group, new) in enumerate(zip(optimizer.param_groups, lrs, strict=True)):
        old = _lr(group)
        ratio = new / old if old > 0 else 1.0
        _scale_group_lr(group, ratio, new)
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs[i] *= ratio


def _lr(group: Mapping[str, Any]) -> float:
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, Tensor) else lr)


def _scale_group_lr(group: dict[str, Any], ratio: float, new: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(new)
    else:
        group["lr"] = new
    if "initial_lr" in group:
        group["initial_lr"] = float(group["initial_lr"]) * ratio


def reset_accumulators(optimizer: torch.optim.Optimizer,
                       scale: float | None = None) -> dict[str, Any]:
    """Put the optimizer's adaptive state back to where a fresh run starts; returns the evidence.

    gradguard optimizers get exactly their initial state (``_init_state``):
    Adagrad's ``sum`` back to ``initial_accumulator_value`` (or, with ``scale``,
    multiplied by it), Adam-family moments zeroed with the step counter at 0 so
    bias correction restarts, RMSprop/Adadelta averages zeroed, SGD/LARS momentum
    cleared. FTRL's ``n`` is reset (or scaled) and ``z`` recomputed so that the
    weights do not move. Step counters of algorithms without bias correction keep
    counting (Adagrad's ``lr_decay`` depends on them). torch.optim's SGD, Adagrad,
    RMSprop, Adadelta, Adam, AdamW, Adamax, NAdam and RAdam are handled by state
    key; any other optimizer raises :class:`ActionUnavailable`. State tensors are
    overwritten in place.
    """
    names = {cls.__name__ for cls in type(optimizer).__mro__}
    if not isinstance(optimizer, GradguardOptimizer) and not names & _TORCH_RESETTABLE:
        raise ActionUnavailable(f"reset_accumulators does not know the state of "
                                f"{type(optimizer).__qualname__}")
    restart_step = bool(names & BIAS_CORRECTED)
    keys: set[str] = set()
    tensors = 0
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                fresh = (_fresh_state(optimizer, group, p)
                         if isinstance(optimizer, GradguardOptimizer)
                         else _torch_fresh_state(names, group, state))
                for key in list(state):
                    if key == "step" and not restart_step:
                        continue
                    if scale is not None and key in ACCUMULATOR_KEYS:
                        state[key].mul_(scale)
                    elif key in fresh:
                        _overwrite(state, key, fresh[key])
                    else:
                        continue
                    keys.add(key)
                if "FTRL" in names:
                    _ftrl_keep_weights(group, p, state)
                tensors += 1
    return {"keys": sorted(keys), "tensors": tensors, "scale": scale,
            "step_restarted": restart_step}


def _fresh_state(optimizer: GradguardOptimizer, group: dict[str, Any], p: Tensor,
                 ) -> dict[str, Any]:
    try:
        impl = optimizer.resolve_impl(group, [p])
    except ValueError:
        impl = "reference"
    fresh: dict[str, Any] = {}
    optimizer._init_state(group, p, fresh, optimizer.state_dtype(group, p), impl)
    return fresh


def _torch_fresh_state(names: set[str], group: Mapping[str, Any], state: Mapping[str, Any],
                       ) -> dict[str, Any]:
    fresh: dict[str, Any] = {}
    for key, value in state.items():
        if key == "momentum_buffer" and "SGD" in names:
            fresh[key] = None
        elif not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        elif key == "sum":
            fresh[key] = torch.full_like(value, float(group.get("initial_accumulator_value", 0)))
        elif key == "mu_product":
            fresh[key] = torch.ones_like(value)
        else:
            fresh[key] = torch.zeros_like(value)
    return fresh


def _overwrite(state: dict[str, Any], key: str, new: Any) -> None:
    old = state.get(key)
    if (isinstance(old, Tensor) and isinstance(new, Tensor) and old.shape == new.shape
            and old.dtype == new.dtype):
        old.copy_(new)
    else:
        state[key] = new


def _ftrl_keep_weights(group: Mapping[str, Any], p: Tensor, state: dict[str, Any]) -> None:
    """Recompute FTRL's ``z`` from the weights and the new ``n``: w is unchanged by the reset.

    Inverts ``w = -(z - sign(z) l1) / ((beta + sqrt(n)) / lr + l2)`` (0 where ``|z| <= l1``):
    ``z = -w d - sign(w) l1``.
    """
    n = state["n"]
    w = p.detach().to(n.dtype)
    denominator = (n.sqrt() + float(group["beta"])) / float(group["lr"]) + float(group["l2"])
    state["z"].copy_(-w * denominator - torch.sign(w) * float(group["l1"]))


def rollback(checkpointer: Any, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any = None, at_or_before: int) -> Any:
    """Restore the newest checkpoint with step <= ``at_or_before`` that verifies.

    Loads the model, the optimizer and the scheduler (not the RNG states); returns
    the checkpoint's ``CheckpointInfo``. Checkpoints that fail verification are
    passed over for older ones. Raises :class:`ActionUnavailable` when there is none.
    """
    from gradguard.ckpt import CheckpointCorruptError, CheckpointError
    from gradguard.ckpt.commit import step_name

    try:
        checkpointer.wait()  # a save in flight is part of the history
    except CheckpointError as err:
        refused = f"; the last background save failed: {err}"
    else:
        refused = ""
    candidates = sorted((s for s in checkpointer.steps() if s <= at_or_before), reverse=True)
    problems = []
    for step in candidates:
        try:
            return checkpointer.restore(model=model, optimizer=optimizer, scheduler=scheduler,
                                        path=step_name(step), rng=False)
        except CheckpointCorruptError as err:
            problems.append(f"step {step}: {str(err).splitlines()[0]}")
    available = checkpointer.steps()
    detail = "; ".join(problems) if problems else (
        f"checkpoints exist at steps {available[:5]}{'...' if len(available) > 5 else ''}"
        if available else "there are no checkpoints")
    raise ActionUnavailable(f"no checkpoint at or before step {at_or_before} that verifies "
                            f"({detail}){refused}")
