"""State schemas: what an optimizer's state means, per algorithm.

A :class:`StateSchema` says, for one algorithm, how to compute the *effective
per-coordinate learning rate* (the factor that multiplies the gradient-like
direction of the update, so that ``update ≈ effective_lr * direction``) and
which state tensor is the accumulator (second moment) and which the first
moment. gradguard's optimizers keep torch.optim's state keys by design, so one
schema per algorithm serves both libraries. Schemas are found by class name
along the optimizer's MRO (``AdamW`` before ``Adam``), so a subclass inherits
its parent's schema unless it registers its own.

Effective learning rates (``t`` is the parameter's ``state["step"]`` after the step):

============================  ===================================================
SGD, Lion                     ``lr`` (constant over coordinates)
LARS                          ``lr * local_lr``, ``local_lr = trust_coefficient * ||w||
                              / (||g|| + weight_decay * ||w|| + eps)``, 1 if either
                              norm is 0 (w before the step; norms from the sample)
Adagrad                       ``clr / (sqrt(sum) + eps)``, ``clr = lr / (1 + (t-1) * lr_decay)``
RowWiseAdagrad                ``lr / (sqrt(sum[row]) + eps)``, one accumulator per row
RMSprop                       ``lr / (sqrt(v) + eps)``, ``v = square_avg`` (centered:
                              ``square_avg - grad_avg**2``)
Adadelta                      ``lr * sqrt(acc_delta + eps) / sqrt(square_avg + eps)``
Adam, AdamW, NAdam,           ``lr / (1 - beta1**t) / (sqrt(v / (1 - beta2**t)) + eps)``,
SparseAdam                    ``v = exp_avg_sq`` (amsgrad: ``max_exp_avg_sq``)
Adamax                        ``lr / (1 - beta1**t) / exp_inf``
FTRL                          ``lr / (beta + sqrt(n))``
============================  ===================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .sampling import take


class Coordinates:
    """Sampled coordinates of one or more parameter tensors of one group, and their state.

    What an effective-lr function reads. The tensors batched together share
    their step count (the recorder batches them so; a schema marked
    ``per_tensor`` gets one tensor at a time). State values are gathered on
    first use, concatenated in tensor order and returned in float64; ``param``
    holds the parameter values *before* the step where the recorder
    snapshotted them (its sampled tier does), else after; ``grad`` is the
    gradient (zeros where a tensor has none); ``weights`` says how many
    coordinates of its tensor each sampled coordinate stands for.
    """

    def __init__(self, group: Mapping[str, Any], states: Sequence[Mapping[str, Any]],
                 indices: Sequence[Tensor], shapes: Sequence[torch.Size], param: Tensor,
                 grad: Tensor, weights: Tensor) -> None:
        self.group = group
        self.states = states
        self.indices = indices
        self.shapes = shapes
        self.param = param
        self.grad = grad
        self.weights = weights
        self._gathered: dict[str, Tensor | None] = {}

    @property
    def size(self) -> int:
        """Number of sampled coordinates."""
        return self.param.numel()

    def step(self) -> float:
        """The step count (``state["step"]``) of the tensors, 0 if they have none."""
        return state_step(self.states[0]) if self.states else 0.0

    def state(self, key: str) -> Tensor:
        """``state[key]`` at the coordinates, float64; KeyError if a tensor lacks it.

        State kept per row (shape a prefix of the parameter's) or as a scalar is
        broadcast to the coordinates.
        """
        if key not in self._gathered:
            parts: list[Tensor | None] = [
                take(value.detach(), index, shape) if isinstance(value, Tensor) else None
                for value, index, shape in zip((st.get(key) for st in self.states),
                                               self.indices, self.shapes, strict=True)]
            found = [part for part in parts if part is not None]
            self._gathered[key] = (torch.cat(found).to(torch.float64)
                                   if found and len(found) == len(parts) else None)
        gathered = self._gathered[key]
        if gathered is None:
            raise KeyError(key)
        return gathered

    def param_norm(self) -> float:
        """||w|| of the tensors, estimated from the sample (exact when it covers them)."""
        return math.sqrt(float((self.weights * self.param.square()).sum()))

    def grad_norm(self) -> float:
        """||g|| of the tensors, estimated from the sample (exact when it covers them)."""
        return math.sqrt(float((self.weights * self.grad.square()).sum()))


def state_step(state: Mapping[str, Any]) -> float:
    """A parameter's step count (``state["step"]``, tensor or number), 0 if it has none."""
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


EffectiveLr = Callable[[Coordinates], "Tensor | float | None"]
"""Per-coordinate effective lr (a tensor, or one number for all) or None if undefined yet."""


@dataclass(frozen=True)
class StateSchema:
    """What one algorithm's state means.

    Attributes:
        name: the algorithm (the optimizer's class name).
        effective_lr: per-coordinate effective learning rate, or None if the
            algorithm has no meaningful one (unknown optimizers).
        accumulator: the state key of the second-moment accumulator (``sum``,
            ``exp_avg_sq``, ``square_avg``, ``n``, ``exp_inf``), if any.
        first_moment: the state key of the first moment (``exp_avg``,
            ``momentum_buffer``, ``grad_avg``, ``z``), if any.
        needs_state: effective_lr reads optimizer state, so parameters without
            state (never stepped) are skipped.
        per_tensor: effective_lr depends on whole-tensor quantities (LARS's
            norms), so it is called with one tensor at a time.
    """

    name: str
    effective_lr: EffectiveLr | None
    accumulator: str | None = None
    first_moment: str | None = None
    needs_state: bool = True
    per_tensor: bool = False


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _sgd(c: Coordinates) -> float:
    return _number(c.group["lr"])


def _adagrad(c: Coordinates) -> Tensor | None:
    t = c.step()
    if t < 1:
        return None
    clr = _number(c.group["lr"]) / (1 + (t - 1) * float(c.group.get("lr_decay", 0.0)))
    return clr / (c.state("sum").sqrt() + float(c.group["eps"]))


def _rowwise_adagrad(c: Coordinates) -> Tensor:
    # one accumulator per row (state "sum" of shape (rows,)), broadcast over the row
    return _number(c.group["lr"]) / (c.state("sum").sqrt() + float(c.group["eps"]))


def _rmsprop(c: Coordinates) -> Tensor:
    v = c.state("square_avg")
    if c.group.get("centered", False):
        v = v - c.state("grad_avg").square()
    return _number(c.group["lr"]) / (v.sqrt() + float(c.group["eps"]))


def _adadelta(c: Coordinates) -> Tensor:
    eps = float(c.group["eps"])
    return (_number(c.group["lr"]) * (c.state("acc_delta") + eps).sqrt()
            / (c.state("square_avg") + eps).sqrt())


def _adam(c: Coordinates) -> Tensor | None:
    t = c.step()
    if t < 1:
        return None
    beta1, beta2 = (float(b) for b in c.group["betas"])
    v = c.state("max_exp_avg_sq" if c.group.get("amsgrad", False) else "exp_avg_sq")
    step_size = _number(c.group["lr"]) / (1 - beta1**t)
    return step_size / ((v / (1 - beta2**t)).sqrt() + float(c.group["eps"]))


def _adamax(c: Coordinates) -> Tensor | None:
    t = c.step()
    if t < 1:
        return None
    beta1 = float(c.group["betas"][0])
    return _number(c.group["lr"]) / (1 - beta1**t) / c.state("exp_inf")


def _lars(c: Coordinates) -> float:
    w_norm, g_norm = c.param_norm(), c.grad_norm()
    if w_norm == 0.0 or g_norm == 0.0:
        local_lr = 1.0
    else:
        local_lr = (float(c.group.get("trust_coefficient", 0.001)) * w_norm
                    / (g_norm + float(c.group.get("weight_decay", 0.0)) * w_norm
                       + float(c.group.get("eps", 0.0))))
    return _number(c.group["lr"]) * local_lr


def _ftrl(c: Coordinates) -> Tensor:
    return _number(c.group["lr"]) / (float(c.group.get("beta", 1.0)) + c.state("n").sqrt())


def _adam_family(name: str) -> StateSchema:
    return StateSchema(name, _adam, accumulator="exp_avg_sq", first_moment="exp_avg")


SCHEMAS: dict[str, StateSchema] = {
    "SGD": StateSchema("SGD", _sgd, first_moment="momentum_buffer", needs_state=False),
    "Adagrad": StateSchema("Adagrad", _adagrad, accumulator="sum"),
    "RowWiseAdagrad": StateSchema("RowWiseAdagrad", _rowwise_adagrad, accumulator="sum"),
    "RMSprop": StateSchema("RMSprop", _rmsprop, accumulator="square_avg",
                           first_moment="grad_avg"),
    "Adadelta": StateSchema("Adadelta", _adadelta, accumulator="square_avg"),
    "Adam": _adam_family("Adam"),
    "AdamW": _adam_family("AdamW"),
    "NAdam": _adam_family("NAdam"),
    "SparseAdam": _adam_family("SparseAdam"),
    "Adamax": StateSchema("Adamax", _adamax, accumulator="exp_inf", first_moment="exp_avg"),
    "Lion": StateSchema("Lion", _sgd, first_moment="exp_avg", needs_state=False),
    "LARS": StateSchema("LARS", _lars, first_moment="momentum_buffer", needs_state=False,
                        per_tensor=True),
    "FTRL": StateSchema("FTRL", _ftrl, accumulator="n", first_moment="z"),
}
"""Built-in schemas by optimizer class name."""

GENERIC = StateSchema("generic", None)
"""For optimizers without a schema: parameter, gradient, update and state-size metrics only."""


def register_schema(name: str, schema: StateSchema) -> None:
    """Use ``schema`` for optimizers whose class (or a base class) is named ``name``."""
    SCHEMAS[name] = schema


def schema_for(optimizer: torch.optim.Optimizer | type) -> StateSchema:
    """The schema of the nearest class along the optimizer's MRO that has one, else GENERIC."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for klass in cls.__mro__:
        schema = SCHEMAS.get(klass.__name__)
        if schema is not None:
            return schema
    return GENERIC
