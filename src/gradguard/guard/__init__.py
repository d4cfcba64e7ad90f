"""gradguard.guard: detect the known optimizer failure modes during training and act on them.

``guard = Guard(optimizer, policy=..., checkpointer=..., recorder=..., model=...)``, then
``guard.step(loss)`` where the loop called ``optimizer.step()``. Before the step,
one pass over the gradients gives the global norm, non-finite detection and the
clip coefficient (folded into the fused kernels' ``grad_scale`` / ``found_inf``);
after it, detectors that are pure functions of recent history (loss and
gradient-norm spikes, divergence, plateau, learning-rate starvation, accumulator
overflow risk) trigger the actions a declarative :class:`Policy` names (skip,
clip, lr backoff, accumulator reset, rollback to a checkpoint, stop, alert),
with escalation rules. Every detection and action is one JSONL record in the
audit log. See ``docs/guard.md``.
"""

from . import detectors
from .actions import ActionUnavailable, TrainingHalted, lr_backoff, reset_accumulators, rollback
from .audit import AuditLog, read_audit
from .detectors import Detection
from .guard import Guard, StepResult, gradient_sum_of_squares
from .policy import ACTIONS, DETECTOR_SPECS, Escalation, Policy, PolicyError

__all__ = [
    "ACTIONS",
    "DETECTOR_SPECS",
    "ActionUnavailable",
    "AuditLog",
    "Detection",
    "Escalation",
    "Guard",
    "Policy",
    "PolicyError",
    "StepResult",
    "TrainingHalted",
    "detectors",
    "gradient_sum_of_squares",
    "lr_backoff",
    "read_audit",
    "reset_accumulators",
    "rollback",
]
