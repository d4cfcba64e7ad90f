"""What the framework integrations share.

* :class:`GuardedStep` routes the ``optimizer.step(closure)`` calls a framework
  makes itself through ``guard.step(loss)``, so that the guard decides on the
  gradients the framework computed and a skipped step is really not applied;
* :class:`MetricBuffer` is a gradguard :class:`~gradguard.watch.Sink` that keeps
  the latest value of every recorded metric, flattened to ``prefix/group/name``,
  until the integration hands them to the framework's logger;
* :func:`missing_extra` is the error raised when a framework is not installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.guard import Guard, StepResult
from gradguard.watch import Recorder, Sink
from gradguard.watch.record import RUN_GROUP, Record

LossValue = float | Tensor | None
"""A loss as the guard takes it: a number, a 0-dim tensor, or None (gradients only)."""

STATE_VERSION = 1
"""Version of the state the integrations save next to a framework checkpoint."""

_MISSING = object()


def missing_extra(module: str, package: str, extra: str, cause: BaseException) -> ImportError:
    """The ImportError for an integration whose framework is not installed, naming the extra."""
    return ImportError(
        f"{module} needs the optional package {package!r}, which is not installed or failed "
        f"to import ({cause}); install it with: pip install 'gradguard[{extra}]'")


def flatten(record: Record, prefix: str) -> dict[str, float]:
    """A record's metrics as flat scalar names: ``prefix + [group/] + name [+ /quantile]``.

    Run-wide values (group ``"all"``: the loss, the gradient norm, guard counters)
    carry no group part; distributions give one entry per quantile.
    """
    base = prefix if record.group == RUN_GROUP else f"{prefix}{record.group}/"
    out: dict[str, float] = {}
    for name, value in record.metrics.items():
        if isinstance(value, Mapping):
            for quantile, number in value.items():
                out[f"{base}{name}/{quantile}"] = float(number)
        else:
            out[f"{base}{name}"] = float(value)
    return out


class MetricBuffer(Sink):
    """A sink that keeps the latest value of every metric until :meth:`drain` takes them.

    ``urgent`` turns True when a record worth sending at once arrives: a sampled or
    full-tier emission (rare by construction), a guard action counter, or a
    non-finite gradient count above zero.
    """

    def __init__(self, prefix: str = "gradguard/") -> None:
        self.prefix = prefix
        self.values: dict[str, float] = {}
        self.urgent = False

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            self.values.update(flatten(record, self.prefix))
            if "sampled" in record.tiers or "full" in record.tiers:
                self.urgent = True
            for name, value in record.metrics.items():
                if name.startswith("guard_") or (
                        name == "nonfinite_gradients" and isinstance(value, (int, float))
                        and value != 0):
                    self.urgent = True

    def add(self, values: Mapping[str, float]) -> None:
        """Add values computed outside the recorder (names are taken as they are)."""
        self.values.update(values)

    def drain(self) -> dict[str, float]:
        """The values kept since the last drain; the buffer is empty afterwards."""
        values, self.values, self.urgent = self.values, {}, False
        return values


def build(what: Any, kind: type, optimizer: torch.optim.Optimizer | None, *context: Any,
          ) -> tuple[Any, bool]:
    """``what`` itself when it is a ``kind`` instance, else ``what(optimizer, *context)``.

    Returns the object and whether the integration built it (and so owns it).
    """
    if what is None or isinstance(what, kind):
        return what, False
    if not callable(what):
        raise TypeError(f"expected a {kind.__name__}, a function (optimizer, ...) -> "
                        f"{kind.__name__}, or None; got {what!r}")
    if optimizer is None:
        raise ValueError(f"cannot build the {kind.__name__}: the trainer has no optimizer")
    made = what(optimizer, *context)
    if not isinstance(made, kind):
        raise TypeError(f"the {kind.__name__} factory returned {made!r}, not a {kind.__name__}")
    return made, True


def check_optimizer(obj: Recorder | Guard | None, optimizers: Sequence[Any], name: str,
                    ) -> None:
    """Raise if ``obj`` watches an optimizer the framework does not step."""
    if obj is None:
        return
    if not any(obj.optimizer is opt for opt in optimizers):
        raise ValueError(
            f"the {name}'s optimizer ({type(obj.optimizer).__name__} at {id(obj.optimizer):#x}) "
            "is not one of the optimizers this trainer steps; build the "
            f"{name} on the optimizer the trainer uses, or pass a factory "
            f"(a function (optimizer, model) -> {name.capitalize()}) instead")


def link(recorder: Recorder | None, guard: Guard | None, scheduler: Any) -> None:
    """Give the guard the recorder and the LR scheduler when it has none of its own.

    The recorder then receives the gradient norm every step and counts the guard's
    actions; the scheduler's ``base_lrs`` follow an ``lr_backoff``.
    """
    if guard is None:
        return
    if guard.recorder is None and recorder is not None and recorder.optimizer is guard.optimizer:
        guard.recorder = recorder
    if (guard.scheduler is None and scheduler is not None
            and getattr(scheduler, "optimizer", None) is guard.optimizer):
        guard.scheduler = scheduler


def loss_number(loss: LossValue) -> float | None:
    """``loss`` as a Python float (None stays None); reading a tensor synchronises."""
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        return float(loss.detach().reshape(()).item())
    return float(loss)


class GuardedStep:
    """Routes a framework's ``optimizer.step(closure)`` through ``guard.step(loss)``.

    Lightning and the Hugging Face Trainer call ``optimizer.step`` themselves
    (Lightning with a closure that runs the forward and backward pass inside the
    step). :meth:`install` puts a ``step`` on the optimizer instance that

    1. runs the closure, if one is given (the gradients now exist);
    2. drops the step if a rollback asked to skip batches (``guard.skip_batch()``);
    3. calls ``guard.step(loss)``: the guard measures the gradients, decides, and
       calls the optimizer's real ``step`` only for a step it applies, so a
       skipped step leaves parameters, state and step counters untouched and the
       recorder's hooks do not run.

    ``loss`` turns the closure's return value into the loss the guard judges
    (integrations collect it from the framework's hooks). ``guard.step`` is
    wrapped as well, so that a direct ``guard.step(loss)`` call (Lightning's
    manual optimization) reaches the optimizer's real ``step`` and is recorded
    like the routed ones; ``check_direct`` may refuse such a call. :meth:`remove`
    puts both methods back; ``on_error`` runs when ``guard.step`` raises (the
    guard's ``TrainingHalted`` ends training), before the error propagates.
    """

    def __init__(self, guard: Guard, loss: Callable[[Any], LossValue] | None = None, *,
                 check_direct: Callable[[], None] | None = None,
                 on_error: Callable[[], None] | None = None) -> None:
        self.guard = guard
        self.optimizer = guard.optimizer
        self._loss = loss
        self._check_direct = check_direct
        self._on_error = on_error
        self._depth = 0
        self._saved_optimizer_step: Any = _MISSING
        self._saved_guard_step: Any = _MISSING
        self._optimizer_original: Callable[..., Any] = self.optimizer.step
        self._guard_original: Callable[..., StepResult] = guard.step
        self._routed_optimizer_step: Callable[..., Any] = self._optimizer_step
        self._routed_guard_step: Callable[..., StepResult] = self._guard_step
        self.installed = False
        self.last_result: StepResult | None = None
        """What the latest guard step did."""
        self.pending_loss: tuple[int, LossValue] | None = None
        """(recorder step, loss) of the latest guard step, until the integration logs it."""
        self.dropped = 0
        """Steps not applied because a rollback asked to skip batches."""

    @property
    def optimizer_step(self) -> Callable[..., Any]:
        """The ``step`` that :meth:`install` puts on the optimizer."""
        return self._routed_optimizer_step

    @property
    def real_step(self) -> Callable[..., Any]:
        """The optimizer's own ``step``, as it was before :meth:`install`."""
        return self._optimizer_original

    def install(self) -> None:
        """Put the routing ``step`` on the optimizer and the wrapped ``step`` on the guard."""
        if self.installed:
            return
        opt, guard = self.optimizer, self.guard
        self._saved_optimizer_step = opt.__dict__.get("step", _MISSING)
        self._saved_guard_step = guard.__dict__.get("step", _MISSING)
        self._optimizer_original = opt.step
        self._guard_original = guard.step

        def optimizer_step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            return self._optimizer_step(closure, **kwargs)

        def guard_step(loss: LossValue = None, closure: Callable[[], Any] | None = None,
                       ) -> StepResult:
            return self._guard_step(loss, closure)

        # keep what the replaced step carried: torch's LR schedulers mark the step they
        # wrapped (``_wrapped_by_lr_sched``) and warn when it is replaced
        functools.update_wrapper(optimizer_step, self._optimizer_original)
        functools.update_wrapper(guard_step, self._guard_original)
        self._routed_optimizer_step, self._routed_guard_step = optimizer_step, guard_step
        opt.step = optimizer_step  # type: ignore[method-assign]
        guard.step = guard_step  # type: ignore[method-assign]
        self.installed = True

    def remove(self) -> None:
        """Put the optimizer's and the guard's own ``step`` back (idempotent)."""
        if not self.installed:
            return
        for obj, saved, ours in ((self.optimizer, self._saved_optimizer_step,
                                  self._routed_optimizer_step),
                                 (self.guard, self._saved_guard_step, self._routed_guard_step)):
            if obj.__dict__.get("step") is ours:
                if saved is _MISSING:
                    del obj.__dict__["step"]
                else:
                    obj.__dict__["step"] = saved
        self.installed = False

    # ------------------------------------------------------------------ steps
    def _optimizer_step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if self._depth > 0:  # the guard applying its decision: the real step
            return self._optimizer_original(closure, **kwargs)
        if kwargs:
            raise TypeError(
                f"the guarded optimizer step takes no keyword arguments (got "
                f"{sorted(kwargs)}): gradguard's guard passes its own clip divisor and skip "
                "flag to the optimizer")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.guard.skip_batch():  # a rollback asked to skip this batch: not applied
            self.dropped += 1
            return loss
        judged = self._loss(loss) if self._loss is not None else loss
        self._run(judged, None)
        return loss

    def _guard_step(self, loss: LossValue = None, closure: Callable[[], Any] | None = None,
                    ) -> StepResult:
        if self._depth > 0:
            return self._guard_original(loss, closure)
        if self._check_direct is not None:
            self._check_direct()
        return self._run(loss, closure)

    def _run(self, loss: LossValue, closure: Callable[[], Any] | None) -> StepResult:
        recorder = self.guard.recorder
        at = recorder.step + 1 if isinstance(recorder, Recorder) else self.guard.step_count + 1
        if isinstance(loss, Tensor):
            loss = loss.detach()
        self._depth += 1
        try:
            result = self._guard_original(loss, closure)
        except BaseException:
            # TrainingHalted (or anything else) ends training: let the integration detach
            if self._on_error is not None:
                self._on_error()
            raise
        finally:
            self._depth -= 1
        self.last_result = result
        self.pending_loss = (at, loss)
        return result


class LossAccumulator:
    """Sums the losses of the micro-batches of one optimizer step, on their device."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, loss: Tensor) -> None:
        value = loss.detach().reshape(()).to(torch.float32)
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def reset(self) -> None:
        self.total, self.count = None, 0

    def take(self, *, mean: bool) -> Tensor | None:
        """The sum (``mean=False``) or mean of the losses since the last reset; then reset."""
        total, count = self.total, self.count
        self.reset()
        if total is None:
            return None
        return total / count if mean and count > 1 else total


def guard_values(guard: Guard, prefix: str) -> dict[str, float]:
    """The guard's running action counts, for a run without a recorder."""
    values = {f"{prefix}guard_{action}_total": float(n) for action, n in guard.counts.items()}
    return values


def result_values(result: StepResult | None, prefix: str) -> dict[str, float]:
    """The gradient norm and whether the step was applied, from a guard step's result."""
    if result is None:
        return {}
    values = {f"{prefix}step_applied": float(result.applied)}
    if result.grad_norm is not None:
        values[f"{prefix}grad_norm"] = float(result.grad_norm)
    return values


class GuardedCallback:
    """What both framework callbacks share: the guard's and recorder's state, and their release.

    The subclass sets ``guard``, ``recorder``, ``_routing`` (a :class:`GuardedStep`
    or None), ``_pending_state``, ``_owns_guard``, ``_owns_recorder``, ``_buffer``
    (its :class:`MetricBuffer`), ``_losses`` (a :class:`LossAccumulator`),
    ``_step_loss``, ``log_loss`` and ``prefix``.
    """

    guard: Guard | None
    recorder: Recorder | None
    _routing: GuardedStep | None
    _pending_state: dict[str, Any] | None
    _owns_guard: bool
    _owns_recorder: bool
    _buffer: MetricBuffer
    _losses: LossAccumulator
    _step_loss: Any
    log_loss: bool
    prefix: str

    @property
    def last_result(self) -> StepResult | None:
        """What the guard did at the latest optimizer step (None before the first)."""
        return self._routing.last_result if self._routing is not None else None

    def _log_loss(self) -> None:
        """Log the loss of the step just taken to the recorder: the routed step's loss
        (the guard judged it), or, with a recorder only, the loss the callback saw."""
        pending: tuple[int, LossValue] | None = None
        if self._routing is not None:
            pending, self._routing.pending_loss = self._routing.pending_loss, None
        else:  # recorder only: the loss of the step just applied
            if self._step_loss is not None and self.recorder is not None:
                pending = (self.recorder.step, self._step_loss)
            self._step_loss = None
        if (pending is not None and pending[1] is not None and self.recorder is not None
                and self.log_loss):
            self.recorder.log(pending[0], loss=pending[1])

    def _buffer_guard_values(self) -> None:
        """Without a recorder, the guard's own values go to the framework's logger."""
        if self.guard is not None and self.recorder is None:
            self._buffer.add(guard_values(self.guard, self.prefix))
            self._buffer.add(result_values(self.last_result, self.prefix))

    def _state_values(self) -> dict[str, Any]:
        """The guard's history and the recorder's step count (or what waits to be applied)."""
        state: dict[str, Any] = {"version": STATE_VERSION}
        pending = self._pending_state or {}
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        elif pending.get("guard") is not None:
            state["guard"] = pending["guard"]
        if self.recorder is not None:
            state["recorder"] = {"step": int(self.recorder.step)}
        elif pending.get("recorder") is not None:
            state["recorder"] = pending["recorder"]
        return state

    def _load_state_values(self, state: Mapping[str, Any], who: str) -> None:
        """Keep ``state`` to apply now, or once the guard and recorder exist."""
        version = int(state.get("version", STATE_VERSION))
        if version > STATE_VERSION:
            raise ValueError(f"{who} state version {version} is newer than this gradguard reads "
                             f"({STATE_VERSION}); upgrade gradguard")
        self._pending_state = dict(state)
        self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state = self._pending_state
        if state is None:
            return
        if state.get("guard") is not None and self.guard is not None:
            self.guard.load_state_dict(state["guard"])
            state["guard"] = None
        if state.get("recorder") is not None and self.recorder is not None:
            self.recorder.step = int(state["recorder"]["step"])
            state["recorder"] = None
        if state.get("guard") is None and state.get("recorder") is None:
            self._pending_state = None

    def _release(self) -> None:
        """Give the optimizer its own step back; flush (or close what we built) guard, recorder."""
        if self._routing is not None:
            self._routing.remove()  # kept: last_result stays readable after training
        if self.guard is not None:
            self.guard.flush()
            if self._owns_guard:
                self.guard.close()
        if self.recorder is not None:
            if self._buffer in self.recorder.sinks:
                self.recorder.sinks.remove(self._buffer)
            if self._owns_recorder:
                self.recorder.close()
            else:
                self.recorder.flush()
        self._losses.reset()
        self._step_loss = None
