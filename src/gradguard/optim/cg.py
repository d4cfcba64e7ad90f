"""Nonlinear conjugate gradient (Fletcher-Reeves, Polak-Ribiere+, Hestenes-Stiefel).

Full-batch and closure-based (``step(closure)``, as ``torch.optim.LBFGS``); see
:class:`~gradguard.optim.linesearch.FullBatchOptimizer` for the shared contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, Choice, Rule
from .base import ParamsT
from .linesearch import (
    ARMIJO_C1,
    OPTIONAL_COUNT,
    UNIT_OPEN,
    WOLFE_C2_CG,
    FullBatchOptimizer,
    check_wolfe_constants,
    initial_step,
)

POWELL_NU = 0.2
"""Powell's restart test: restart when :math:`|g_{k+1}^\\top g_k| \\ge 0.2 \\|g_{k+1}\\|^2`
(N&W eq. 5.52)."""

BETAS: tuple[str, ...] = ("fletcher_reeves", "polak_ribiere", "hestenes_stiefel")


def cg_beta(formula: str, grad: Tensor, previous_grad: Tensor, previous_direction: Tensor
            ) -> float:
    r"""The conjugacy coefficient :math:`\beta_{k+1}` (N&W section 5.2).

    * ``"fletcher_reeves"``: :math:`g_{k+1}^\top g_{k+1} / g_k^\top g_k`;
    * ``"polak_ribiere"`` (PR+): :math:`\max(0, g_{k+1}^\top y_k / g_k^\top g_k)`;
    * ``"hestenes_stiefel"``: :math:`g_{k+1}^\top y_k / d_k^\top y_k`,

    with :math:`y_k = g_{k+1} - g_k`. A zero or non-finite denominator gives 0 (a restart).
    """
    if formula == "fletcher_reeves":
        num, den = float(grad.dot(grad)), float(previous_grad.dot(previous_grad))
    else:
        y = grad - previous_grad
        num = float(grad.dot(y))
        den = (float(previous_grad.dot(previous_grad)) if formula == "polak_ribiere"
               else float(previous_direction.dot(y)))
    beta = num / den if den != 0.0 else 0.0
    if not math.isfinite(beta):
        return 0.0
    return max(beta, 0.0) if formula == "polak_ribiere" else beta


class NonlinearCG(FullBatchOptimizer):
    r"""Nonlinear conjugate gradient with a strong-Wolfe line search and restarts.

    .. math::
        d_0 = -g_0, \qquad x_{k+1} = x_k + t_k d_k, \qquad
        d_{k+1} = -g_{k+1} + \beta_{k+1} d_k

    :math:`\beta` from :func:`cg_beta` (``beta=``), :math:`t_k` from
    :func:`~gradguard.optim.linesearch.strong_wolfe` with ``c1``, ``c2`` starting at
    :func:`~gradguard.optim.linesearch.initial_step`. Restart (:math:`d = -g`)
    every ``restart_every`` iterations (default: the number of parameters), when
    Powell's test fires (:data:`POWELL_NU`), and whenever :math:`d` is not a
    descent direction (:math:`g^\top d \ge 0`) or the line search found no decrease.

    On a strictly convex quadratic with an exact line search the iterates are
    those of linear CG, which terminates in at most n iterations; the cubic
    interpolation of the strong-Wolfe search is exact for quadratics, so a small
    ``c2`` (e.g. 1e-6) makes the line search exact.

    Args:
        params: parameters (one group; all one dtype and device).
        beta: ``"polak_ribiere"`` (default, PR+), ``"fletcher_reeves"`` or
            ``"hestenes_stiefel"``.
        restart_every: restart period in iterations, or None for the number of parameters.
        powell_restart: apply Powell's restart test (default True).
        c1, c2: strong-Wolfe constants, ``0 < c1 < c2 < 1`` (defaults
            :data:`~gradguard.optim.linesearch.ARMIJO_C1`,
            :data:`~gradguard.optim.linesearch.WOLFE_C2_CG`).
        gtol, ftol, max_iterations, reuse_evaluation: see
            :class:`~gradguard.optim.linesearch.FullBatchOptimizer`.

    State (``state[first parameter]``): ``direction``, ``flat_grad``, ``x``,
    ``loss``, ``prev_loss``, ``since_restart``, ``n_iter``, ``func_evals``.

    References: Nocedal & Wright, *Numerical Optimization*, 2nd ed., chapter 5;
    Powell, "Restart procedures for the conjugate gradient method", Math.
    Programming 12 (1977).
    """

    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "beta": Choice(BETAS),
        "restart_every": OPTIONAL_COUNT,
        "powell_restart": FLAG,
        "c1": UNIT_OPEN,
        "c2": UNIT_OPEN,
    }

    def __init__(self, params: ParamsT, *, beta: str = "polak_ribiere",
                 restart_every: int | None = None, powell_restart: bool = True,
                 c1: float = ARMIJO_C1, c2: float = WOLFE_C2_CG, gtol: float = 1e-5,
                 ftol: float = 0.0, max_iterations: int | None = None,
                 reuse_evaluation: bool = True, impl: str = "auto") -> None:
        defaults = {"beta": beta, "restart_every": restart_every,
                    "powell_restart": powell_restart, "c1": c1, "c2": c2}
        super().__init__(params, defaults, gtol=gtol, ftol=ftol, max_iterations=max_iterations,
                         reuse_evaluation=reuse_evaluation, impl=impl)
        check_wolfe_constants(type(self).__name__, c1, c2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """One iteration; returns the loss before it. Diagnostics in :attr:`diagnostics`."""
        self._check_no_scaling("NonlinearCG", grad_scale, found_inf)
        state, x, value, grad = self._start(closure)
        assert closure is not None
        if self._converged_at_start(state, x, value, grad):
            return torch.tensor(value)
        group = self.param_groups[0]
        direction = self._direction(state, grad)
        slope = float(grad.dot(direction))
        evals_before = state["func_evals"]
        t0 = initial_step(value, state.get("prev_loss"), slope, float(grad.norm()))
        new_x, new_value, new_grad, t, _, success = self._line_search(
            closure, x, value, grad, direction, t0, "wolfe", group["c1"], group["c2"])
        state["prev_loss"] = value
        if t > 0.0:
            state["direction"] = direction
            state["since_restart"] = state.get("since_restart", 0) + 1
        else:  # no decrease along d: the next step restarts along -g
            state.pop("direction", None)
        self._finish(state, x, value, new_x, new_value, new_grad, t,
                     state["func_evals"] - evals_before, success)
        state["prev_grad"] = grad
        return torch.tensor(value)

    def _direction(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        """:math:`d_k`, or :math:`-g_k` when a restart is due."""
        group = self.param_groups[0]
        previous = state.get("direction")
        previous_grad = state.get("prev_grad")
        period = group["restart_every"] or grad.numel()
        if (previous is None or previous_grad is None
                or state.get("since_restart", 0) >= period
                or (group["powell_restart"] and abs(float(grad.dot(previous_grad)))
                    >= POWELL_NU * float(grad.dot(grad)))):
            state["since_restart"] = 0
            return -grad
        direction = -grad + cg_beta(group["beta"], grad, previous_grad, previous) * previous
        if not float(grad.dot(direction)) < 0.0:
            state["since_restart"] = 0
            return -grad
        return direction
