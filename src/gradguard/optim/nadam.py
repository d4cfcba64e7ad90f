"""NAdam (Dozat 2016): Adam with Nesterov momentum and a momentum schedule.

Drop-in for ``torch.optim.NAdam``: same arguments, defaults, param-group keys
(except torch's ``foreach``/``capturable``/``differentiable`` flags, replaced by
one ``impl``) and state keys (``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_HALF_OPEN, Pair, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype, scalar_step


class NAdam(Optimizer):
    r"""NAdam: Adam with Nesterov momentum, with coupled or decoupled weight decay.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`
    (:math:`\psi` is ``momentum_decay``):

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        \theta &\leftarrow \theta (1 - \gamma\lambda) \text{ if decoupled_weight_decay,
            else } g_t \leftarrow g_t + \lambda\theta \\
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right) \qquad
        \mu_{t+1} = \beta_1 \left(1 - \tfrac12\, 0.96^{(t+1)\psi}\right) \qquad
        P_t = P_{t-1} \mu_t,\ P_0 = 1 \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta &\leftarrow \theta - \gamma \left(\frac{1-\mu_t}{1-P_t}\, g_t
            + \frac{\mu_{t+1}}{1-P_t\,\mu_{t+1}}\, m_t\right)
            \Big/ \left(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\right)

    eps is added *after* the bias-corrected square root, as in torch.optim. The
    momentum schedule :math:`\mu_t` is torch's (Dozat's ``0.96`` base with
    ``momentum_decay`` as exponent scale). The product :math:`P_t` is the state
    ``mu_product``: a 0-dim CPU tensor of torch's scalar dtype (float32, float64
    when that is the default dtype), so it is rounded to that dtype each step, as in
    torch. As in torch.optim, a loaded ``mu_product`` takes the parameter's dtype;
    gradguard keeps it on the CPU.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 2e-3), ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.999)).
        eps: :math:`\epsilon > 0` (default 1e-8). torch allows 0, which turns a
            never-updated coordinate into 0/0; gradguard refuses it.
        weight_decay: :math:`\lambda \ge 0` (default 0).
        momentum_decay: :math:`\psi \ge 0` (default 4e-3).
        decoupled_weight_decay: AdamW-style decay, i.e. NAdamW (default False).
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (= ``"foreach"``), ``"reference"`` or ``"foreach"``; torch
            has no fused NAdam kernel.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (default: float32 for
            half-precision parameters, else the parameter's dtype).

    Reference: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "betas": Pair(UNIT_HALF_OPEN, UNIT_HALF_OPEN),
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "momentum_decay": NON_NEGATIVE,
        "decoupled_weight_decay": FLAG,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
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
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Accept torch.optim state dicts, including old ones with a float ``mu_product``."""
        super().__setstate__(state)
        for p_state in self.state.values():
            product = p_state.get("mu_product")
            if product is not None and not torch.is_tensor(product):
                p_state["mu_product"] = scalar_step().fill_(float(product))

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["mu_product"] = scalar_step().fill_(1.0)
        state["exp_avg"] = self.zeros_like(p, dtype)
        state["exp_avg_sq"] = self.zeros_like(p, dtype)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        beta1, beta2 = group["betas"]
        _IMPLS[impl](
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["mu_product"] for s in states],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )



def _momentum(beta1: float, momentum_decay: float, step: float) -> float:
    """torch's momentum schedule: mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def _reference_nadam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], mu_products: list[Tensor], steps: list[Tensor],
                     *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     momentum_decay: float, decoupled_weight_decay: bool,
                     maximize: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, mu_product = exp_avgs[i], exp_avg_sqs[i], mu_products[i]
        steps[i] += 1
        step = steps[i].item()
        bias_correction2 = 1 - beta2**step

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        mu = _momentum(beta1, momentum_decay, step)
        mu_next = _momentum(beta1, momentum_decay, step + 1)
        mu_product.mul_(mu)  # rounded to mu_product's dtype, as in torch

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)

        product = mu_product.item()
        param.addcdiv_(grad, denom, value=-lr * (1.0 - mu) / (1.0 - product))
        param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))


def _foreach_nadam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   exp_avg_sqs: list[Tensor], mu_products: list[Tensor], steps: list[Tensor],
                   *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   momentum_decay: float, decoupled_weight_decay: bool,
                   maximize: bool) -> None:
    # sqrt(v / c^2) + eps = (sqrt(v) + eps c) / c with c = sqrt(1 - beta2^t): the bias
    # correction moves into the per-tensor scalars, saving one pass over the state.
    for _, (d_params, d_grads, d_avgs, d_sqs, d_products, d_steps) in (
            group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps)):
        torch._foreach_add_(d_steps, 1)
        grad_sizes: list[float] = []
        avg_sizes: list[float] = []
        scaled_eps: list[float] = []
        for step_t, mu_product in zip(d_steps, d_products, strict=True):
            step = step_t.item()
            mu = _momentum(beta1, momentum_decay, step)
            mu_next = _momentum(beta1, momentum_decay, step + 1)
            mu_product.mul_(mu)
            product = mu_product.item()
            correction = (1 - beta2**step) ** 0.5
            grad_sizes.append(-lr * (1.0 - mu) / (1.0 - product) * correction)
            avg_sizes.append((-lr * mu_next) / (1.0 - product * mu_next) * correction)
            scaled_eps.append(eps * correction)

        for (b_params, b_grads, b_avgs, b_sqs), (b_grad_sizes, b_avg_sizes, b_eps) in (
                cpu_blocks([d_params, d_grads, d_avgs, d_sqs],
                             [grad_sizes, avg_sizes, scaled_eps])):
            if maximize:
                b_grads = list(torch._foreach_neg(b_grads))
            if weight_decay != 0:
                if decoupled_weight_decay:
                    torch._foreach_mul_(b_params, 1 - lr * weight_decay)
                elif maximize:  # b_grads is already a private copy
                    torch._foreach_add_(b_grads, b_params, alpha=weight_decay)
                else:
                    b_grads = list(torch._foreach_add(b_grads, b_params, alpha=weight_decay))

            torch._foreach_lerp_(b_avgs, b_grads, 1 - beta1)
            torch._foreach_mul_(b_sqs, beta2)
            torch._foreach_addcmul_(b_sqs, b_grads, b_grads, 1 - beta2)
            denoms = torch._foreach_sqrt(b_sqs)
            torch._foreach_add_(denoms, b_eps)
            torch._foreach_addcdiv_(b_params, b_grads, denoms, b_grad_sizes)
            torch._foreach_addcdiv_(b_params, b_avgs, denoms, b_avg_sizes)


_IMPLS = {"reference": _reference_nadam, "foreach": _foreach_nadam}
