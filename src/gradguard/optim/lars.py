"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017).

SGD with momentum whose step for each parameter tensor is scaled by a trust
ratio ``||w|| / ||g||``, so every layer moves by a similar fraction of its norm
whatever the scale of its gradient; the optimizer of large-batch training.
State: ``momentum_buffer`` (only when momentum is non-zero), as ``SGD``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_CLOSED, Rule
from .base import Optimizer, ParamsT, as_float, device_dtype_runs
from .sgd import check_nesterov


class LARS(Optimizer):
    r"""LARS: SGD with momentum and a layer-wise trust ratio ||w|| / ||g||.

    For each parameter tensor :math:`w` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        \rho_t &= \frac{\eta \, \|w\|}{\|g_t\| + \lambda \|w\| + \epsilon}
            \text{ if } \|w\| > 0 \text{ and } \|g_t\| > 0 \text{, else } 1 \\
        d_t &= \rho_t \, (g_t + \lambda w) \\
        b_t &= d_t \text{ if } t = 1 \text{, else } \mu b_{t-1} + (1-\tau) d_t
            \qquad \text{(only if } \mu \ne 0) \\
        u_t &= d_t + \mu b_t \text{ if nesterov, else } b_t \text{ if } \mu \ne 0
            \text{, else } d_t \\
        w &\leftarrow w - \gamma u_t

    Norms are Euclidean norms of the whole tensor (one "layer" is one parameter
    tensor, biases and norm weights included); :math:`\|g_t\|` is the norm of the
    gradient before weight decay. The trust ratio :math:`\rho_t` is 1 for an
    all-zero weight (a freshly zero-initialised tensor) or an all-zero gradient.

    The paper's Algorithm 1 keeps the global learning rate inside the buffer,
    :math:`b_t = \mu b_{t-1} + \gamma_t \rho_t (g_t + \lambda w)`, :math:`w \leftarrow
    w - b_t`. Here, as in ``torch.optim.SGD`` and most LARS implementations, it
    multiplies the update instead: the two agree for a constant learning rate
    (and :math:`\tau = 0`) and differ only in how a schedule's change of
    :math:`\gamma` reaches the momentum already accumulated. The first buffer is
    :math:`d_1` itself, undamped, as ``SGD``.

    Args:
        params: parameters or parameter groups.
        lr: global learning rate :math:`\gamma` (default 0.1), ``>= 0``.
        momentum: :math:`\mu \ge 0` (default 0.9).
        dampening: :math:`\tau \in [0, 1]` (default 0).
        weight_decay: :math:`\lambda \ge 0` (default 0), added to the gradient and
            to the trust ratio's denominator.
        nesterov: Nesterov momentum (default False); needs momentum > 0 and dampening 0.
        trust_coefficient: :math:`\eta > 0` (default 0.001), the paper's trust
            coefficient.
        eps: :math:`\epsilon > 0` (default 1e-8) in the trust ratio's denominator.
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (= ``"foreach"``), ``"reference"`` or ``"foreach"``.
        state_dtype: dtype of ``momentum_buffer`` (default: float32 for
            half-precision parameters, else the parameter's dtype).

    Reference: You, Gitman & Ginsburg, "Large Batch Training of Convolutional
    Networks", arXiv:1708.03888, 2017 (Algorithm 1).
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
        "dampening": UNIT_CLOSED,
        "weight_decay": NON_NEGATIVE,
        "nesterov": FLAG,
        "trust_coefficient": POSITIVE,
        "eps": POSITIVE,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_nesterov(group)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        if group["momentum"] != 0:
            state["momentum_buffer"] = None  # created from the first step's update

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        momentum = as_float(group["momentum"])
        buffers = [s.get("momentum_buffer") for s in states] if momentum != 0 else []
        _IMPLS[impl](
            params,
            grads,
            buffers,
            lr=as_float(group["lr"]),
            momentum=momentum,
            dampening=as_float(group["dampening"]),
            weight_decay=as_float(group["weight_decay"]),
            nesterov=group["nesterov"],
            trust_coefficient=as_float(group["trust_coefficient"]),
            eps=as_float(group["eps"]),
            maximize=group["maximize"],
        )
        if momentum != 0:
            for state, buffer in zip(states, buffers, strict=True):
                state["momentum_buffer"] = buffer


def trust_ratio(weight_norm: Tensor, grad_norm: Tensor, *, trust_coefficient: float,
                weight_decay: float, eps: float) -> Tensor:
    """``eta ||w|| / (||g|| + lambda ||w|| + eps)``, or 1 where either norm is 0.

    Elementwise, so one call serves one tensor (0-dim norms) or a whole list of
    tensors (stacked norms) without reading any value back to the host.
    """
    ratio = trust_coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    return torch.where((weight_norm > 0) & (grad_norm > 0), ratio, 1.0)


def _reference_lars(params: list[Tensor], grads: list[Tensor],
                    momentum_buffers: list[Tensor | None], *, lr: float, momentum: float,
                    dampening: float, weight_decay: float, nesterov: bool,
                    trust_coefficient: float, eps: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        rho = trust_ratio(torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad),
                          trust_coefficient=trust_coefficient, weight_decay=weight_decay,
                          eps=eps)
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        update = grad * rho

        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = update
            else:
                buf.mul_(momentum).add_(update, alpha=1 - dampening)
            update = update.add(buf, alpha=momentum) if nesterov else buf

        param.add_(update, alpha=-lr)


def _foreach_lars(params: list[Tensor], grads: list[Tensor],
                  momentum_buffers: list[Tensor | None], *, lr: float, momentum: float,
                  dampening: float, weight_decay: float, nesterov: bool,
                  trust_coefficient: float, eps: float, maximize: bool) -> None:
    r"""The reference's update in few passes over memory, no temporaries, no host syncs.

    With :math:`d = \rho(\pm g + \lambda w) = a\,g + c\,w` (:math:`a = \pm\rho`,
    :math:`c = \lambda\rho`), every consumer of :math:`d` takes its two terms as
    ``addcmul`` with per-tensor 0-dim factors (or scales ``w`` in place for the
    ``c w`` term of the parameter update), so neither :math:`d` nor the decayed
    gradient is ever materialised. Rounding differs from the reference by a few ulps.
    """
    sign = -1.0 if maximize else 1.0
    for run in device_dtype_runs(params):
        d_params = [params[i] for i in run]
        d_grads = [grads[i] for i in run]
        rho = trust_ratio(torch.stack(torch._foreach_norm(d_params)),
                          torch.stack(torch._foreach_norm(d_grads)),
                          trust_coefficient=trust_coefficient, weight_decay=weight_decay,
                          eps=eps)
        grad_factors = list((rho * sign).unbind())  # a
        decay_factors = list((rho * weight_decay).unbind())  # c
        # w <- (1 - lr c) w: the weight-decay term of -lr d, applied to the parameter itself
        shrinks = list((1 - lr * weight_decay * rho).unbind()) if weight_decay != 0 else []

        if momentum == 0:
            if shrinks:
                torch._foreach_mul_(d_params, shrinks)
            torch._foreach_addcmul_(d_params, d_grads, grad_factors, value=-lr)
            continue

        d_bufs = [momentum_buffers[i] for i in run]
        bufs: list[Tensor] = [b for b in d_bufs if b is not None]
        if len(bufs) == len(d_bufs):
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcmul_(bufs, d_grads, grad_factors, value=1 - dampening)
            if weight_decay != 0:
                torch._foreach_addcmul_(bufs, d_params, decay_factors, value=1 - dampening)
        else:  # some parameters take their first step: b = d, undamped
            bufs = []
            for j, i in enumerate(run):
                buf = momentum_buffers[i]
                if buf is None:
                    buf = momentum_buffers[i] = d_grads[j] * grad_factors[j]
                    if weight_decay != 0:
                        buf.addcmul_(d_params[j], decay_factors[j])
                else:
                    buf.mul_(momentum).addcmul_(d_grads[j], grad_factors[j],
                                                value=1 - dampening)
                    if weight_decay != 0:
                        buf.addcmul_(d_params[j], decay_factors[j], value=1 - dampening)
                bufs.append(buf)

        if nesterov:  # w <- w - lr (a g + c w) - lr mu b
            if shrinks:
                torch._foreach_mul_(d_params, shrinks)
            torch._foreach_add_(d_params, bufs, alpha=-lr * momentum)
            torch._foreach_addcmul_(d_params, d_grads, grad_factors, value=-lr)
        else:
            torch._foreach_add_(d_params, bufs, alpha=-lr)


_IMPLS = {"reference": _reference_lars, "foreach": _foreach_lars}
