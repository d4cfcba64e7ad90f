"""Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), amsgrad (Reddi et al. 2018).

Drop-in for ``torch.optim.Adam`` / ``torch.optim.AdamW``: same arguments,
defaults, param-group keys (except torch's ``foreach``/``fused``/``capturable``/
``differentiable`` flags, replaced by one ``impl``) and state keys
(``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_HALF_OPEN, Pair, Rule
from .base import Optimizer, ParamsT, as_float, group_by_device_and_dtype


class Adam(Optimizer):
    r"""Adam, with optional amsgrad and coupled or decoupled weight decay.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        \theta &\leftarrow \theta (1 - \gamma\lambda) \text{ if decoupled_weight_decay,
            else } g_t \leftarrow g_t + \lambda\theta \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad, else } v_t \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}
            \cdot \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    eps is added *after* the bias-corrected square root, as in torch.optim.
    With ``amsgrad`` the maximum is kept of the uncorrected :math:`v_t`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1e-3), ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.999)).
        eps: :math:`\epsilon > 0` (default 1e-8). torch allows 0, which turns a
            never-updated coordinate into 0/0; gradguard refuses it.
        weight_decay: :math:`\lambda \ge 0` (default 0).
        amsgrad: use the running maximum of :math:`v_t` (default False).
        maximize: ascend instead of descend (default False).
        decoupled_weight_decay: AdamW's decay (default False).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (torch's
            ``_fused_adam_`` / ``_fused_adamw_`` kernels).
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (default: float32 for
            half-precision parameters, else the parameter's dtype).

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach", "fused")
    fused_takes_scaling: ClassVar[bool] = True
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "betas": Pair(UNIT_HALF_OPEN, UNIT_HALF_OPEN),
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "amsgrad": FLAG,
        "maximize": FLAG,
        "decoupled_weight_decay": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["exp_avg"] = self.zeros_like(p, dtype)
        state["exp_avg_sq"] = self.zeros_like(p, dtype)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self.zeros_like(p, dtype)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str, *, grad_scale: Tensor | None = None,
                found_inf: Tensor | None = None) -> None:
        beta1, beta2 = group["betas"]
        scaling = {"grad_scale": grad_scale, "found_inf": found_inf} if impl == "fused" else {}
        _IMPLS[impl](
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            **scaling,
        )


class AdamW(Adam):
    r"""AdamW: Adam with weight decay decoupled from the gradient.

    :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam step: the same
    update as :class:`Adam` with ``decoupled_weight_decay=True`` and ``weight_decay``
    defaulting to 1e-2, as ``torch.optim.AdamW``.

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, impl=impl, state_dtype=state_dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True



def _reference_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, amsgrad: bool, maximize: bool,
                    decoupled_weight_decay: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        steps[i] += 1
        step = steps[i].item()

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _foreach_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor],
                  *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  amsgrad: bool, maximize: bool, decoupled_weight_decay: bool) -> None:
    for _, (d_params, d_grads, d_avgs, d_sqs, d_maxs, d_steps) in group_by_device_and_dtype(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        if maximize:
            d_grads = list(torch._foreach_neg(d_grads))
        torch._foreach_add_(d_steps, 1)
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(d_params, 1 - lr * weight_decay)
            elif maximize:  # d_grads is already a private copy
                torch._foreach_add_(d_grads, d_params, alpha=weight_decay)
            else:
                d_grads = list(torch._foreach_add(d_grads, d_params, alpha=weight_decay))

        torch._foreach_lerp_(d_avgs, d_grads, 1 - beta1)
        torch._foreach_mul_(d_sqs, beta2)
        torch._foreach_addcmul_(d_sqs, d_grads, d_grads, 1 - beta2)
        del d_grads

        step_values = [s.item() for s in d_steps]
        step_sizes = [-lr / (1 - beta1**t) for t in step_values]
        bias_correction2_sqrts = [(1 - beta2**t) ** 0.5 for t in step_values]
        if amsgrad:
            torch._foreach_maximum_(d_maxs, d_sqs)
            denoms = torch._foreach_sqrt(d_maxs)
        else:
            denoms = torch._foreach_sqrt(d_sqs)
        torch._foreach_div_(denoms, bias_correction2_sqrts)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(d_params, d_avgs, denoms, step_sizes)


def _fused_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor],
                *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
                grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    for _, (d_params, d_grads, d_avgs, d_sqs, d_maxs, d_steps) in group_by_device_and_dtype(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        torch._foreach_add_(d_steps, 1)
        kernel(d_params, d_grads, d_avgs, d_sqs, d_maxs, d_steps, amsgrad=amsgrad, lr=lr,
               beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize,
               grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None:  # a skipped step must not advance the counter
            torch._foreach_sub_(d_steps, [found_inf] * len(d_steps))


_IMPLS = {"reference": _reference_adam, "foreach": _foreach_adam, "fused": _fused_adam}
