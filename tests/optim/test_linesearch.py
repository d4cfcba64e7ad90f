"""Line searches and GradientDescent: conditions met, linear rate on quadratics, Rosenbrock."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor

from gradguard.optim.linesearch import (
    GradientDescent,
    armijo_backtracking,
    cubic_minimizer,
    strong_wolfe,
)

KAPPAS = [10.0, 1e2, 1e3, 1e4]
ROSENBROCK_START = (-1.2, 1.0)


# ------------------------------------------------------------------ problems
def quadratic(kappa: float, n: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``A`` (SPD, eigenvalues evenly spaced in [1, kappa]) and a random start; f* = 0 at 0.

    Evenly spaced rather than log-spaced eigenvalues: on log-spaced spectra with
    kappa >= 100 even textbook linear CG loses finite termination to rounding in
    float64, so those would test rounding, not the method.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, kappa, n, dtype=torch.float64)) @ q.T
    return 0.5 * (a + a.T), torch.randn(n, generator=gen, dtype=torch.float64)


def quadratic_closure(opt: torch.optim.Optimizer, x: Tensor, a: Tensor, *,
                      backward: bool = True) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = 0.5 * x @ a @ x
        if backward:
            loss.backward()
        return loss
    return closure


def rosenbrock(x: Tensor) -> Tensor:
    return 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2


def minimize_rosenbrock(make: Callable[[list[Tensor]], Any], *, backward: bool = True,
                        max_steps: int = 50_000) -> tuple[Any, Tensor]:
    """Run ``make([x])`` from (-1.2, 1) until a stopping criterion fires."""
    x = torch.tensor(ROSENBROCK_START, dtype=torch.float64, requires_grad=True)
    opt = make([x])

    def closure() -> Tensor:
        opt.zero_grad()
        loss = rosenbrock(x)
        if backward:
            loss.backward()
        return loss

    for _ in range(max_steps):
        opt.step(closure)
        if opt.diagnostics.done:
            break
    return opt, x.detach()


def scipy_rosenbrock(method: str, **options: Any) -> scipy.optimize.OptimizeResult:
    """scipy on the same problem, to the same accuracy (asserted)."""
    extra: dict[str, Any] = {}
    if method == "Newton-CG":
        extra["hess"] = scipy.optimize.rosen_hess
    result = scipy.optimize.minimize(scipy.optimize.rosen, np.array(ROSENBROCK_START),
                                     jac=scipy.optimize.rosen_der, method=method,
                                     options=options, **extra)
    assert np.linalg.norm(result.x - 1.0) < 1e-6
    return result


# ------------------------------------------------------------- line searches
def phi_of(f: Callable[[float], float], df: Callable[[float], float]
           ) -> Callable[[float], tuple[float, float]]:
    return lambda t: (f(t), df(t))


def test_cubic_minimizer_is_exact_for_a_quadratic() -> None:
    f, df = (lambda t: 3.0 * (t - 0.7) ** 2 + 1.0), (lambda t: 6.0 * (t - 0.7))
    assert cubic_minimizer(0.0, f(0.0), df(0.0), 2.0, f(2.0), df(2.0)) == pytest.approx(0.7)


def test_cubic_minimizer_refuses_non_finite_input() -> None:
    assert cubic_minimizer(0.0, 1.0, -1.0, 1.0, math.inf, math.nan) is None


@pytest.mark.parametrize("step", [1e-3, 1.0, 50.0])
def test_armijo_backtracking_returns_sufficient_decrease(step: float) -> None:
    f, df = (lambda t: (t - 1.0) ** 4 - t), (lambda t: 4.0 * (t - 1.0) ** 3 - 1.0)
    result = armijo_backtracking(phi_of(f, df), f(0.0), df(0.0), step)
    assert result.success
    assert result.value <= f(0.0) + 1e-4 * result.step * df(0.0)


def test_line_searches_refuse_an_ascent_direction() -> None:
    phi = phi_of(lambda t: t, lambda t: 1.0)
    with pytest.raises(ValueError, match="descent direction"):
        armijo_backtracking(phi, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="descent direction"):
        strong_wolfe(phi, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("step", [1e-4, 0.3, 1.0, 30.0])
@pytest.mark.parametrize("c2", [0.9, 0.1])
def test_strong_wolfe_meets_both_conditions(step: float, c2: float) -> None:
    f = lambda t: math.exp(t - 2.0) - t + 0.1 * math.sin(5 * t)  # noqa: E731
    df = lambda t: math.exp(t - 2.0) - 1.0 + 0.5 * math.cos(5 * t)  # noqa: E731
    result = strong_wolfe(phi_of(f, df), f(0.0), df(0.0), step, c2=c2)
    assert result.success
    assert result.value <= f(0.0) + 1e-4 * result.step * df(0.0)
    assert abs(result.slope) <= c2 * abs(df(0.0))


def test_strong_wolfe_is_exact_on_a_quadratic_with_small_c2() -> None:
    f, df = (lambda t: 2.0 * (t - 0.37) ** 2), (lambda t: 4.0 * (t - 0.37))
    result = strong_wolfe(phi_of(f, df), f(0.0), df(0.0), 5.0, c1=1e-10, c2=1e-8)
    assert result.step == pytest.approx(0.37, rel=1e-12)
    assert result.evaluations <= 3


def test_strong_wolfe_treats_non_finite_values_as_too_far() -> None:
    def phi(t: float) -> tuple[float, float]:
        return (math.inf, math.nan) if t > 1.0 else ((t - 0.8) ** 2, 2.0 * (t - 0.8))
    result = strong_wolfe(phi, 0.64, -1.6, 100.0)
    assert result.success and 0.0 < result.step <= 1.0


# ---------------------------------------------------------- gradient descent
def test_step_needs_a_closure() -> None:
    opt = GradientDescent([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0.0}, r"invalid lr=0.0: allowed is a finite number in \(0, inf\)"),
    ({"line_search": "exact"}, r"invalid line_search='exact': allowed are 'armijo'"),
    ({"c1": 1.0}, r"invalid c1=1.0"),
    ({"c1": 0.5, "c2": 0.4}, r"invalid c2=0.4"),
    ({"gtol": -1.0}, r"invalid gtol=-1.0"),
    ({"max_iterations": 0}, r"invalid max_iterations=0: allowed is None or an integer >= 1"),
])
def test_invalid_hyperparameters_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientDescent([torch.zeros(2, requires_grad=True)], **kwargs)


def test_one_parameter_group_of_one_dtype_only() -> None:
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="one parameter group"):
        GradientDescent([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match="one dtype and device"):
        GradientDescent([a, b])


def test_gradient_descent_exact_line_search_meets_the_linear_rate_bound() -> None:
    """f(x_{k+1}) - f* <= ((kappa-1)/(kappa+1))^2 (f(x_k) - f*) for every step (N&W Thm 3.3).

    The bound on f - f* (equivalently (kappa-1)/(kappa+1) on the A-norm of the
    error) for steepest descent with an exact line search; strong Wolfe with
    c2 = 1e-6 is exact up to rounding here (cubic interpolation of a quadratic).
    """
    for kappa in KAPPAS:
        a, x0 = quadratic(kappa)
        x = x0.clone().requires_grad_()
        opt = GradientDescent([x], c1=1e-8, c2=1e-6, gtol=0.0)
        closure = quadratic_closure(opt, x, a)
        bound = ((kappa - 1.0) / (kappa + 1.0)) ** 2
        previous = float(closure().detach())
        for _ in range(30):
            opt.step(closure)
            assert opt.diagnostics is not None
            value = opt.diagnostics.loss
            assert value <= bound * previous * (1.0 + 1e-9), kappa
            previous = value


def test_fixed_step_meets_its_contraction_bound() -> None:
    """With t = 2/(L+mu), ||x_{k+1} - x*|| <= (kappa-1)/(kappa+1) ||x_k - x*||."""
    for kappa in KAPPAS:
        a, x0 = quadratic(kappa)
        x = x0.clone().requires_grad_()
        opt = GradientDescent([x], lr=2.0 / (kappa + 1.0), line_search="fixed", gtol=0.0)
        closure = quadratic_closure(opt, x, a)
        rate = (kappa - 1.0) / (kappa + 1.0)
        for _ in range(30):
            before = float(x.detach().norm())
            opt.step(closure)
            assert float(x.detach().norm()) <= rate * before * (1.0 + 1e-12)


def test_fixed_step_never_writes_non_finite_parameters() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = GradientDescent([x], lr=1e300, line_search="fixed")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (x ** 4).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert opt.diagnostics is not None and opt.diagnostics.criterion == "function_tolerance"


def test_closure_without_backward_is_differentiated() -> None:
    a, x0 = quadratic(10.0)
    runs = []
    for backward in (True, False):
        x = x0.clone().requires_grad_()
        opt = GradientDescent([x])
        closure = quadratic_closure(opt, x, a, backward=backward)
        for _ in range(5):
            opt.step(closure)
        runs.append(x.detach())
    assert torch.equal(runs[0], runs[1])


def test_diagnostics_report_each_criterion() -> None:
    a, x0 = quadratic(10.0)
    x = x0.clone().requires_grad_()
    opt = GradientDescent([x], gtol=1e-8, max_iterations=3)
    closure = quadratic_closure(opt, x, a)
    for _ in range(3):
        opt.step(closure)
    d = opt.diagnostics
    assert d is not None
    assert (d.iteration, d.criterion, d.converged, d.done) == (3, "max_iterations", False, True)
    assert d.loss_decrease > 0 and d.step_length > 0 and d.line_search_evals >= 1
    assert d.grad_norm == pytest.approx(float((a @ x.detach()).norm()))
    assert d.func_evals == opt.state[x]["func_evals"] >= 4
    while opt.diagnostics is not None and opt.diagnostics.criterion != "gradient_tolerance":
        opt.step(closure)
    assert opt.diagnostics.converged and opt.diagnostics.grad_norm <= 1e-8

    loose = GradientDescent([x0.clone().requires_grad_()], ftol=1.0)
    loose.step(quadratic_closure(loose, loose.param_groups[0]["params"][0], a))
    assert loose.diagnostics is not None and loose.diagnostics.criterion == "function_tolerance"


def test_state_dict_round_trip_resumes_identically() -> None:
    a, x0 = quadratic(100.0)
    x = x0.clone().requires_grad_()
    opt = GradientDescent([x])
    closure = quadratic_closure(opt, x, a)
    for _ in range(5):
        opt.step(closure)
    y = x.detach().clone().requires_grad_()
    resumed = GradientDescent([y])
    resumed.load_state_dict(opt.state_dict())
    resumed_closure = quadratic_closure(resumed, y, a)
    for _ in range(5):
        opt.step(closure)
        resumed.step(resumed_closure)
    assert torch.equal(x.detach(), y.detach())
    assert resumed.state[y]["func_evals"] == opt.state[x]["func_evals"]


@pytest.fixture(scope="module")
def gd_rosenbrock() -> dict[str, tuple[int, int, float]]:
    runs = {}
    for mode in ("wolfe", "armijo"):
        opt, x = minimize_rosenbrock(
            lambda p, mode=mode: GradientDescent(p, line_search=mode, gtol=1e-7))
        runs[mode] = (opt.diagnostics.iteration, opt.diagnostics.func_evals,
                      float((x - 1.0).norm()))
    return runs


def test_gradient_descent_solves_rosenbrock(
        gd_rosenbrock: dict[str, tuple[int, int, float]],
        record_property: Callable[[str, object], None]) -> None:
    for mode, (iterations, evals, error) in gd_rosenbrock.items():
        record_property(f"gd_{mode}", {"iterations": iterations, "func_evals": evals})
        assert error < 1e-6, mode


@pytest.mark.xfail(strict=True, reason=(
    "steepest descent needs ~10^4 iterations on Rosenbrock (Hessian condition ~2500 at "
    "the minimum); no scipy method is steepest descent, and the nearest, scipy CG, needs "
    "~80 evaluations: GD is ~100x, not within 2x. Kept as a strict xfail so the gap stays "
    "visible and a change that closes it is noticed."))
def test_gradient_descent_within_2x_of_scipy_cg_on_rosenbrock(
        gd_rosenbrock: dict[str, tuple[int, int, float]]) -> None:
    reference = scipy_rosenbrock("CG", gtol=1e-9)
    _, evals, _ = gd_rosenbrock["wolfe"]
    assert evals <= 2 * reference.nfev
