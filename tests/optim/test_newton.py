"""Newton: one step on quadratics, regularised on non-convex problems, Rosenbrock vs scipy."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from gradguard.optim.newton import Newton, dense_hessian, regularised_newton_direction
from tests.optim.test_linesearch import (
    KAPPAS,
    minimize_rosenbrock,
    quadratic,
    quadratic_closure,
    scipy_rosenbrock,
)


def test_dense_hessian_of_a_quadratic_is_its_matrix() -> None:
    a, x0 = quadratic(100.0, n=6)
    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(0.5 * x @ a @ x, [x], create_graph=True)
    torch.testing.assert_close(dense_hessian(grad, [x]), a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hessian_free", [False, True])
def test_one_step_solves_a_quadratic(hessian_free: bool) -> None:
    """Full Newton step t = 1 lands on x* = 0; Hessian-free with a tight CG tolerance too."""
    for kappa in KAPPAS:
        a, x0 = quadratic(kappa)
        x = x0.clone().requires_grad_()
        opt = Newton([x], hessian_free=hessian_free, cg_tolerance=1e-13, gtol=1e-8)
        closure = quadratic_closure(opt, x, a, backward=False)
        opt.step(closure)
        d = opt.diagnostics
        assert d is not None
        assert d.iteration == 1 and d.step_size == 1.0 and d.line_search_evals == 1
        assert float(x.detach().norm()) <= 1e-9 * float(x0.norm()), kappa
        assert d.converged and d.criterion == "gradient_tolerance"
        assert opt.hessian_vector_products <= (x0.numel() if hessian_free else 0) * len(KAPPAS)


def test_indefinite_hessian_is_regularised_into_a_descent_direction() -> None:
    hessian = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    direction, mu = regularised_newton_direction(hessian, grad, 1e-3)
    assert mu > 1.0
    assert float(grad @ direction) < 0.0

    x = torch.tensor([0.5, 0.1], dtype=torch.float64, requires_grad=True)
    opt = Newton([x], gtol=1e-10)
    closure = lambda: x[0] ** 2 - x[1] ** 2 + x[1] ** 4  # noqa: E731
    for _ in range(20):
        opt.step(closure)
        if opt.diagnostics is not None and opt.diagnostics.done:
            break
    minimum = torch.tensor([0.0, 2 ** -0.5], dtype=torch.float64)
    assert float((x.detach().abs() - minimum).norm()) < 1e-8


def test_closure_that_calls_backward_is_refused_clearly() -> None:
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = Newton([x])

    def closure() -> Tensor:
        loss = (x ** 4).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(closure)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_invalid_hyperparameters_are_named() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"invalid damping=-1.0"):
        Newton([x], damping=-1.0)
    with pytest.raises(ValueError, match=r"invalid cg_tolerance=0.0"):
        Newton([x], hessian_free=True, cg_tolerance=0.0)
    with pytest.raises(ValueError, match=r"invalid line_search='fixed'"):
        Newton([x], line_search="fixed")


def test_rosenbrock_within_2x_of_scipy_newton_cg(
        record_property: Callable[[str, object], None]) -> None:
    """Exact-Hessian Newton vs scipy Newton-CG given the exact Hessian (``hess=rosen_hess``).

    scipy has no dense-Hessian Newton; Newton-CG with the exact Hessian is the
    nearest. Compared: closure evaluations (f and g) vs scipy ``nfev``.
    """
    reference = scipy_rosenbrock("Newton-CG", xtol=1e-10)
    opt, x = minimize_rosenbrock(lambda p: Newton(p, gtol=1e-9), backward=False)
    d = opt.diagnostics
    record_property("counts", {"iterations": d.iteration, "func_evals": d.func_evals,
                               "hessians": opt.hessian_evals, "scipy_nit": reference.nit,
                               "scipy_nfev": reference.nfev, "scipy_nhev": reference.nhev})
    assert float((x - 1.0).norm()) < 1e-6
    assert d.converged
    assert d.func_evals <= 2 * reference.nfev
    assert opt.hessian_evals <= 2 * reference.nhev


def test_hessian_free_rosenbrock_within_2x_of_scipy_newton_cg(
        record_property: Callable[[str, object], None]) -> None:
    """Hessian-free Newton-CG vs scipy Newton-CG: evaluations vs ``nfev``, products vs ``nhev``."""
    reference = scipy_rosenbrock("Newton-CG", xtol=1e-10)
    opt, x = minimize_rosenbrock(lambda p: Newton(p, hessian_free=True, gtol=1e-9),
                                 backward=False)
    d = opt.diagnostics
    record_property("counts", {"iterations": d.iteration, "func_evals": d.func_evals,
                               "hessian_vector_products": opt.hessian_vector_products,
                               "scipy_nit": reference.nit, "scipy_nfev": reference.nfev,
                               "scipy_nhev": reference.nhev})
    assert float((x - 1.0).norm()) < 1e-6
    assert d.converged
    assert d.func_evals <= 2 * reference.nfev
    assert opt.hessian_vector_products <= 2 * reference.nhev
