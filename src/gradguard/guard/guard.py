"""The guard: ``guard.step(loss)`` instead of ``optimizer.step()``, like ``GradScaler.step``.

One call does, in order:

1. **one pass over the gradients**: the global sum of squares (BLAS dot
   products for large tensors, torch's foreach norm for the rest), which gives
   the global norm, non-finite detection (NaN/Inf anywhere makes it non-finite)
   and the clipping coefficient;
2. **pre-step detectors** (``nonfinite``, ``loss_spike``, ``grad_spike``) and
   their actions: a skipped step never reaches the optimizer, so parameters,
   state and step counters stay unchanged;
3. **the step**: ``optimizer.step(grad_scale=...)`` with the clip divisor going
   into the fused kernel (no second pass over the gradients);
4. **post-step detectors** on their cadences (``divergence``, ``starvation``,
   ``accumulator_risk``, ``plateau``) and their actions; then the escalation
   rules (e.g. three consecutive skips -> rollback, three rollbacks -> stop).

Every detection and action goes to the audit log and, when a recorder is
given, the gradient norm and non-finite count go to its sinks every step and
each guard action is counted there.

On CUDA (``sync=False``, the default there) nothing in 1-3 waits for the
device: the non-finite flag and the spike tests become the kernels'
``found_inf`` and the clip divisor their ``grad_scale``, computed on the device
from thresholds the host already knows; the numbers are copied back without
blocking and judged at the start of the next ``guard.step`` (or ``flush()``),
so logging and remedies (rollback, stop, ...) act one step later.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from gradguard.optim.base import Optimizer as GradguardOptimizer
from gradguard.optim.base import StepScaling, device_dtype_runs

from . import actions as act
from . import detectors as det
from .audit import AuditLog
from .policy import Escalation, Policy

log = logging.getLogger("gradguard.guard")

T = TypeVar("T")

DOT_MIN_NUMEL = 1 << 15
"""Gradients at least this large (contiguous float32/float64) are reduced with ``torch.dot``."""

SUGGESTIONS: dict[str, str] = {
    "nonfinite": "look at the batches of the skipped steps (audit log), lower the learning "
                 "rate, raise eps, enable clipping (clip_norm) or loss scaling (F2)",
    "loss_spike": "lower the learning rate, enable clipping (clip_norm), roll back further "
                  "(actions.rollback.min_age) and skip more batches (F8)",
    "grad_spike": "enable clipping (clip_norm) or lower the learning rate (F2, F8)",
    "divergence": "lower the learning rate (actions.rollback.lr_factor) or check the data (F8)",
    "starvation": "reset the accumulators, raise the learning rate, or use RMSprop/Adam for "
                  "this parameter group (F1, F7)",
    "plateau": "stop early or change the learning-rate schedule (F5, F7)",
    "accumulator_risk": "keep optimizer state in float32 (state_dtype=torch.float32) (F2)",
    "overfitting": "regularise, clip, or give rare features their own group settings (F4)",
}

PRE_STEP = ("nonfinite", "loss_spike", "grad_spike")


@dataclass(frozen=True)
class StepResult:
    """What one ``guard.step`` did."""

    step: int
    """The guard step (after a rollback: the restored checkpoint's step)."""
    applied: bool
    """Whether the optimizer step was applied (``sync=False``: whether it went to the
    optimizer; the device may still skip it, which the next call's records tell)."""
    loss: float | None
    grad_norm: float | None
    """Global L2 norm of the gradients before clipping (None: not read yet, ``sync=False``)."""
    clipped: bool
    actions: tuple[str, ...] = ()
    """Actions taken during this call (``skip``, ``clip``, ``rollback``, ...)."""
    rolled_back_to: int | None = None


@dataclass
class _Rule:
    """Escalation state of one rule."""

    rule: Escalation
    count: int = 0
    first_step: int | None = None
    calls: deque[tuple[int, int]] = field(default_factory=deque)  # (call, step)


@dataclass
class _Pending:
    """A step whose numbers are still on their way back from the device (``sync=False``)."""

    step: int
    values: Tensor  # loss, norm, skipped, divisor (on the host, maybe not yet written)
    event: Any
    loss_given: bool
    loss_threshold: tuple[float, det.Evidence] | None
    norm_threshold: tuple[float, det.Evidence] | None
    snapshot: tuple[Tensor, Tensor] | None


def gradient_sum_of_squares(grads: Sequence[Tensor]) -> Tensor:
    """Sum of the squares of every gradient element, as a 0-dim tensor: one read pass.

    Large contiguous float32/float64 gradients are reduced with ``torch.dot``
    (BLAS, the fastest read-only reduction on CPU), the rest with
    ``torch._foreach_norm`` (in float32 for half-precision gradients). Any NaN or
    Inf makes the result non-finite; so does a float32 sum beyond ~3.4e38.
    The result is on the first gradient's device, in float64 if any gradient is.
    """
    dtype = (torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    device = grads[0].device
    parts: list[Tensor] = []
    rest: list[Tensor] = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce().values()
        if (g.dtype in (torch.float32, torch.float64) and g.numel() >= DOT_MIN_NUMEL
                and g.is_contiguous()):
            flat = g.view(-1)
            parts.append(torch.dot(flat, flat))
        else:
            rest.append(g)
    for run in device_dtype_runs(rest):
        tensors = [rest[i] for i in run]
        wide = None if tensors[0].dtype in (torch.float32, torch.float64) else torch.float32
        norms = torch._foreach_norm(tensors, 2, dtype=wide)
        parts.append(torch.stack(norms).square().sum())
    if len(parts) == 1:
        return parts[0].to(device=device, dtype=dtype)
    return torch.stack([p.to(device=device, dtype=dtype) for p in parts]).sum()


class Guard:
    """Detects the known optimizer failure modes around each step and acts on them.

    Args:
        optimizer: any ``torch.optim.Optimizer``; gradguard's fused optimizers take
            the clip divisor and the skip flag inside their kernels.
        policy: a :class:`~gradguard.guard.Policy`, a mapping for
            :meth:`Policy.from_mapping`, a path to a TOML/JSON file, or None
            (:meth:`Policy.default`).
        checkpointer: a :class:`gradguard.ckpt.Checkpointer` for ``rollback``.
        recorder: a :class:`gradguard.watch.Recorder`; receives the gradient norm
            and non-finite count every step and counts guard actions.
        model: the model, needed by ``rollback`` to restore the parameters.
        scheduler: an LR scheduler: restored on rollback; its ``base_lrs`` follow
            lr cuts.
        audit: where the JSONL audit log goes (a path), an :class:`AuditLog`, or
            None (records kept in memory only, ``guard.audit.records``).
        sync: True reads the gradient norm and loss on the host every step
            (decisions at once); False keeps decisions on the device and judges one
            step later (no host synchronisation); None: True on CPU, False otherwise.
        start_step: steps already done (when resuming); the first call is step
            ``start_step + 1``.
        seed: seed of the coordinate sample used to measure update sizes.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Policy | Mapping[str, Any] | str
                 | None = None, checkpointer: Any = None, recorder: Any = None, *,
                 model: torch.nn.Module | None = None, scheduler: Any = None,
                 audit: AuditLog | str | Any = None, sync: bool | None = None,
                 start_step: int = 0, seed: int = 0) -> None:
        self.optimizer = optimizer
        self.policy = _as_policy(policy)
        self.checkpointer = checkpointer
        self.recorder = recorder
        self.model = model
        self.scheduler = scheduler
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        if checkpointer is not None and model is None and self.policy.uses("rollback"):
            raise ValueError("Guard: the policy can roll back (" + ", ".join(
                _where_used(self.policy, "rollback")) + ") and a checkpointer is given, but no "
                "model: pass model=... so that a rollback restores the parameters")
        self._sync = sync
        self.step_count = int(start_step)
        """Guard steps so far: each ``step()`` call is one, applied or skipped."""
        self.counts: dict[str, int] = {}
        """How many guard steps took each action (a step skipped for two reasons counts once)."""
        self.detections: dict[str, int] = {}
        """How often each detector fired."""
        p = self.policy
        self._loss_window: deque[float] = deque(maxlen=p.detector("loss_spike")["window"])
        self._norm_window: deque[float] = deque(maxlen=p.detector("grad_spike")["window"])
        history = max(p.detector("divergence")["history"], p.detector("starvation")["window"],
                      p.detector("plateau")["every"])
        self._losses: deque[tuple[int, float]] = deque(maxlen=history)
        self._start_loss: float | None = None
        """Median loss of the run's first divergence window (how far training has come)."""
        starve = p.detector("starvation")
        self._updates: deque[tuple[int, float, float]] = deque(
            maxlen=max(1, starve["window"] // starve["every"]))
        self._evals: list[tuple[int, float, float | None]] = []
        self._eval_fired: dict[str, int] = {}
        self._loss_evals: list[float] = []
        self._rules = [_Rule(rule) for rule in p.escalation]
        self._calls = 0
        self._lr_cooldown_until = -1
        self._skip_batches = 0
        self._skipped_batches = 0
        self._indices: dict[tuple[int, int], tuple[torch.Size, Tensor]] = {}
        self._seed = int(seed)
        self._pending: _Pending | None = None
        self._halted = False
        self._stale_grads = False
        self._closure: Callable[[], Any] | None = None

    # ================================================================ step
    def step(self, loss: float | Tensor | None = None,
             closure: Callable[[], Any] | None = None) -> StepResult:
        """Guard one optimizer step: measure, decide, step (or not), detect, act.

        ``loss`` is this batch's training loss (a number or a tensor; None turns
        the loss detectors off for this step). ``closure`` goes to
        ``optimizer.step`` for optimizers that re-evaluate the loss (line search);
        the guard judges the gradients present when it is called. Raises
        :class:`TrainingHalted` when the policy says ``stop``.
        """
        if self._halted:
            raise RuntimeError("Guard: training was halted; this guard takes no more steps")
        taken: list[str] = []
        rolled_back = self._settle(taken)
        # after a rollback found now, this call's gradients belong to the abandoned state
        self._stale_grads = self._stale_grads or rolled_back is not None
        self._calls += 1
        self.step_count += 1
        step = self.step_count
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        loss_t = loss.detach().reshape(()) if isinstance(loss, Tensor) else None
        self._closure = closure
        if self._stale_grads or not grads:
            return self._skip_stale(step, loss, grads, taken, rolled_back)
        sumsq = gradient_sum_of_squares(grads)
        if not self._immediate(grads):
            self._step_on_device(step, loss_t if loss_t is not None else loss, sumsq,
                                 grads[0].device)
            self._escalate(step, taken)
            return StepResult(step, True, None, None, False, tuple(taken), rolled_back)

        loss_v = _as_float(loss)
        norm = math.sqrt(float(sumsq))
        pre = self._pre_step_detections(loss_v, norm, grads)
        self._observe_gradients(norm, pre, grads)
        skip = any(action == "skip" for _, action in pre)
        divisor = self._clip_divisor(norm, pre)
        rollback_to = None
        for detection, action in pre:
            outcome = self._act(step, detection, action, onset=step, taken=taken,
                                clip_divisor=divisor)
            if action == "rollback":
                # restored: the gradients belong to the state we left; unavailable: the
                # policy judged this batch too bad to learn from, so it is not applied either
                skip = True
                if outcome.startswith("restored"):
                    rollback_to = self.step_count
        applied = not skip
        if applied:
            snapshot = self._snapshot(step)
            scale = None
            if divisor is not None:
                scale = torch.tensor(divisor, dtype=torch.float32, device=grads[0].device)
            self._optimizer_step(scale, None)
            if loss_v is not None and math.isfinite(loss_v):
                self._loss_window.append(loss_v)
                self._losses.append((step, loss_v))
            if math.isfinite(norm):
                self._norm_window.append(norm)
            self._post_step(step, snapshot, taken)
        self._escalate(step, taken)
        return StepResult(self.step_count, applied, loss_v, norm, applied and divisor is not None,
                          tuple(taken), rollback_to if rollback_to is not None else rolled_back)

    def _immediate(self, grads: Sequence[Tensor]) -> bool:
        if self._sync is not None:
            return self._sync
        return grads[0].device.type == "cpu"

    def _skip_stale(self, step: int, loss: float | Tensor | None, grads: list[Tensor],
                    taken: list[str], rolled_back: int | None) -> StepResult:
        why = ("the gradients were computed before a rollback" if self._stale_grads
               else "no parameter has a gradient")
        self._stale_grads = False
        if grads:
            self._log(step, det.Detection("rollback", f"step not applied: {why}"), "skip",
                      "skipped")
            self._count("skip")
            taken.append("skip")
        self._escalate(step, taken)
        return StepResult(step, False, _as_float(loss), None, False, tuple(taken), rolled_back)

    # ------------------------------------------------------- pre-step
    def _pre_step_detections(self, loss: float | None, norm: float, grads: Sequence[Tensor],
                             ) -> list[tuple[det.Detection, str]]:
        p = self.policy
        found: list[tuple[det.Detection, str]] = []
        if p.enabled("nonfinite"):
            count = _count_nonfinite(grads) if not math.isfinite(norm) else None
            bad = det.nonfinite(loss, norm, count)
            if bad is not None:
                return [(bad, p.detector("nonfinite").action)]
        elif not (math.isfinite(norm) and (loss is None or math.isfinite(loss))):
            # the principle holds whatever the policy says: nothing non-finite gets in
            bad = det.nonfinite(loss, norm, _count_nonfinite(grads))
            return [(bad, "skip")] if bad is not None else []
        if loss is not None and p.enabled("loss_spike"):
            d = p.detector("loss_spike")
            spike = det.loss_spike(loss, self._loss_window, sigmas=d["sigmas"],
                                   warmup=d["warmup"], method=d["method"])
            if spike is not None:
                found.append((spike, d.action))
        if p.enabled("grad_spike"):
            d = p.detector("grad_spike")
            spike = det.grad_spike(norm, self._norm_window, sigmas=d["sigmas"],
                                   warmup=d["warmup"], method=d["method"])
            if spike is not None:
                found.append((spike, d.action))
        return found

    def _clip_divisor(self, norm: float, pre: Sequence[tuple[det.Detection, str]],
                      ) -> float | None:
        if not math.isfinite(norm):
            return None
        divisors = []
        if self.policy.clip_norm is not None:
            divisors.append(act.clip_divisor(norm, self.policy.clip_norm))
        for detection, action in pre:
            if action == "clip":
                divisors.append(act.clip_divisor(norm, float(detection.evidence["threshold"]
                                                             or norm)))
        present = [d for d in divisors if d is not None]
        return max(present) if present else None

    def _observe_gradients(self, norm: float, pre: Sequence[tuple[det.Detection, str]],
                           grads: Sequence[Tensor]) -> None:
        if self.recorder is None:
            return
        count = 0
        for detection, _ in pre:
            if detection.detector == "nonfinite":
                count = int(detection.evidence.get("nonfinite_gradients") or 0)
        self.recorder.observe_gradients(norm=norm, nonfinite=count)

    # ------------------------------------------------------ device path
    def _step_on_device(self, step: int, loss: Tensor | float | None, sumsq: Tensor,
                        device: torch.device) -> None:
        p = self.policy
        norm = sumsq.sqrt().to(torch.float32)
        bad = ~torch.isfinite(norm)
        loss_t = None
        if loss is not None:
            loss_t = torch.as_tensor(loss, dtype=torch.float32).to(device, non_blocking=True)
            bad = bad | ~torch.isfinite(loss_t)
        skip = bad
        loss_bound = norm_bound = None
        if loss_t is not None and p.enabled("loss_spike"):
            d = p.detector("loss_spike")
            loss_bound = det.upper_bound(self._loss_window, sigmas=d["sigmas"],
                                         warmup=d["warmup"], method=d["method"])
            if loss_bound is not None and d.action == "skip":
                skip = skip | (loss_t > loss_bound[0])
        divisor = torch.ones((), dtype=torch.float32, device=device)
        clipping = p.clip_norm is not None
        if p.clip_norm is not None:
            divisor = torch.maximum(divisor, (norm + act.CLIP_EPS) / p.clip_norm)
        if p.enabled("grad_spike"):
            d = p.detector("grad_spike")
            norm_bound = det.upper_bound(self._norm_window, sigmas=d["sigmas"],
                                         warmup=d["warmup"], method=d["method"])
            if norm_bound is not None and d.action == "skip":
                skip = skip | (norm > norm_bound[0])
            elif norm_bound is not None and d.action == "clip":
                clipping = True
                divisor = torch.maximum(divisor, (norm + act.CLIP_EPS) / norm_bound[0])
        found_inf = skip.to(torch.float32)
        snapshot = self._snapshot(step)
        self._optimizer_step(divisor if clipping else None, found_inf)
        nan = torch.full((), math.nan, dtype=torch.float32, device=device)
        packed = torch.stack([loss_t if loss_t is not None else nan, norm, found_inf,
                              divisor if clipping else nan])
        host = torch.empty(4, dtype=torch.float32, pin_memory=device.type == "cuda")
        host.copy_(packed, non_blocking=True)
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending = _Pending(step, host, event, loss_t is not None, loss_bound, norm_bound,
                                 snapshot)

    def _optimizer_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """``optimizer.step`` with the clip divisor and skip flag, as the optimizer takes them.

        gradguard optimizers take keywords (see ``gradguard.optim.Optimizer.step``);
        torch.optim's fused ones take torch's ``grad_scale``/``found_inf`` attributes
        (GradScaler's protocol); for any other optimizer the flag is read on the
        host and the gradients are divided in place (one more pass).
        """
        opt, closure = self.optimizer, self._closure
        self._closure = None
        if grad_scale is None and found_inf is None:
            opt.step(closure)
        elif isinstance(opt, GradguardOptimizer):
            opt.step(closure, grad_scale=grad_scale, found_inf=found_inf)
        elif all(g.get("fused") for g in opt.param_groups):
            opt.grad_scale, opt.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
            try:
                opt.step(closure)
            finally:
                del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]
        else:
            scaling = StepScaling(grad_scale, found_inf)
            if not scaling.skipped():
                scaling.unscale_([p.grad for g in opt.param_groups for p in g["params"]
                                  if p.grad is not None])
                opt.step(closure)

    def flush(self) -> None:
        """Judge the step whose numbers are still on the device (``sync=False``); no-op otherwise.

        ``guard.step`` does this itself at its start; call it after the last step.
        """
        taken: list[str] = []
        self._settle(taken)
        self._escalate(self.step_count, taken)

    def _settle(self, taken: list[str]) -> int | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.event is not None:
            pending.event.synchronize()
        loss_v, norm, skipped, divisor = (float(v) for v in pending.values.tolist())
        loss = loss_v if pending.loss_given else None
        step = pending.step
        p = self.policy
        found: list[tuple[det.Detection, str]] = []
        # the gradients may be the next batch's by now: no element count on this path
        bad = det.nonfinite(loss, norm)
        if bad is not None:
            found.append((bad, p.detector("nonfinite").action if p.enabled("nonfinite")
                          else "skip"))
        else:
            for name, value, bound in (("loss_spike", loss, pending.loss_threshold),
                                       ("grad_spike", norm, pending.norm_threshold)):
                # the device compared float32 values with the float32-rounded bound
                if value is None or bound is None or value <= _float32(bound[0]):
                    continue
                d = p.detector(name)
                what = "loss" if name == "loss_spike" else "grad_norm"
                evidence: det.Evidence = {what: value, **bound[1]}
                found.append((det.Detection(name, f"{what} {value:.6g} above the bound "
                                                  f"{bound[0]:.6g}", evidence), d.action))
        if self.recorder is not None:  # the recorder has counted this step already
            self.recorder.observe_gradients(norm=norm, step=self.recorder.step)
        before = self.step_count
        for detection, action in found:
            if action in ("skip", "clip"):
                outcome = ("skipped on the device" if action == "skip"
                           else f"clipped on the device (divided by {divisor:.6g})")
                self._record_action(step, detection, action, outcome, taken)
            else:
                self._act(step, detection, action, onset=step, taken=taken)
        if skipped == 0.0 and self.step_count == before:
            if loss is not None and math.isfinite(loss):
                self._loss_window.append(loss)
                self._losses.append((step, loss))
            if math.isfinite(norm):
                self._norm_window.append(norm)
            self._post_step(step, pending.snapshot, taken)
        return self.step_count if self.step_count != before else None

    # ------------------------------------------------------ post-step
    def _post_step(self, step: int, snapshot: tuple[Tensor, Tensor] | None,
                   taken: list[str]) -> None:
        p = self.policy
        if snapshot is not None:
            self._measure_update(step, snapshot)
            d = p.detector("starvation")
            if len(self._updates) == self._updates.maxlen:
                window = [loss for s, loss in self._losses if s > step - d["window"]]
                found = det.starvation([u for _, u, _ in self._updates], window,
                                       max_update_ratio=d["max_update_ratio"],
                                       min_improvement=d["min_improvement"],
                                       effective_lrs=[e for _, _, e in self._updates])
                if found is not None:
                    self._updates.clear()
                    self._act(step, found, d.action, onset=step - d["window"], taken=taken)
        d = p.detector("divergence")
        if d.enabled and step % d["every"] == 0:
            losses = [loss for _, loss in self._losses][-d["history"]:]
            if self._start_loss is None and len(self._losses) >= d["window"]:
                first = det.finite([v for _, v in list(self._losses)[:d["window"]]])
                self._start_loss = statistics.median(first) if first else None
            found = det.divergence(losses, window=d["window"], rise=d["rise"],
                                   start=self._start_loss, regress=d["regress"])
            if found is not None:
                self._losses.clear()
                self._act(step, found, d.action, onset=step - d["window"], taken=taken)
        d = p.detector("accumulator_risk")
        if d.enabled and step % d["every"] == 0:
            found = det.accumulator_risk(self._accumulator_stats(),
                                         overflow_fraction=d["overflow_fraction"],
                                         underflow_fraction=d["underflow_fraction"])
            if found is not None:
                self._act(step, found, d.action, onset=step, taken=taken)
        d = p.detector("plateau")
        if d.enabled and d["source"] == "loss" and step % d["every"] == 0:
            recent = [loss for s, loss in self._losses if s > step - d["every"]]
            if recent:
                self._loss_evals.append(statistics.median(recent))
                found = det.plateau(self._loss_evals, patience=d["patience"],
                                    min_delta=d["min_delta"], mode=d["mode"])
                if found is not None:
                    self._loss_evals.clear()
                    self._act(step, found, d.action, onset=step, taken=taken)

    def observe_eval(self, value: float | Tensor, step: int | None = None) -> None:
        """Report an evaluation metric (validation loss, accuracy, ...) for plateau and overfitting.

        Runs the ``plateau`` detector (when its ``source`` is ``"eval"``) and the
        ``overfitting`` detector (evaluation worsening while the training loss falls).
        """
        taken: list[str] = []
        self._settle(taken)
        at = self.step_count if step is None else int(step)
        recent = [loss for _, loss in list(self._losses)[-50:]]
        train = statistics.median(recent) if recent else None
        self._evals.append((at, float(value), train))
        p = self.policy
        # a detector that fired judges again only after `patience` new evaluations
        d = p.detector("plateau")
        if (d.enabled and d["source"] == "eval"
                and len(self._evals) - self._eval_fired.get("plateau", 0) > d["patience"]):
            found = det.plateau([v for _, v, _ in self._evals], patience=d["patience"],
                                min_delta=d["min_delta"], mode=d["mode"])
            if found is not None:
                self._eval_fired["plateau"] = len(self._evals) - 1
                self._act(at, found, d.action, onset=at, taken=taken)
        d = p.detector("overfitting")
        with_train = [(v, t) for _, v, t in self._evals if t is not None]
        if (d.enabled and with_train
                and len(self._evals) - self._eval_fired.get("overfitting", 0) > d["patience"]):
            found = det.overfitting([v for v, _ in with_train], [t for _, t in with_train],
                                    patience=d["patience"], mode=d["mode"])
            if found is not None:
                self._eval_fired["overfitting"] = len(self._evals) - 1
                self._act(at, found, d.action, onset=at, taken=taken)
        self._escalate(at, taken)

    # ---------------------------------------------------- measurements
    def _snapshot(self, step: int) -> tuple[Tensor, Tensor] | None:
        """Sampled coordinates of the parameters before a starvation measurement step."""
        d = self.policy.detector("starvation")
        if not d.enabled or step % d["every"] != 0:
            return None
        values, weights = [], []
        for key, p in self._stepped_params():
            index = self._sample_index(key, p, d["sample_size"])
            values.append(torch.take(p.detach(), index).to(torch.float64))
            weights.append(torch.full((index.numel(),), p.numel() / index.numel(),
                                      dtype=torch.float64, device=p.device))
        if not values:
            return None
        return _cat(values), _cat(weights)

    def _measure_update(self, step: int, snapshot: tuple[Tensor, Tensor]) -> None:
        before, weights = snapshot
        d = self.policy.detector("starvation")
        after, grads = [], []
        sparse = False
        for key, p in self._stepped_params():
            index = self._sample_index(key, p, d["sample_size"])
            after.append(torch.take(p.detach(), index).to(torch.float64))
            assert p.grad is not None
            sparse = sparse or p.grad.is_sparse
            if not sparse:
                grads.append(torch.take(p.grad.detach(), index).to(torch.float64))
        if not after or sum(a.numel() for a in after) != before.numel():
            return
        moved = _cat(after) - before
        squares = [(weights * moved.square()).sum(), (weights * before.square()).sum()]
        if not sparse:  # the effective lr needs the gradient at the sample (not for sparse ones)
            squares.append((weights * _cat(grads).square()).sum())
        sums = [*torch.stack(squares).tolist(), math.nan][:3]
        update, param, grad_norm = (math.sqrt(float(v)) for v in sums)
        ratio = update / param if param > 0 else math.inf
        effective_lr = update / grad_norm if grad_norm > 0 else math.nan
        self._updates.append((step, ratio, effective_lr))

    def _stepped_params(self) -> Iterator[tuple[tuple[int, int], Tensor]]:
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.numel() > 0:
                    yield (gi, pi), p

    def _sample_index(self, key: tuple[int, int], p: Tensor, size: int) -> Tensor:
        cached = self._indices.get(key)
        if cached is not None and cached[0] == p.shape and cached[1].device == p.device:
            return cached[1]
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + key[0] * 10_007 + key[1])
        if p.numel() <= size:
            index = torch.arange(p.numel())
        else:
            index = torch.randint(p.numel(), (size,), generator=gen).unique()
        index = index.to(p.device)
        self._indices[key] = (p.shape, index)
        return index

    def _accumulator_stats(self) -> list[det.AccumulatorStats]:
        tensors: dict[str, list[Tensor]] = {}
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if (isinstance(value, Tensor) and value.dtype in (torch.float16,
                                                                      torch.bfloat16)
                            and value.numel() > 0):
                        tensors.setdefault(f"group{gi}.{key}", []).append(value)
        stats = []
        for label, values in tensors.items():
            dtype = values[0].dtype
            tiny = torch.finfo(dtype).tiny
            with torch.no_grad():
                max_abs = max(float(v.abs().max()) for v in values)
                small = sum(int((v.abs() < tiny).sum()) for v in values)
            stats.append(det.AccumulatorStats(label, str(dtype).removeprefix("torch."), max_abs,
                                              small / sum(v.numel() for v in values)))
        return stats

    # ========================================================== actions
    def _act(self, step: int, detection: det.Detection, action: str, *, onset: int,
             taken: list[str], clip_divisor: float | None = None) -> str:
        """Carry out ``action`` for ``detection``: log it, count it, return the outcome."""
        extra: dict[str, Any] = {}
        if action == "skip":
            outcome = "skipped"
        elif action == "clip":
            outcome = (f"clipped (gradients divided by {clip_divisor:.6g})"
                       if clip_divisor is not None else "not needed")
        elif action == "alert":
            level = self.policy.actions["alert"]["level"]
            log.log(logging.getLevelName(level.upper()), "guard step %d: %s: %s", step,
                    detection.detector, detection.message)
            outcome = "alerted"
        elif action == "lr_backoff":
            outcome, extra = self._lr_backoff(step)
        elif action == "reset_accumulators":
            try:
                extra = act.reset_accumulators(self.optimizer,
                                               self.policy.actions["reset_accumulators"]["scale"])
                outcome = "applied"
                self._rewarm()  # a fresh start's transient is no spike
            except act.ActionUnavailable as err:
                outcome = f"unavailable: {err}"
        elif action == "rollback":
            outcome, extra = self._rollback(onset)
        elif action == "stop":
            self._halt(step, detection, taken)
        else:  # pragma: no cover - the policy admits no other action
            raise ValueError(f"unknown action {action!r}")
        self._record_action(step, detection, action, outcome, taken, extra)
        return outcome

    def _record_action(self, step: int, detection: det.Detection, action: str, outcome: str,
                       taken: list[str], extra: Mapping[str, Any] | None = None) -> None:
        self.detections[detection.detector] = self.detections.get(detection.detector, 0) + 1
        if action not in taken:  # a step skipped for two reasons is one skipped step
            taken.append(action)
            self._count(action)
        self._log(step, detection, action, outcome, extra)

    def _log(self, step: int, detection: det.Detection, action: str, outcome: str,
             extra: Mapping[str, Any] | None = None, **fields: Any) -> None:
        evidence = dict(detection.evidence)
        if extra:
            evidence.update(extra)
        self.audit.write(step, detection.detector, action, outcome, evidence=evidence,
                         message=detection.message, **fields)
        if action != "alert":
            log.info("guard step %d: %s -> %s (%s): %s", step, detection.detector, action,
                     outcome, detection.message)

    def _count(self, action: str) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1
        if self.recorder is None:
            return
        observe = getattr(self.recorder, "observe_guard_action", None)
        if callable(observe):
            observe(action)
        else:  # a recorder without a guard counter: log the running count as a value
            self.recorder.log(self.step_count, **{f"guard_{action}_total": self.counts[action]})

    def _lr_backoff(self, step: int) -> tuple[str, dict[str, Any]]:
        settings = self.policy.actions["lr_backoff"]
        if step < self._lr_cooldown_until:
            return (f"cooling down (next backoff possible at step {self._lr_cooldown_until})",
                    {})
        evidence = act.lr_backoff(self.optimizer, settings["factor"], settings["floor"],
                                  self.scheduler)
        self._lr_cooldown_until = step + settings["cooldown"]
        return "applied", evidence

    def _rollback(self, onset: int) -> tuple[str, dict[str, Any]]:
        settings = self.policy.actions["rollback"]
        if self.checkpointer is None:
            return "unavailable: no checkpointer", {}
        assert self.model is not None
        target = onset - 1 - settings["min_age"]
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        try:
            info = act.rollback(self.checkpointer, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, at_or_before=target)
        except act.ActionUnavailable as err:
            return f"unavailable: {err}", {}
        new_lrs = [lr * settings["lr_factor"] for lr in lrs]
        act.set_lrs(self.optimizer, new_lrs, self.scheduler)
        self._skip_batches += settings["skip_batches"]
        self.step_count = int(info.step)
        self._forget_after(int(info.step))
        return (f"restored step {info.step}",
                {"restored_step": int(info.step), "path": str(info.path), "lr_before": lrs,
                 "lr_after": new_lrs, "skip_batches": settings["skip_batches"]})

    def _forget_after(self, step: int) -> None:
        """Drop history newer than ``step`` (after a rollback to it)."""
        kept = [(s, v) for s, v in self._losses if s <= step]
        self._losses.clear()
        self._losses.extend(kept)
        self._updates.clear()
        for rule in self._rules:
            rule.count, rule.first_step = 0, None

    def _rewarm(self) -> None:
        """Restart the spike statistics: the optimizer's dynamics changed (state reset)."""
        self._loss_window.clear()
        self._norm_window.clear()
        self._updates.clear()

    def _halt(self, step: int, detection: det.Detection, taken: list[str],
              cause: str | None = None) -> None:
        self._halted = True
        taken.append("stop")
        self.detections[detection.detector] = self.detections.get(detection.detector, 0) + 1
        self._count("stop")
        diagnosis = self.diagnose(step, detection, cause)
        self._log(step, detection, "stop", "halted", diagnosis=diagnosis)
        log.error("%s", diagnosis)
        if self.recorder is not None:
            self.recorder.flush()
        raise act.TrainingHalted(diagnosis, step=step, detector=detection.detector,
                                 evidence=detection.evidence, records=self.audit.records[-20:])

    def diagnose(self, step: int, detection: det.Detection, cause: str | None = None) -> str:
        """A readable account of why training should stop at ``step``."""
        lines = [f"Training halted by the gradguard guard at step {step}."]
        lines.append(f"Why: {cause or detection.message}.")
        underlying = detection
        if detection.detector == "escalation":
            record = next((r for r in reversed(self.audit.records)
                           if r["detector"] not in ("escalation", "rollback")), None)
            if record is not None:
                lines.append(f"Last detection: {record['detector']} at step {record['step']}: "
                             f"{record['message']}.")
        else:
            lines.append(f"Detected by: {underlying.detector}.")
        if self.counts:
            lines.append("Guard actions so far: " + ", ".join(
                f"{n} x {a}" for a, n in sorted(self.counts.items())) + ".")
        recent = [r for r in self.audit.records if r["action"] != "alert"][-5:]
        if recent:
            lines.append("Recent actions: " + "; ".join(
                f"step {r['step']} {r['detector']} -> {r['action']} ({r['outcome']})"
                for r in recent) + ".")
        lrs = ", ".join(f"{float(g['lr']):.3g}" for g in self.optimizer.param_groups)
        lines.append(f"Learning rate now: {lrs}.")
        root = detection.detector
        if root == "escalation":
            root = str(detection.evidence.get("last_detector", root))
        if root in SUGGESTIONS:
            lines.append(f"What to try: {SUGGESTIONS[root]}.")
        if self.audit.path is not None:
            lines.append(f"Audit log: {self.audit.path}")
        lines.append("See docs/guard.md for each failure mode and its remedies.")
        return "\n".join(lines)

    # ======================================================= escalation
    def _escalate(self, step: int, taken: list[str]) -> None:
        """Count this call's actions against the escalation rules; fire the rules that are due.

        Each rule counts a call at most once. An action an escalation takes counts
        for the rules after it in the same call (skip -> rollback -> stop cascades).
        """
        counted: set[int] = set()
        again = True
        while again:
            again = False
            for i, state in enumerate(self._rules):
                rule = state.rule
                if i in counted or rule.action not in taken:
                    continue
                counted.add(i)
                if rule.consecutive:
                    if state.count == 0:
                        state.first_step = step
                    state.count += 1
                    count = state.count
                else:
                    state.calls.append((self._calls, step))
                    while (rule.window is not None
                           and state.calls[0][0] <= self._calls - rule.window):
                        state.calls.popleft()
                    count = len(state.calls)
                    state.first_step = state.calls[0][1]
                if count < rule.count:
                    continue
                onset = state.first_step if state.first_step is not None else step
                state.count, state.first_step = 0, None
                state.calls.clear()
                how = ("in a row" if rule.consecutive else
                       f"within {rule.window} steps" if rule.window else "so far")
                cause = (f"{count} x {rule.action} {how} (escalation rule: {rule.action} x "
                         f"{rule.count} -> {rule.then})")
                detection = det.Detection("escalation", cause, {
                    "rule_action": rule.action, "count": count, "then": rule.then,
                    "consecutive": rule.consecutive, "window": rule.window,
                    "since_step": onset, "last_detector": self._last_detector()})
                if rule.then == "stop":
                    self._halt(step, detection, taken, cause)
                before = len(taken)
                self._act(step, detection, rule.then, onset=onset, taken=taken)
                again = again or len(taken) != before
        for i, state in enumerate(self._rules):
            if state.rule.consecutive and i not in counted:
                state.count, state.first_step = 0, None

    def _last_detector(self) -> str | None:
        for record in reversed(self.audit.records):
            if record["detector"] != "escalation":
                return str(record["detector"])
        return None

    # ============================================================ data
    def skip_batch(self) -> bool:
        """Whether to drop the next batch (a rollback asked for ``skip_batches``); logs the drop."""
        if self._skip_batches <= 0:
            return False
        self._skip_batches -= 1
        self._skipped_batches += 1
        self.audit.write(self.step_count, "rollback", "skip_batch", "dropped",
                         evidence={"dropped": self._skipped_batches,
                                   "remaining": self._skip_batches},
                         message="batch dropped after a rollback")
        self._count("skip_batch")
        return True

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield the batches of ``iterable``, dropping those a rollback said to skip."""
        for batch in iterable:
            if self.skip_batch():
                continue
            yield batch

    @property
    def pending_batch_skips(self) -> int:
        """Batches still to be dropped after a rollback."""
        return self._skip_batches

    # ============================================================ state
    def state_dict(self) -> dict[str, Any]:
        """The guard's history and counters (JSON-like), e.g. for a checkpoint's ``extra``."""
        self.flush()
        return {
            "step": self.step_count, "calls": self._calls, "counts": dict(self.counts),
            "detections": dict(self.detections), "loss_window": list(self._loss_window),
            "norm_window": list(self._norm_window),
            "losses": [list(x) for x in self._losses], "start_loss": self._start_loss,
            "updates": [list(x) for x in self._updates],
            "evals": [list(x) for x in self._evals], "loss_evals": list(self._loss_evals),
            "eval_fired": dict(self._eval_fired),
            "skip_batches": self._skip_batches, "lr_cooldown_until": self._lr_cooldown_until,
            "rules": [{"count": r.count, "first_step": r.first_step,
                       "calls": [list(c) for c in r.calls]} for r in self._rules],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step_count = int(state["step"])
        self._calls = int(state["calls"])
        self.counts = dict(state["counts"])
        self.detections = dict(state["detections"])
        self._loss_window.clear()
        self._loss_window.extend(state["loss_window"])
        self._norm_window.clear()
        self._norm_window.extend(state["norm_window"])
        self._losses.clear()
        self._losses.extend((int(s), float(v)) for s, v in state["losses"])
        self._start_loss = state.get("start_loss")
        self._updates.clear()
        self._updates.extend((int(s), float(u), float(e)) for s, u, e in state["updates"])
        self._evals = [(int(s), float(v), None if t is None else float(t))
                       for s, v, t in state["evals"]]
        self._loss_evals = [float(v) for v in state["loss_evals"]]
        self._eval_fired = {str(k): int(v) for k, v in state.get("eval_fired", {}).items()}
        self._skip_batches = int(state["skip_batches"])
        self._lr_cooldown_until = int(state["lr_cooldown_until"])
        for rule, saved in zip(self._rules, state["rules"], strict=False):
            rule.count, rule.first_step = int(saved["count"]), saved["first_step"]
            rule.calls = deque((int(c), int(s)) for c, s in saved["calls"])

    def close(self) -> None:
        """Judge a pending step and close the audit log."""
        self.flush()
        self.audit.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_policy(policy: Policy | Mapping[str, Any] | str | Any) -> Policy:
    if policy is None:
        return Policy.default()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_mapping(policy)
    return Policy.load(policy)


def _where_used(policy: Policy, action: str) -> list[str]:
    places = [f"detectors.{d.name}.action" for d in policy.detectors.values()
              if d.enabled and d.action == action]
    places += [f"escalation[{i}].then" for i, e in enumerate(policy.escalation)
               if e.then == action]
    return places


def _as_float(value: float | Tensor | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return float(value.detach().reshape(()).item())
    return float(value)


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _count_nonfinite(grads: Sequence[Tensor]) -> int:
    total = 0
    for g in grads:
        values = g.coalesce().values() if g.is_sparse else g
        total += int((~torch.isfinite(values)).sum())
    return total


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    device = tensors[0].device
    return torch.cat([t.to(device) for t in tensors])

