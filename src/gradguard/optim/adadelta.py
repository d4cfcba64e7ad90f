"""Adadelta (Zeiler 2012).

Drop-in for ``torch.optim.Adadelta``: same arguments, defaults, param-group keys
(except torch's ``foreach``/``capturable``/``differentiable`` flags, replaced by
one ``impl``) and state keys (``step``, ``square_avg``, ``acc_delta``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_CLOSED, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype


class Adadelta(Optimizer):
    r"""Adadelta: steps scaled by the ratio of RMS past updates to RMS gradients.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`,
    starting from :math:`v_0 = u_0 = 0`:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        g_t &\leftarrow g_t + \lambda\theta \quad \text{(coupled weight decay)} \\
        v_t &= \rho v_{t-1} + (1-\rho) g_t^2 \\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} \, g_t \\
        u_t &= \rho u_{t-1} + (1-\rho) \Delta_t^2 \\
        \theta &\leftarrow \theta - \gamma \Delta_t

    eps is added *inside* both square roots (:math:`\sqrt{u + \epsilon}` and
    :math:`\sqrt{v + \epsilon}`), as in the paper and torch.optim; it also sets the
    size of the first steps, since :math:`u_0 = 0`. :math:`v` is ``square_avg`` and
    :math:`u` is ``acc_delta``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1.0), ``>= 0``; the paper has none (1).
        rho: decay :math:`\rho` of both averages, in ``[0, 1]`` (default 0.9).
        eps: :math:`\epsilon > 0` (default 1e-6). torch allows 0, with which
            :math:`u` stays 0 and no parameter ever moves (0/0 where a gradient
            coordinate is 0); gradguard refuses it.
        weight_decay: :math:`\lambda \ge 0` (default 0), added to the gradient.
        maximize: ascend instead of descend (default False).
        impl: ``"auto"``, ``"reference"`` or ``"foreach"`` (torch has no fused kernel).
        state_dtype: dtype of ``square_avg``/``acc_delta`` (default: float32 for
            half-precision parameters, else the parameter's dtype).

    Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "rho": UNIT_CLOSED,
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["square_avg"] = self.zeros_like(p, dtype)
        state["acc_delta"] = self.zeros_like(p, dtype)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        _IMPLS[impl](
            params,
            grads,
            [s["square_avg"] for s in states],
            [s["acc_delta"] for s in states],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )



def _reference_adadelta(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                        acc_deltas: list[Tensor], steps: list[Tensor], *, lr: float,
                        rho: float, eps: float, weight_decay: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        square_avg, acc_delta = square_avgs[i], acc_deltas[i]
        steps[i] += 1
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        std = square_avg.add(eps).sqrt_()
        delta = acc_delta.add(eps).sqrt_()
        delta.div_(std).mul_(grad)
        acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        param.add_(delta, alpha=-lr)


def _foreach_adadelta(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                      acc_deltas: list[Tensor], steps: list[Tensor], *, lr: float, rho: float,
                      eps: float, weight_decay: float, maximize: bool) -> None:
    # Negating the gradient only flips signs, which is exact: with maximize the update
    # uses -g directly (the squares absorb it, the final step's sign carries it), so no
    # negated copy is made. With weight decay, g - wd*theta is exactly -(-g + wd*theta).
    sign = -1.0 if maximize else 1.0
    for _, (d_params, d_grads, d_sqs, d_accs, d_steps) in group_by_device_and_dtype(
            params, grads, square_avgs, acc_deltas, steps):
        torch._foreach_add_(d_steps, 1)
        for (c_params, c_grads, c_sqs, c_accs), _ in cpu_blocks(
                [d_params, d_grads, d_sqs, d_accs]):
            if weight_decay != 0:
                c_grads = list(torch._foreach_add(c_grads, c_params,
                                                  alpha=sign * weight_decay))
            torch._foreach_mul_(c_sqs, rho)
            torch._foreach_addcmul_(c_sqs, c_grads, c_grads, value=1 - rho)
            # sqrt((acc + eps) / (sq + eps)): one square root instead of the
            # reference's two (the step is compute-bound); equal to ~1 ulp.
            denoms = torch._foreach_add(c_sqs, eps)
            deltas = torch._foreach_add(c_accs, eps)
            torch._foreach_div_(deltas, denoms)
            del denoms
            torch._foreach_sqrt_(deltas)
            torch._foreach_mul_(deltas, c_grads)
            torch._foreach_mul_(c_accs, rho)
            torch._foreach_addcmul_(c_accs, deltas, deltas, value=1 - rho)
            torch._foreach_add_(c_params, deltas, alpha=-sign * lr)

_IMPLS = {"reference": _reference_adadelta, "foreach": _foreach_adadelta}
