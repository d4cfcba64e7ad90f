"""Stochastic gradient descent with momentum, dampening and Nesterov momentum.

Drop-in for ``torch.optim.SGD``: same arguments, defaults, param-group keys
(except torch's ``foreach``/``fused``/``differentiable`` flags, replaced by one
``impl``) and state (``momentum_buffer``, only when momentum is non-zero; no
``step`` counter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, Interval, Rule
from .base import Optimizer, ParamsT, as_float, device_dtype_runs


class SGD(Optimizer):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum and weight decay.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        g_t &\leftarrow g_t + \lambda\theta \text{ if } \lambda \ne 0 \\
        b_t &= g_t \text{ if } t = 1 \text{, else } \mu b_{t-1} + (1-\tau) g_t
            \qquad \text{(only if } \mu \ne 0) \\
        u_t &= g_t + \mu b_t \text{ if nesterov, else } b_t \text{ if } \mu \ne 0
            \text{, else } g_t \\
        \theta &\leftarrow \theta - \gamma u_t

    As in torch.optim, the learning rate multiplies the update, not the gradient
    entering the buffer (Sutskever et al. put it inside), and the first buffer is
    the gradient itself, undamped. A parameter's "first step" is the first step
    on which it has a gradient.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1e-3), ``>= 0``.
        momentum: :math:`\mu \ge 0` (default 0).
        dampening: :math:`\tau` (default 0), any finite number, as torch.
        weight_decay: L2 penalty :math:`\lambda \ge 0` added to the gradient (default 0).
        nesterov: Nesterov momentum (default False); needs momentum > 0 and dampening 0.
        maximize: ascend instead of descend (default False).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (torch's
            ``_fused_sgd_`` kernel; what ``"auto"`` picks on cpu/cuda).
        state_dtype: dtype of ``momentum_buffer`` (default: float32 for
            half-precision parameters, else the parameter's dtype).

    References: Robbins & Monro, "A Stochastic Approximation Method", 1951;
    Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and
    momentum in deep learning", ICML 2013.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach", "fused")
    fused_takes_scaling: ClassVar[bool] = True
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
        "dampening": Interval(),
        "weight_decay": NON_NEGATIVE,
        "nesterov": FLAG,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
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
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_nesterov(group)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        if group["momentum"] != 0:
            state["momentum_buffer"] = None  # created from the first gradient

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str, *, grad_scale: Tensor | None = None,
                found_inf: Tensor | None = None) -> None:
        momentum = as_float(group["momentum"])
        buffers = [s.get("momentum_buffer") for s in states] if momentum != 0 else []
        scaling = {"grad_scale": grad_scale, "found_inf": found_inf} if impl == "fused" else {}
        _IMPLS[impl](
            params,
            grads,
            buffers,
            lr=as_float(group["lr"]),
            momentum=momentum,
            dampening=as_float(group["dampening"]),
            weight_decay=as_float(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            **scaling,
        )
        if momentum != 0:
            for state, buffer in zip(states, buffers, strict=True):
                state["momentum_buffer"] = buffer


def check_nesterov(group: Mapping[str, Any]) -> None:
    """Nesterov momentum needs a momentum and no dampening (torch's rule)."""
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"nesterov=True requires momentum > 0 and dampening == 0, got "
            f"momentum={group['momentum']!r}, dampening={group['dampening']!r}")




def _reference_sgd(params: list[Tensor], grads: list[Tensor],
                   momentum_buffers: list[Tensor | None], *, lr: float, momentum: float,
                   dampening: float, weight_decay: float, nesterov: bool,
                   maximize: bool) -> None:
    """torch's ``_single_tensor_sgd``, op for op; fills ``None`` buffers in place."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = grad.clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf

        param.add_(grad, alpha=-lr)


def _foreach_sgd(params: list[Tensor], grads: list[Tensor],
                 momentum_buffers: list[Tensor | None], *, lr: float, momentum: float,
                 dampening: float, weight_decay: float, nesterov: bool, maximize: bool) -> None:
    for run in device_dtype_runs(params):
        d_params = [params[i] for i in run]
        d_grads = [grads[i] for i in run]
        owned = False  # whether d_grads are temporaries we may overwrite
        if maximize:
            d_grads = list(torch._foreach_neg(d_grads))
            owned = True
        if weight_decay != 0:
            if owned:
                torch._foreach_add_(d_grads, d_params, alpha=weight_decay)
            else:
                d_grads = list(torch._foreach_add(d_grads, d_params, alpha=weight_decay))
                owned = True

        if momentum != 0:
            d_bufs = [momentum_buffers[i] for i in run]
            bufs: list[Tensor] = [b for b in d_bufs if b is not None]
            if len(bufs) == len(d_bufs):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d_grads, alpha=1 - dampening)
            else:  # some parameters take their first step: per tensor, as torch
                bufs = []
                for j, i in enumerate(run):
                    buf = momentum_buffers[i]
                    if buf is None:
                        buf = momentum_buffers[i] = d_grads[j].clone()
                    else:
                        buf.mul_(momentum).add_(d_grads[j], alpha=1 - dampening)
                    bufs.append(buf)
            if not nesterov:
                d_grads = bufs
            elif owned:
                torch._foreach_add_(d_grads, bufs, alpha=momentum)
            else:  # torch's foreach adds into the caller's .grad; two passes over w instead
                torch._foreach_add_(d_params, bufs, alpha=-lr * momentum)

        torch._foreach_add_(d_params, d_grads, alpha=-lr)


def _fused_sgd(params: list[Tensor], grads: list[Tensor],
               momentum_buffers: list[Tensor | None], *, lr: float, momentum: float,
               dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
               grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """torch's ``_fused_sgd_`` kernel, one call per device/dtype and first-step status.

    The kernel's ``is_first_step`` applies to every tensor of a call (the buffer
    is set to the gradient, undamped). torch passes it only when *no* parameter
    has a buffer yet; here parameters joining later are split into their own call.

    ``grad_scale`` / ``found_inf`` go to the kernel (see ``Optimizer.step``). A
    skipped step must not leave a first buffer behind (the kernel would leave it
    uninitialised), so when some parameter would take its first momentum step,
    ``found_inf`` is read on the host: once per parameter's life.
    """

    def kernel(idx: list[int], bufs: list[Tensor], is_first_step: bool) -> None:
        torch._fused_sgd_([params[i] for i in idx], [grads[i] for i in idx], bufs,
                          weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=dampening, nesterov=nesterov, maximize=maximize,
                          is_first_step=is_first_step, grad_scale=grad_scale,
                          found_inf=found_inf)

    if (found_inf is not None and momentum != 0
            and any(buf is None for buf in momentum_buffers) and bool(found_inf.item())):
        return
    for run in device_dtype_runs(params):
        if momentum == 0:
            kernel(run, [], False)
            continue
        new = {i: torch.empty_like(grads[i]) for i in run if momentum_buffers[i] is None}
        old = {i: buf for i in run if (buf := momentum_buffers[i]) is not None}
        for bufs, is_first_step in ((new, True), (old, False)):
            if bufs:
                kernel(list(bufs), list(bufs.values()), is_first_step)
        for i, buf in new.items():
            momentum_buffers[i] = buf


_IMPLS = {"reference": _reference_sgd, "foreach": _foreach_sgd, "fused": _fused_sgd}
