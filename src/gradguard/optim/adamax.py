"""Adamax (Kingma & Ba 2015, §7.1): Adam with an infinity-norm second moment.

Drop-in for ``torch.optim.Adamax``: same arguments, defaults, param-group keys
(except torch's ``foreach``/``differentiable``/``capturable`` flags, replaced by
one ``impl``) and state keys (``step``, ``exp_avg``, ``exp_inf``).

Also home of :func:`cache_blocks`, the CPU blocking the foreach paths of
this module and :mod:`gradguard.optim.nadam` share.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_HALF_OPEN, Pair, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype


class Adamax(Optimizer):
    r"""Adamax: Adam with the infinity norm of past gradients as denominator.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        g_t &\leftarrow g_t + \lambda\theta \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t} \cdot \frac{m_t}{u_t}

    with :math:`m_0 = u_0 = 0`. eps sits *inside* the maximum, as in torch.optim
    (the paper has :math:`\max(\beta_2 u_{t-1}, |g_t|)` and no eps), so
    :math:`u_t \ge \epsilon` once a coordinate has been stepped. Weight decay is
    coupled (L2 added to the gradient). :math:`u_t` needs no bias correction.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 2e-3), ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.999)).
        eps: :math:`\epsilon > 0` (default 1e-8). torch allows 0, which turns a
            coordinate whose gradient has always been zero into 0/0; gradguard refuses it.
        weight_decay: :math:`\lambda \ge 0` (default 0).
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (= ``"foreach"``), ``"reference"`` or ``"foreach"``; torch
            has no fused Adamax kernel.
        state_dtype: dtype of ``exp_avg``/``exp_inf`` (default: float32 for
            half-precision parameters, else the parameter's dtype).

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, §7.1.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "betas": Pair(UNIT_HALF_OPEN, UNIT_HALF_OPEN),
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["exp_avg"] = self.zeros_like(p, dtype)
        state["exp_inf"] = self.zeros_like(p, dtype)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        beta1, beta2 = group["betas"]
        _IMPLS[impl](
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_inf"] for s in states],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )



def _reference_adamax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_infs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_inf = exp_avgs[i], exp_infs[i]
        steps[i] += 1

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)

        bias_correction = 1 - beta1 ** steps[i].item()
        param.addcdiv_(exp_avg, exp_inf, value=-(lr / bias_correction))


def _foreach_adamax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_infs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
    for _, (d_params, d_grads, d_avgs, d_infs, d_steps) in group_by_device_and_dtype(
            params, grads, exp_avgs, exp_infs, steps):
        torch._foreach_add_(d_steps, 1)
        step_sizes = [-(lr / (1 - beta1 ** s.item())) for s in d_steps]
        for (b_params, b_grads, b_avgs, b_infs), (b_sizes,) in cpu_blocks(
                [d_params, d_grads, d_avgs, d_infs], [step_sizes]):
            own_grads = maximize  # b_grads is a private copy that may be overwritten
            if maximize:
                b_grads = list(torch._foreach_neg(b_grads))
            if weight_decay != 0:
                if own_grads:
                    torch._foreach_add_(b_grads, b_params, alpha=weight_decay)
                else:
                    b_grads = list(torch._foreach_add(b_grads, b_params, alpha=weight_decay))
                    own_grads = True

            torch._foreach_lerp_(b_avgs, b_grads, 1 - beta1)
            torch._foreach_mul_(b_infs, beta2)
            if own_grads:
                torch._foreach_abs_(b_grads)
                magnitudes = b_grads
            else:
                magnitudes = list(torch._foreach_abs(b_grads))
            torch._foreach_add_(magnitudes, eps)
            torch._foreach_maximum_(b_infs, magnitudes)
            del magnitudes, b_grads
            torch._foreach_addcdiv_(b_params, b_avgs, b_infs, b_sizes)


_IMPLS = {"reference": _reference_adamax, "foreach": _foreach_adamax}
