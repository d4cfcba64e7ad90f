"""Hugging Face ``Trainer``: :class:`GradguardTrainerCallback` puts the flight recorder and
the guard on ``transformers.Trainer``.

``Trainer(model, args, optimizers=(optimizer, scheduler), callbacks=[GradguardTrainerCallback(
recorder=..., guard=...)])``:

* the guard decides every optimizer step: the Trainer calls
  ``self.optimizer.step()`` itself (between ``on_pre_optimizer_step`` and
  ``on_optimizer_step``), so the callback routes that call through
  ``guard.step(loss)`` (:class:`~gradguard.integrations._common.GuardedStep`)
  and a NaN gradient is really not applied. The loss it judges is the model
  output's ``loss``, averaged over the micro-batches of the step;
* the recorder's metrics go to its own sinks and, at every Trainer log, into
  the Trainer's logs (``state.log_history``, and the reporting callbacks that
  run after this one) as ``gradguard/<group>/<metric>``;
* the guard's history and the recorder's step count are written next to every
  Trainer checkpoint (``checkpoint-N/gradguard_state.json``) and restored by
  ``trainer.train(resume_from_checkpoint=...)``; gradguard optimizers' state goes
  through the Trainer's ``optimizer.pt`` as any torch optimizer's does.

Needs the ``transformers`` package: ``pip install 'gradguard[transformers]'``.
See ``docs/integrations.md``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

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
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # the extra is not installed
    raise missing_extra("gradguard.integrations.transformers", "transformers", "transformers",
                        err) from err

__all__ = ["STATE_FILE", "GradguardTrainerCallback", "GuardFactory", "RecorderFactory"]

STATE_FILE = "gradguard_state.json"
"""The file in each Trainer checkpoint folder that holds the guard's and recorder's state."""

RecorderFactory = Callable[[torch.optim.Optimizer, torch.nn.Module], Recorder]
"""Builds the recorder when training starts: ``(optimizer, model) -> Recorder``."""

GuardFactory = Callable[[torch.optim.Optimizer, torch.nn.Module], Guard]
"""Builds the guard when training starts: ``(optimizer, model) -> Guard``."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The user's optimizer inside accelerate's ``AcceleratedOptimizer`` (the Trainer's wrapper)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


