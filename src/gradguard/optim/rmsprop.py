"""RMSprop (Hinton, lecture 6e, 2012), centered variant (Graves 2013).

Drop-in for ``torch.optim.RMSprop``: same arguments, defaults, param-group keys
(except torch's ``foreach``/``capturable``/``differentiable`` flags, replaced by
one ``impl``) and state keys (``step``, ``square_avg``, ``momentum_buffer`` when
momentum > 0, ``grad_avg`` when centered).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_CLOSED, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype


class RMSprop(Optimizer):
    r"""RMSprop: steps scaled by a moving root-mean-square of the gradients.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`,
    starting from :math:`v_0 = \bar g_0 = b_0 = 0`:

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        g_t &\leftarrow g_t + \lambda\theta \quad \text{(coupled weight decay)} \\
        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g_t \text{ if centered} \\
        d_t &= \sqrt{\max(v_t - \bar g_t^2, 0)} + \epsilon \text{ if centered,
            else } \sqrt{v_t} + \epsilon \\
        b_t &= \mu b_{t-1} + g_t / d_t, \quad \theta \leftarrow \theta - \gamma b_t
            \text{ if } \mu > 0 \\
        \theta &\leftarrow \theta - \gamma\, g_t / d_t \text{ otherwise}

    eps is added *after* the square root, and after centering (TensorFlow adds it
    inside the root), as in torch.optim. No bias correction: :math:`v_t` starts at 0.
    The centered variance is clamped at 0 before the root: rounding can leave it at
    about -1e-16 where the gradient barely varies, and torch.optim then returns NaN.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1e-2), ``>= 0``.
        alpha: smoothing constant :math:`\alpha` in ``[0, 1]`` (default 0.99). torch
            accepts any ``alpha >= 0``; above 1 the averages take negative weights and
            :math:`v_t` can turn negative, so gradguard refuses it.
        eps: :math:`\epsilon > 0` (default 1e-8). torch allows 0, which turns a
            never-updated coordinate into 0/0; gradguard refuses it.
        weight_decay: :math:`\lambda \ge 0` (default 0), added to the gradient.
        momentum: :math:`\mu \ge 0` (default 0).
        centered: divide by an estimate of the gradient's standard deviation
            instead of its root mean square (default False).
        maximize: ascend instead of descend (default False).
        impl: ``"auto"``, ``"reference"`` or ``"foreach"`` (torch has no fused kernel).
        state_dtype: dtype of the state tensors (default: float32 for half-precision
            parameters, else the parameter's dtype).

    References: Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning",
    lecture 6e, 2012; Graves, "Generating Sequences With Recurrent Neural Networks",
    arXiv:1308.0850, 2013 (centered).
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "alpha": UNIT_CLOSED,
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
        "centered": FLAG,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["square_avg"] = self.zeros_like(p, dtype)
        if group["momentum"] > 0:
            state["momentum_buffer"] = self.zeros_like(p, dtype)
        if group["centered"]:
            state["grad_avg"] = self.zeros_like(p, dtype)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        momentum, centered = group["momentum"], group["centered"]
        # A group switched to momentum or centering after its first step (a momentum
        # warm-up from 0, say) starts the new buffer at zero; torch.optim raises KeyError.
        for p, s in zip(params, states, strict=True):
            if momentum > 0 and "momentum_buffer" not in s:
                s["momentum_buffer"] = self.zeros_like(p, p.dtype)
            if centered and "grad_avg" not in s:
                s["grad_avg"] = self.zeros_like(p, p.dtype)
        _IMPLS[impl](
            params,
            grads,
            [s["square_avg"] for s in states],
            [s["grad_avg"] for s in states] if centered else [],
            [s["momentum_buffer"] for s in states] if momentum > 0 else [],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            centered=centered,
            maximize=group["maximize"],
        )



def _reference_rmsprop(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                       grad_avgs: list[Tensor], momentum_buffers: list[Tensor],
                       steps: list[Tensor], *, lr: float, alpha: float, eps: float,
                       weight_decay: float, momentum: float, centered: bool,
                       maximize: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        square_avg = square_avgs[i]
        steps[i] += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if centered:
            grad_avg = grad_avgs[i]
            grad_avg.lerp_(grad, 1 - alpha)
            # clamp: v - gbar^2 >= 0 in exact arithmetic, but rounding (a fused
            # multiply-add) can leave -1e-16, whose sqrt is NaN in torch.optim
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).clamp_min_(0).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(eps)

        if momentum > 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)


def _foreach_rmsprop(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                     grad_avgs: list[Tensor], momentum_buffers: list[Tensor],
                     steps: list[Tensor], *, lr: float, alpha: float, eps: float,
                     weight_decay: float, momentum: float, centered: bool,
                     maximize: bool) -> None:
    # Negating the gradient only flips signs, which is exact: with maximize the update
    # carries the sign (g*g absorbs it; so do the divisions' coefficients), so no negated
    # copy is made, except for the centered average, which needs the true -g.
    # With weight decay, g - wd*theta is exactly -(-g + wd*theta).
    negated_copy = maximize and centered
    sign = -1.0 if maximize and not negated_copy else 1.0
    for _, (d_params, d_grads, d_sqs, d_gavgs, d_bufs, d_steps) in (
            group_by_device_and_dtype(params, grads, square_avgs, grad_avgs, momentum_buffers,
                                      steps)):
        torch._foreach_add_(d_steps, 1)
        for (c_params, c_grads, c_sqs, c_gavgs, c_bufs), _ in cpu_blocks(
                [d_params, d_grads, d_sqs, d_gavgs, d_bufs]):
            if negated_copy:
                c_grads = list(torch._foreach_neg(c_grads))
                if weight_decay != 0:  # c_grads is already a private copy
                    torch._foreach_add_(c_grads, c_params, alpha=weight_decay)
            elif weight_decay != 0:
                c_grads = list(torch._foreach_add(c_grads, c_params, alpha=sign * weight_decay))

            torch._foreach_mul_(c_sqs, alpha)
            torch._foreach_addcmul_(c_sqs, c_grads, c_grads, value=1 - alpha)
            if centered:
                torch._foreach_lerp_(c_gavgs, c_grads, 1 - alpha)
                avg = torch._foreach_addcmul(c_sqs, c_gavgs, c_gavgs, value=-1)
                torch._foreach_clamp_min_(avg, 0.0)
                torch._foreach_sqrt_(avg)
            else:
                avg = torch._foreach_sqrt(c_sqs)
            torch._foreach_add_(avg, eps)

            if momentum > 0:
                torch._foreach_mul_(c_bufs, momentum)
                torch._foreach_addcdiv_(c_bufs, c_grads, avg, value=sign)
                torch._foreach_add_(c_params, c_bufs, alpha=-lr)
            else:
                torch._foreach_addcdiv_(c_params, c_grads, avg, value=-sign * lr)

_IMPLS = {"reference": _reference_rmsprop, "foreach": _foreach_rmsprop}
