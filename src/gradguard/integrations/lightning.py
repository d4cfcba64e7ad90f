"""PyTorch Lightning: :class:`GradguardCallback` puts the flight recorder and the guard on a
``lightning.Trainer``.

``Trainer(callbacks=[GradguardCallback(recorder=..., guard=...)])``:

* the recorder's metrics go to its own sinks (JSONL, TensorBoard, ...) and to
  every Lightning logger (``trainer.loggers``), as ``gradguard/<group>/<metric>``;
* the guard decides every optimizer step on the gradients Lightning computed
  (after AMP unscaling): Lightning calls ``optimizer.step(closure)`` itself, so
  the callback routes that call through ``guard.step(loss)``
  (:class:`~gradguard.integrations._common.GuardedStep`): the closure (forward
  and backward) runs, then the guard skips, clips or applies the step;
* the guard's history and the recorder's step count are the callback's
  ``state_dict`` in every Lightning checkpoint, and gradguard optimizers' state
  is in Lightning's ``optimizer_states``: ``trainer.fit(..., ckpt_path=...)``
  continues where the run stopped.

Needs the ``lightning`` package: ``pip install 'gradguard[lightning]'``.
See ``docs/integrations.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradguard.guard import Guard
from gradguard.watch import Recorder

from ._common import (
    GuardedCallback,
    GuardedStep,
    LossAccumulator,
    LossValue,
    MetricBuffer,
    build,
    check_optimizer,
    link,
    missing_extra,
)

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.types import STEP_OUTPUT
except ImportError as err:  # the extra is not installed
    raise missing_extra("gradguard.integrations.lightning", "lightning", "lightning",
                        err) from err

__all__ = ["SHARDED_STRATEGIES", "GradguardCallback", "GuardFactory", "RecorderFactory"]

SHARDED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})
"""Strategies whose ranks hold gradient shards: the guard refuses them."""

RecorderFactory = Callable[[torch.optim.Optimizer, "pl.LightningModule"], Recorder]
"""Builds the recorder once Lightning created the optimizer: ``(optimizer, module) -> Recorder``."""

GuardFactory = Callable[[torch.optim.Optimizer, "pl.LightningModule"], Guard]
"""Builds the guard once Lightning created the optimizer: ``(optimizer, module) -> Guard``."""


class GradguardCallback(GuardedCallback, Callback):
    """The flight recorder and the guard for a Lightning ``Trainer``.

    Args:
        recorder: a :class:`~gradguard.watch.Recorder` on the optimizer that
            ``configure_optimizers`` returns, or a factory ``(optimizer, module) ->
            Recorder`` called when fitting starts (the optimizer exists only then),
            or None. A recorder the callback built is closed when fitting ends.
        guard: a :class:`~gradguard.guard.Guard` on that optimizer, a factory
            ``(optimizer, module) -> Guard``, or None. A guard without a recorder
            gets this callback's recorder; one without a scheduler gets the LR
            scheduler Lightning steps for its optimizer.
        log_every_n_steps: every-step metrics (lr, gradient norm, loss, step time)
            go to Lightning's loggers every this many steps (None: the trainer's
            ``log_every_n_steps``); sampled and full-tier emissions and guard
            actions go at once.
        prefix: prefix of the metric names in Lightning's loggers.
        log_loss: log the training loss of every step to the recorder (``loss`` in
            gradguard's sinks).
        eval_metric: the validation metric handed to ``guard.observe_eval`` after
            each validation run (the ``plateau`` and ``overfitting`` detectors), if
            it is among ``trainer.callback_metrics``; None: none.

    Factories get ``trainer.optimizers[0]``; for another optimizer of a module
    with several, pass instances built on it.
    """

    def __init__(self, recorder: Recorder | RecorderFactory | None = None,
                 guard: Guard | GuardFactory | None = None, *,
                 log_every_n_steps: int | None = None, prefix: str = "gradguard/",
                 log_loss: bool = True, eval_metric: str | None = "val_loss") -> None:
        super().__init__()
        self._recorder_arg: Recorder | RecorderFactory | None = recorder
        self._guard_arg: Guard | GuardFactory | None = guard
        self.recorder: Recorder | None = recorder if isinstance(recorder, Recorder) else None
        """The recorder (built from the factory when fitting starts)."""
        self.guard: Guard | None = guard if isinstance(guard, Guard) else None
        """The guard (built from the factory when fitting starts)."""
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.log_loss = log_loss
        self.eval_metric = eval_metric
        self._owns_recorder = False
        self._owns_guard = False
        self._buffer = MetricBuffer(prefix)
        self._routing: GuardedStep | None = None
        self._trainer: pl.Trainer | None = None
        self._losses = LossAccumulator()
        self._step_loss: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._attached = False

    # ============================================================ public API
    def state_dict(self) -> dict[str, Any]:
        """The guard's history and counters and the recorder's step count (plain values)."""
        return self._state_values()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (now, or when the guard and recorder exist)."""
        self._load_state_values(state_dict, "GradguardCallback")

    # ================================================================ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the recorder and guard, restore their state, route the optimizer step."""
        self._detach()  # left attached by a fit that failed before its teardown
        self._trainer = trainer
        optimizers = list(trainer.optimizers)
        first = optimizers[0] if optimizers else None
        if not isinstance(self._recorder_arg, Recorder):
            self.recorder, self._owns_recorder = build(self._recorder_arg, Recorder, first,
                                                       pl_module)
        if not isinstance(self._guard_arg, Guard):
            self.guard, self._owns_guard = build(self._guard_arg, Guard, first, pl_module)
        check_optimizer(self.recorder, optimizers, "recorder")
        check_optimizer(self.guard, optimizers, "guard")
        strategy = type(trainer.strategy).__name__
        if self.guard is not None and strategy in SHARDED_STRATEGIES:
            raise ValueError(
                f"GradguardCallback: the guard needs every rank to hold the full gradients "
                f"(single device or DDP); under {strategy} each rank holds a shard, so ranks "
                "would judge different gradient norms and disagree on skipping a step")
        if self.guard is not None:
            scheduler = next((c.scheduler for c in trainer.lr_scheduler_configs
                              if getattr(c.scheduler, "optimizer", None) is self.guard.optimizer),
                             None)
            link(self.recorder, self.guard, scheduler)
        self._apply_pending_state()
        if self.recorder is not None and self._buffer not in self.recorder.sinks:
            self.recorder.sinks.append(self._buffer)
        if self.guard is not None:
            if trainer.gradient_clip_val:
                warnings.warn(
                    "GradguardCallback: Trainer(gradient_clip_val=...) clips the gradients "
                    "before the guard sees them, so its gradient-norm statistics and spike "
                    "detection see clipped norms; clip with the guard's policy instead "
                    "(Guard(optimizer, {'clip_norm': ...}))", UserWarning, stacklevel=2)
            self._routing = GuardedStep(self.guard, self._judged_loss,
                                        check_direct=self._check_direct_call,
                                        on_error=self._detach)
            self._routing.install()
        self._attached = True

    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            optimizer: torch.optim.Optimizer) -> None:
        """A new optimizer step's micro-batches start: forget the previous losses."""
        self._losses.reset()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Tensor) -> None:
        """Collect the loss of each micro-batch (scaled by the GradScaler under 16-bit AMP)."""
        if self._attached:
            self._losses.add(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """The gradients are final (unscaled under AMP): fix this step's loss.

        The loss is the sum of the losses backpropagated since the previous step
        (with ``accumulate_grad_batches`` that is the mean over the accumulated
        batches, since Lightning divides each by their number), divided by the
        GradScaler's scale under 16-bit AMP. The guard judges it when Lightning
        calls the optimizer's ``step`` right after this hook (and after
        Lightning's own gradient clipping, if any).
        """
        if not self._attached:
            return
        total = self._losses.take(mean=False)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if total is not None and scaler is not None and scaler.is_enabled():
            total = total / scaler.get_scale()
        self._step_loss = total

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: STEP_OUTPUT, batch: Any, batch_idx: int) -> None:
        """Log the step's loss to the recorder and forward metrics to Lightning's loggers."""
        if not self._attached:
            return
        self._log_loss()
        self._forward(trainer, force=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hand the validation metric to the guard's plateau and overfitting detectors."""
        if (self.guard is None or self.eval_metric is None or trainer.sanity_checking
                or not self._attached):
            return
        value = trainer.callback_metrics.get(self.eval_metric)
        if value is not None:
            self.guard.observe_eval(float(value))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge a pending guard step and send what is left to the loggers."""
        if not self._attached:
            return
        if self.guard is not None:
            self.guard.flush()
        self._log_loss()
        self._forward(trainer, force=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Flush gradguard's sinks, so that what they wrote matches the checkpoint."""
        if self.recorder is not None:
            self.recorder.flush()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Warn when the checkpoint holds no optimizer state (a weights-only checkpoint)."""
        if "optimizer_states" not in checkpoint and (self._guard_arg is not None
                                                     or self._recorder_arg is not None):
            warnings.warn("GradguardCallback: this checkpoint has no optimizer state "
                          "(saved with weights_only=True?): the optimizer starts fresh, so "
                          "the resumed run does not continue the interrupted one",
                          UserWarning, stacklevel=2)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Detach (the guard's ``TrainingHalted`` ends up here too)."""
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Put the optimizer's own ``step`` back; close what the callback built."""
        if stage == "fit":
            self._detach()

    # ============================================================== helpers
    def _judged_loss(self, closure_loss: Any) -> LossValue:
        loss, self._step_loss = self._step_loss, None
        if loss is None and isinstance(closure_loss, Tensor):
            loss = closure_loss  # no backward hook ran (e.g. a custom strategy)
        return loss

    def _check_direct_call(self) -> None:
        """A direct ``guard.step(loss)``: refuse it where the gradients are still scaled."""
        self._losses.reset()
        trainer = self._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer else None
        if scaler is not None and scaler.is_enabled():
            raise RuntimeError(
                "guard.step(loss) called directly under 16-bit AMP: the gradients are still "
                "multiplied by the GradScaler's scale. In manual optimization with "
                "precision='16-mixed' call opt.step() (opt = self.optimizers()): Lightning "
                "unscales, and the GradguardCallback routes the step through the guard")

    def _forward(self, trainer: pl.Trainer, *, force: bool) -> None:
        self._buffer_guard_values()
        if not self._buffer.values or not trainer.loggers:
            return
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 1) or 1
        done = trainer.global_step
        if not (force or self._buffer.urgent or done % every == 0):
            return
        # Lightning logs a batch's metrics at the count of steps before it: the same row
        step = max(done - 1, 0)
        metrics = self._buffer.drain()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        self._release()
        self._trainer = None
