"""Damped Newton with Levenberg-Marquardt regularisation, exact-Hessian or Hessian-free.

Full-batch and closure-based; see
:class:`~gradguard.optim.linesearch.FullBatchOptimizer` for the shared contract.
Unlike gradient descent and CG, Newton differentiates the loss twice itself, so
its closure returns the loss **without** calling ``backward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, Choice, Rule
from .base import ParamsT
from .linesearch import (
    ARMIJO_C1,
    OPTIONAL_COUNT,
    UNIT_OPEN,
    WOLFE_C2_GD,
    FullBatchOptimizer,
    OptionalRule,
    check_wolfe_constants,
)

DAMPING_GROWTH = 10.0
"""Factor the regularisation :math:`\\mu` grows by after a failed Cholesky factorisation."""


def dense_hessian(grad: Tensor, params: list[Tensor]) -> Tensor:
    """The Hessian from a flat gradient built with ``create_graph=True``.

    All n Hessian-vector products in one vectorised double backward
    (``torch.autograd.grad(..., is_grads_batched=True)``, which runs on
    ``torch.func.vmap``), symmetrised.
    """
    n = grad.numel()
    eye = torch.eye(n, dtype=grad.dtype, device=grad.device)
    rows = torch.autograd.grad(grad, params, grad_outputs=eye, is_grads_batched=True,
                               retain_graph=True, allow_unused=True)
    hessian = torch.cat([r.reshape(n, -1) if r is not None
                         else torch.zeros(n, p.numel(), dtype=grad.dtype, device=grad.device)
                         for r, p in zip(rows, params, strict=True)], dim=1)
    return 0.5 * (hessian + hessian.T)


def regularised_newton_direction(hessian: Tensor, grad: Tensor, damping: float
                                 ) -> tuple[Tensor, float]:
    r"""Solve :math:`(H + \mu I) d = -g` with the smallest :math:`\mu` in a ladder making it PD.

    :math:`\mu_0 = 0` when :math:`\min_i H_{ii} > 0`, else :math:`-\min_i H_{ii} +`
    ``damping``; each failed Cholesky factorisation raises :math:`\mu` to
    :math:`\max(` :data:`DAMPING_GROWTH` :math:`\mu,` ``damping`` :math:`)`
    (N&W Algorithm 3.3). Returns ``(d, mu)``.
    """
    n = hessian.shape[0]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    min_diag = float(hessian.diagonal().min())
    mu = 0.0 if min_diag > 0.0 else -min_diag + damping
    scale = max(float(hessian.abs().max()), 1.0)
    for _ in range(100):
        factor, info = torch.linalg.cholesky_ex(hessian + mu * eye)
        if int(info) == 0:
            d = torch.cholesky_solve(-grad.unsqueeze(1), factor).squeeze(1)
            if bool(torch.isfinite(d).all()):
                return d, mu
        mu = max(DAMPING_GROWTH * mu, damping * scale)
    return -grad, math.inf


def truncated_cg(hvp: Callable[[Tensor], Tensor], grad: Tensor, damping: float,
                 tolerance: float, max_iterations: int) -> tuple[Tensor, int]:
    r"""Approximately solve :math:`(H + \mu I) d = -g` by CG (N&W Algorithm 7.1).

    Stops when the residual is below ``tolerance`` :math:`\cdot \|g\|`, after
    ``max_iterations``, or at a direction of non-positive curvature (then the
    current iterate, or :math:`-g` on the first iteration, is returned). Returns
    ``(d, Hessian-vector products used)``.
    """
    z = torch.zeros_like(grad)
    r = grad.clone()
    p = -r
    rr = float(r.dot(r))
    target = tolerance * math.sqrt(rr)
    products = 0
    for i in range(max_iterations):
        hp = hvp(p) + damping * p
        products += 1
        curvature = float(p.dot(hp))
        if curvature <= 0.0 or not math.isfinite(curvature):
            return (-grad if i == 0 else z), products
        alpha = rr / curvature
        z = z + alpha * p
        r = r + alpha * hp
        rr_next = float(r.dot(r))
        if math.sqrt(rr_next) <= target:
            break
        p = -r + (rr_next / rr) * p
        rr = rr_next
    return z, products


class Newton(FullBatchOptimizer):
    r"""Damped Newton's method, with an exact Hessian or Hessian-free (Newton-CG).

    .. math::
        (H_k + \mu_k I)\, d_k = -g_k, \qquad x_{k+1} = x_k + t_k d_k

    * ``hessian_free=False`` (small problems, n up to a few thousand): :math:`H_k`
      is formed by :func:`dense_hessian` and the system solved by Cholesky with the
      Levenberg-Marquardt shift :math:`\mu_k` of :func:`regularised_newton_direction`
      (0 where :math:`H_k` is positive definite, so the step is Newton's);
    * ``hessian_free=True``: :math:`d_k` from :func:`truncated_cg` with
      Hessian-vector products by double backward, relative residual
      ``cg_tolerance`` (default :math:`\min(0.5, \sqrt{\|g_k\|})`, superlinear
      convergence; N&W eq. 7.3) and :math:`\mu_k =` ``damping`` :math:`\cdot` 0.

    :math:`t_k` comes from a line search starting at the Newton step ``t = 1``
    (``"armijo"``, default, or ``"wolfe"``).

    The closure must return the loss without calling ``backward()``: Newton takes
    the gradient with ``create_graph=True`` to differentiate it again.

    Args:
        params: parameters (one group; all one dtype and device).
        hessian_free: use Hessian-vector products and truncated CG (default False).
        damping: smallest Levenberg-Marquardt shift tried when :math:`H` is not
            positive definite, relative to :math:`\max |H_{ij}|` (default 1e-3); for
            ``hessian_free``, a constant shift added to every product (default 0
            there is equivalent to pure Newton-CG).
        line_search: ``"armijo"`` (default) or ``"wolfe"``.
        c1, c2: line-search constants.
        cg_tolerance: relative residual of truncated CG, or None for the forcing
            sequence above.
        max_cg_iterations: CG iterations per step, or None for the number of parameters.
        gtol, ftol, max_iterations: see
            :class:`~gradguard.optim.linesearch.FullBatchOptimizer`.

    Diagnostics: :attr:`hessian_evals` (dense Hessians) and
    :attr:`hessian_vector_products` count curvature work beside the closure
    evaluations; :attr:`last_damping` is the last shift :math:`\mu`. Each step
    evaluates the closure at its start (with the graph the Hessian needs), so
    ``reuse_evaluation`` does not apply.

    Reference: Nocedal & Wright, *Numerical Optimization*, 2nd ed., sections 3.4 and 7.1.
    """

    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "hessian_free": FLAG,
        "damping": NON_NEGATIVE,
        "line_search": Choice(("armijo", "wolfe")),
        "c1": UNIT_OPEN,
        "c2": UNIT_OPEN,
        "cg_tolerance": OptionalRule(POSITIVE),
        "max_cg_iterations": OPTIONAL_COUNT,
    }

    def __init__(self, params: ParamsT, *, hessian_free: bool = False,
                 damping: float | None = None, line_search: str = "armijo",
                 c1: float = ARMIJO_C1, c2: float = WOLFE_C2_GD,
                 cg_tolerance: float | None = None, max_cg_iterations: int | None = None,
                 gtol: float = 1e-5, ftol: float = 0.0, max_iterations: int | None = None,
                 impl: str = "auto") -> None:
        if damping is None:
            damping = 0.0 if hessian_free else 1e-3
        defaults = {"hessian_free": hessian_free, "damping": damping,
                    "line_search": line_search, "c1": c1, "c2": c2,
                    "cg_tolerance": cg_tolerance, "max_cg_iterations": max_cg_iterations}
        super().__init__(params, defaults, gtol=gtol, ftol=ftol, max_iterations=max_iterations,
                         reuse_evaluation=False, impl=impl)
        check_wolfe_constants(type(self).__name__, c1, c2)
        self.hessian_evals = 0
        self.hessian_vector_products = 0
        self.last_damping = 0.0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """One Newton iteration; returns the loss before it. Diagnostics in :attr:`diagnostics`."""
        self._check_no_scaling("Newton", grad_scale, found_inf)
        if closure is None:
            raise ValueError("Newton.step needs a closure that returns the loss (without "
                             "calling backward())")
        state = self._state
        group = self.param_groups[0]
        params = self._params
        x = self._flat_params()
        value, grad_graph, loss = self._evaluate(closure, create_graph=True)
        grad = grad_graph.detach()
        if not math.isfinite(value) or not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(f"Newton: the loss or gradient at the current parameters "
                                     f"is not finite (loss {value})")
        if self._converged_at_start(state, x, value, grad):
            return torch.tensor(value)
        if group["hessian_free"]:
            direction = self._hessian_free_direction(grad_graph, params, grad)
        else:
            with torch.enable_grad():
                hessian = dense_hessian(grad_graph, params)
            self.hessian_evals += 1
            direction, self.last_damping = regularised_newton_direction(
                hessian.detach(), grad, group["damping"])
        del grad_graph, loss
        if not float(grad.dot(direction)) < 0.0:
            direction = -grad
        evals_before = state["func_evals"]
        new_x, new_value, new_grad, t, _, success = self._line_search(
            closure, x, value, grad, direction, 1.0, group["line_search"], group["c1"],
            group["c2"])
        self._finish(state, x, value, new_x, new_value, new_grad, t,
                     state["func_evals"] - evals_before, success)
        return torch.tensor(value)

    def _hessian_free_direction(self, grad_graph: Tensor, params: list[Tensor],
                                grad: Tensor) -> Tensor:
        group = self.param_groups[0]

        def hvp(v: Tensor) -> Tensor:
            with torch.enable_grad():
                parts = torch.autograd.grad(grad_graph, params, grad_outputs=v,
                                            retain_graph=True, allow_unused=True)
            return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                              for h, p in zip(parts, params, strict=True)])

        grad_norm = float(grad.norm())
        tolerance = group["cg_tolerance"]
        if tolerance is None:
            tolerance = min(0.5, math.sqrt(grad_norm))
        direction, products = truncated_cg(hvp, grad, group["damping"], tolerance,
                                           group["max_cg_iterations"] or grad.numel())
        self.hessian_vector_products += products
        self.last_damping = group["damping"]
        return direction
