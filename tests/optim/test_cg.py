"""NonlinearCG: the beta formulas, finite termination on quadratics, Rosenbrock vs scipy CG."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from gradguard.optim.cg import BETAS, NonlinearCG, cg_beta
from gradguard.optim.linesearch import GradientDescent
from tests.optim.test_linesearch import (
    KAPPAS,
    minimize_rosenbrock,
    quadratic,
    quadratic_closure,
    scipy_rosenbrock,
)


def test_beta_formulas() -> None:
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g_prev = torch.tensor([2.0, -1.0], dtype=torch.float64)
    d_prev = torch.tensor([-2.0, 0.5], dtype=torch.float64)
    y = g - g_prev
    assert cg_beta("fletcher_reeves", g, g_prev, d_prev) == pytest.approx(5.0 / 5.0)
    assert cg_beta("polak_ribiere", g, g_prev, d_prev) == pytest.approx(float(g @ y) / 5.0)
    assert cg_beta("hestenes_stiefel", g, g_prev, d_prev) == pytest.approx(
        float(g @ y) / float(d_prev @ y))
    # PR+ clips a negative beta to 0 (a restart)
    assert cg_beta("polak_ribiere", g_prev * 0.1, g_prev, d_prev) == 0.0


@pytest.mark.parametrize("beta", BETAS)
def test_exact_line_search_terminates_within_n_iterations_on_quadratics(beta: str) -> None:
    """With an exact line search nonlinear CG is linear CG: done in <= n iterations.

    Strong Wolfe with c2 = 1e-6 is exact up to rounding on a quadratic (its
    interpolation is exact); "done" is ||g|| <= 1e-10 ||g_0||.
    """
    for kappa in KAPPAS:
        a, x0 = quadratic(kappa)
        n = x0.numel()
        x = x0.clone().requires_grad_()
        opt = NonlinearCG([x], beta=beta, c1=1e-8, c2=1e-6, gtol=0.0)
        closure = quadratic_closure(opt, x, a)
        initial = float((a @ x0).norm())
        for _ in range(n):
            opt.step(closure)
            assert opt.diagnostics is not None
            if opt.diagnostics.grad_norm <= 1e-10 * initial:
                break
        assert opt.diagnostics.grad_norm <= 1e-10 * initial, kappa
        assert opt.diagnostics.iteration <= n


def test_restart_every_iteration_is_gradient_descent() -> None:
    a, x0 = quadratic(100.0)
    x, y = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    cg = NonlinearCG([x], restart_every=1, c2=0.5)
    gd = GradientDescent([y], c2=0.5)
    for _ in range(10):
        cg.step(quadratic_closure(cg, x, a))
        gd.step(quadratic_closure(gd, y, a))
    assert torch.equal(x.detach(), y.detach())


def test_directions_are_descent_directions() -> None:
    a, x0 = quadratic(1e3)
    for beta in BETAS:
        x = x0.clone().requires_grad_()
        opt = NonlinearCG([x], beta=beta)
        closure = quadratic_closure(opt, x, a)
        for _ in range(15):
            opt.step(closure)
            assert opt.diagnostics is not None and opt.diagnostics.loss_decrease > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"beta": "dai_yuan"}, r"invalid beta='dai_yuan': allowed are 'fletcher_reeves'"),
    ({"c1": 0.3, "c2": 0.2}, r"invalid c2=0.2"),
    ({"restart_every": 0}, r"invalid restart_every=0"),
])
def test_invalid_hyperparameters_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NonlinearCG([torch.zeros(2, requires_grad=True)], **kwargs)


def test_state_dict_round_trip_resumes_identically() -> None:
    a, x0 = quadratic(1e3)
    x = x0.clone().requires_grad_()
    opt = NonlinearCG([x])
    for _ in range(4):
        opt.step(quadratic_closure(opt, x, a))
    y = x.detach().clone().requires_grad_()
    resumed = NonlinearCG([y])
    resumed.load_state_dict(opt.state_dict())
    assert torch.equal(resumed.state[y]["direction"], opt.state[x]["direction"])
    for _ in range(4):
        opt.step(quadratic_closure(opt, x, a))
        resumed.step(quadratic_closure(resumed, y, a))
    assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("beta", BETAS)
def test_rosenbrock_within_2x_of_scipy_cg(
        beta: str, record_property: Callable[[str, object], None]) -> None:
    """scipy's CG is Polak-Ribiere with a strong-Wolfe search: the like-for-like peer.

    Counts compared: closure evaluations (each gives f and g) against scipy's
    ``nfev`` (its line search evaluates f and g together, so ``njev`` ~ ``nfev``).
    """
    reference = scipy_rosenbrock("CG", gtol=1e-9)
    opt, x = minimize_rosenbrock(lambda p: NonlinearCG(p, beta=beta, gtol=1e-9))
    d = opt.diagnostics
    record_property("counts", {"iterations": d.iteration, "func_evals": d.func_evals,
                               "scipy_nit": reference.nit, "scipy_nfev": reference.nfev})
    assert float((x - 1.0).norm()) < 1e-6
    assert d.converged and d.criterion == "gradient_tolerance"
    assert d.func_evals <= 2 * reference.nfev
    assert d.iteration <= 2 * reference.nit
