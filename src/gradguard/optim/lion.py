"""Lion, EvoLved Sign Momentum (Chen et al. 2023).

torch.optim has no Lion. The arguments follow the paper's Program 1 and the
usual PyTorch ports (``lr``, ``betas``, ``weight_decay``), plus ``maximize``;
the state keys are ``exp_avg`` (the momentum :math:`m`) and ``step`` (a 0-dim
float32 counter, as torch.optim keeps it, so tools can read the step count).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, UNIT_HALF_OPEN, Pair, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype


class Lion(Optimizer):
    r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    For each parameter :math:`\theta` with gradient :math:`g_t` and momentum
    :math:`m` (initially 0), at each step:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        \theta &\leftarrow \theta (1 - \gamma\lambda) \\
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta &\leftarrow \theta - \gamma \operatorname{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\operatorname{sign}(0) = 0`, so a coordinate whose interpolation is
    exactly zero is only decayed. Weight decay is decoupled (scaled by the learning
    rate, not added to the gradient), as in the paper. Every coordinate moves by
    exactly :math:`\gamma` per step, so Lion's ``lr`` is typically 3-10x smaller
    than AdamW's and its ``weight_decay`` 3-10x larger. Both interpolations are
    computed with ``lerp``: :math:`m + (1-\beta)(g - m)`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma \ge 0` (default 1e-4).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.99)):
            :math:`\beta_1` weighs the momentum in the update's sign,
            :math:`\beta_2` is the momentum's decay. 1 is refused, as for Adam's
            betas: :math:`\beta_1 = 1` leaves the current gradient out of the update,
            :math:`\beta_2 = 1` keeps the momentum at 0.
        weight_decay: decoupled weight decay :math:`\lambda \ge 0` (default 0).
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (= ``"foreach"``), ``"reference"`` or ``"foreach"``.
        state_dtype: dtype of ``exp_avg`` (default: float32 for half-precision
            parameters, else the parameter's dtype).

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms",
    NeurIPS 2023 (arXiv:2302.06675), Program 1.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "betas": Pair(UNIT_HALF_OPEN, UNIT_HALF_OPEN),
        "weight_decay": NON_NEGATIVE,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["exp_avg"] = self.zeros_like(p, dtype)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        beta1, beta2 = group["betas"]
        _IMPLS[impl](
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(group["weight_decay"]),
            maximize=group["maximize"],
        )



def _reference_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
                    weight_decay: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg = exp_avgs[i]
        steps[i] += 1

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        update = exp_avg.lerp(grad, 1 - beta1).sign_()
        param.add_(update, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)


def _foreach_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
                  weight_decay: float, maximize: bool) -> None:
    # Four passes (five with weight decay): lerp into one temporary, sign_ in
    # place, add it to the parameters, lerp_ the momentum. On the CPU they run
    # block by block so that all of them hit the cache (see cpu_blocks).
    for _, (d_params, d_grads, d_avgs, d_steps) in group_by_device_and_dtype(
            params, grads, exp_avgs, steps):
        torch._foreach_add_(d_steps, 1)
        lists = [d_params, d_grads, d_avgs]
        for (b_params, b_grads, b_avgs), _ in cpu_blocks(lists):
            if maximize:
                b_grads = list(torch._foreach_neg(b_grads))
            if weight_decay != 0:
                torch._foreach_mul_(b_params, 1 - lr * weight_decay)
            updates = torch._foreach_lerp(b_avgs, b_grads, 1 - beta1)
            torch._foreach_sign_(updates)
            torch._foreach_add_(b_params, updates, alpha=-lr)
            del updates
            torch._foreach_lerp_(b_avgs, b_grads, 1 - beta2)


_IMPLS = {"reference": _reference_lion, "foreach": _foreach_lion}