class GradguardTrainerCallback(GuardedCallback, TrainerCallback):
    """The flight recorder and the guard for a Hugging Face ``Trainer``.

    Args:
        recorder: a :class:`~gradguard.watch.Recorder` on the optimizer given to
            ``Trainer(optimizers=(optimizer, scheduler))``, or a factory
            ``(optimizer, model) -> Recorder`` called when training starts (for an
            optimizer the Trainer creates), or None. A recorder the callback built
            is closed when training ends.
        guard: a :class:`~gradguard.guard.Guard` on that optimizer, a factory
            ``(optimizer, model) -> Guard``, or None. A guard without a recorder
            gets this callback's recorder; one without a scheduler gets the
            Trainer's LR scheduler.
        prefix: prefix of the metric names in the Trainer's logs.
        log_loss: log each step's loss (the model output's ``loss``, averaged over
            the step's micro-batches) to the recorder.
        eval_metric: the evaluation metric handed to ``guard.observe_eval`` after
            each evaluation (``plateau``, ``overfitting``); None: none.

    Set ``TrainingArguments(max_grad_norm=0)`` and clip with the guard's policy
    (``clip_norm``): the Trainer clips before the optimizer step, so with its
    clipping on the guard sees clipped gradient norms.
    """

    def __init__(self, recorder: Recorder | RecorderFactory | None = None,
                 guard: Guard | GuardFactory | None = None, *, prefix: str = "gradguard/",
                 log_loss: bool = True, eval_metric: str | None = "eval_loss") -> None:
        self._recorder_arg: Recorder | RecorderFactory | None = recorder
        self._guard_arg: Guard | GuardFactory | None = guard
        self.recorder: Recorder | None = recorder if isinstance(recorder, Recorder) else None
        """The recorder (built from the factory when training starts)."""
        self.guard: Guard | None = guard if isinstance(guard, Guard) else None
        """The guard (built from the factory when training starts)."""
        self.prefix = prefix
        self.log_loss = log_loss
        self.eval_metric = eval_metric
        self._owns_recorder = False
        self._owns_guard = False
        self._buffer = MetricBuffer(prefix)
        self._routing: GuardedStep | None = None
        self._accelerated: Any = None
        self._hook: RemovableHandle | None = None
        self._losses = LossAccumulator()
        self._step_loss: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._attached = False
        self._explicit_state = False
        self.restored_from: Path | None = None
        """The checkpoint folder whose gradguard state the last ``train()`` resumed from."""

    # ============================================================ public API
    def state_dict(self) -> dict[str, Any]:
        """The guard's history and counters and the recorder's step count (plain values)."""
        return {"format": "gradguard.integrations.transformers", **self._state_values()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (now, or when the guard and recorder exist)."""
        self._load_state_values(state, "gradguard")
        self._explicit_state = True

    def save_state(self, checkpoint_dir: str | os.PathLike[str]) -> Path:
        """Write :meth:`state_dict` to ``checkpoint_dir/gradguard_state.json`` (atomically)."""
        folder = Path(checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / STATE_FILE
        tmp = folder / f".{STATE_FILE}.tmp-{os.getpid()}"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def load_state(self, checkpoint_dir: str | os.PathLike[str]) -> bool:
        """Read ``checkpoint_dir/gradguard_state.json`` if it exists; return whether it did.

        ``train(resume_from_checkpoint=...)`` does this itself for checkpoints in
        ``args.output_dir``; call it before ``train()`` for one elsewhere.
        """
        path = Path(checkpoint_dir) / STATE_FILE
        if not path.is_file():
            return False
        with path.open(encoding="utf-8") as f:
            self.load_state_dict(json.load(f))
        self.restored_from = Path(checkpoint_dir)
        return True

    # ================================================================ hooks
    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        """Build the recorder and guard, restore their state, route the optimizer step."""
        self._detach()  # left attached by a train() that raised
        model = kwargs.get("model")
        wrapped = kwargs.get("optimizer")
        optimizer = unwrap_optimizer(wrapped) if wrapped is not None else None
        if not isinstance(self._recorder_arg, Recorder):
            self.recorder, self._owns_recorder = build(self._recorder_arg, Recorder, optimizer,
                                                       model)
        if not isinstance(self._guard_arg, Guard):
            self.guard, self._owns_guard = build(self._guard_arg, Guard, optimizer, model)
        optimizers = [optimizer] if optimizer is not None else []
        check_optimizer(self.recorder, optimizers, "recorder")
        check_optimizer(self.guard, optimizers, "guard")
        if self.guard is not None and (getattr(args, "deepspeed", None)
                                       or getattr(args, "fsdp", None)):
            raise ValueError(
                "GradguardTrainerCallback: the guard needs every rank to hold the full "
                "gradients (one device or DDP); with DeepSpeed or FSDP each rank holds a "
                "shard (and DeepSpeed steps its own optimizer), so the guard cannot decide")
        link(self.recorder, self.guard, kwargs.get("lr_scheduler"))
        if state.global_step > 0 and not self._explicit_state:
            folder = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if not self.load_state(folder) and (self.guard is not None
                                                or self.recorder is not None):
                warnings.warn(
                    f"GradguardTrainerCallback: resuming at step {state.global_step} but "
                    f"{folder / STATE_FILE} does not exist; the guard and the recorder start "
                    "without their history (for a checkpoint outside args.output_dir, call "
                    "callback.load_state(checkpoint_dir) before train())",
                    UserWarning, stacklevel=2)
        self._explicit_state = False
        self._apply_pending_state()
        if self.recorder is not None and self._buffer not in self.recorder.sinks:
            self.recorder.sinks.append(self._buffer)
        if self.guard is not None:
            # the Trainer has no exception hook: detach when the guard stops training
            self._routing = GuardedStep(self.guard, self._judged_loss, on_error=self._detach)
            self._routing.install()
            self._rewire_accelerate(wrapped)
        if isinstance(model, torch.nn.Module) and (self.guard is not None
                                                   or self.recorder is not None):
            self._hook = model.register_forward_hook(self._capture_loss)
        self._attached = True

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        """A new optimizer step's micro-batches start: forget the previous losses."""
        self._losses.reset()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        """The gradients are final (accumulated, unscaled, clipped): fix this step's loss.

        The guard judges it when the Trainer calls ``optimizer.step()`` right after
        this hook.
        """
        if self._attached:
            self._step_loss = self._losses.take(mean=True)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                          control: TrainerControl, **kwargs: Any) -> None:
        """Log the step's loss to the recorder."""
        if self._attached:
            self._log_loss()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               **kwargs: Any) -> None:
        """Add the latest gradguard metrics to this log (``logs`` and ``state.log_history``)."""
        if not self._attached:
            return
        self._buffer_guard_values()
        if not self._buffer.values:
            return
        metrics = self._buffer.drain()
        logs = kwargs.get("logs")
        if isinstance(logs, dict):
            logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Hand the evaluation metric to the guard's plateau and overfitting detectors."""
        metrics = kwargs.get("metrics") or {}
        if self.guard is None or self.eval_metric is None or not self._attached:
            return
        value = metrics.get(self.eval_metric)
        if isinstance(value, (int, float)):
            self.guard.observe_eval(float(value))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write the guard's and recorder's state into the checkpoint folder just saved."""
        if self.guard is None and self.recorder is None:
            return
        if self.recorder is not None:
            self.recorder.flush()
        if not args.should_save:
            return
        folder = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(f"GradguardTrainerCallback: no checkpoint folder {folder}; the "
                          "gradguard state is not saved with this checkpoint",
                          UserWarning, stacklevel=2)
            return
        self.save_state(folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Put the optimizer's own ``step`` back; close what the callback built."""
        self._detach()

    # ============================================================== helpers
    def _capture_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = None
        if isinstance(output, Mapping):
            loss = output.get("loss")
        elif hasattr(output, "loss"):
            loss = output.loss
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.add(loss)

    def _judged_loss(self, closure_loss: Any) -> LossValue:
        loss, self._step_loss = self._step_loss, None
        return loss

    def _rewire_accelerate(self, wrapped: Any) -> None:
        """Keep the routing under accelerate's fp16 loss scaling.

        With a GradScaler, accelerate's ``AcceleratedOptimizer.step`` puts a step of
        its own on the optimizer for the duration of each step (to learn whether the
        scaler skipped it), built from the ``step`` the optimizer had when it was
        wrapped; point both at the routing step instead.
        """
        if (self._routing is None or wrapped is None
                or not hasattr(wrapped, "_optimizer_original_step_method")):
            return
        from accelerate.optimizer import patch_optimizer_step

        routed = self._routing.optimizer_step
        self._accelerated = (wrapped, wrapped._optimizer_original_step_method,
                             wrapped._optimizer_patched_step_method)
        wrapped._optimizer_original_step_method = routed
        wrapped._optimizer_patched_step_method = patch_optimizer_step(wrapped, routed)

    def _detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._accelerated is not None:
            wrapped, original, patched = self._accelerated
            wrapped._optimizer_original_step_method = original
            wrapped._optimizer_patched_step_method = patched
            self._accelerated = None
        self._release()
