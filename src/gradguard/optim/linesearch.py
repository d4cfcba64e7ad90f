"""Line searches, and gradient descent with them (full-batch, closure-based).

Two line searches as small pure functions of a one-dimensional restriction
:math:`\\phi(t) = f(x + t d)` with :math:`\\phi'(t) = \\nabla f(x + t d)^\\top d`:

* :func:`armijo_backtracking`: shrink ``t`` until the sufficient-decrease
  (Armijo) condition :math:`\\phi(t) \\le \\phi(0) + c_1 t \\phi'(0)` holds;
* :func:`strong_wolfe`: bracket and zoom (Nocedal & Wright, *Numerical
  Optimization*, 2nd ed., Algorithms 3.5 and 3.6) until sufficient decrease and
  the strong curvature condition :math:`|\\phi'(t)| \\le c_2 |\\phi'(0)|` hold.
  Trial steps come from the minimiser of the cubic through the two most recent
  points (N&W eq. 3.59), or from the secant on the slopes when rounding has
  spoilt the function values; both are exact when :math:`\\phi` is quadratic.

:func:`armijo_backtracking` also takes a ``reference`` value above
:math:`\\phi(0)`: the nonmonotone test of Grippo, Lampariello & Lucidi that
:class:`GradientDescent`'s Barzilai-Borwein mode uses.

:class:`FullBatchOptimizer` is the shared base of the closure-based optimizers
(:class:`GradientDescent` here, :class:`~gradguard.optim.cg.NonlinearCG`,
:class:`~gradguard.optim.newton.Newton`): one parameter group treated as one flat
vector, the closure convention of ``torch.optim.LBFGS``, convergence tests and
per-step :class:`StepDiagnostics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._validation import FLAG, NON_NEGATIVE, POSITIVE, Choice, Interval, Rule
from .base import Optimizer, ParamsT

# ---------------------------------------------------------------- constants
ARMIJO_C1 = 1e-4
"""Sufficient-decrease constant :math:`c_1` (N&W's suggestion, also scipy's)."""
WOLFE_C2_GD = 0.9
"""Curvature constant :math:`c_2` for gradient descent and Newton (N&W, p. 34)."""
WOLFE_C2_CG = 0.1
"""Curvature constant for nonlinear CG (N&W p. 125; Fletcher-Reeves needs ``c2 < 1/2``)."""
BACKTRACK_SHRINK = (0.1, 0.5)
"""Each backtracking step multiplies ``t`` by a factor in this range: the
minimiser of the quadratic interpolating :math:`\\phi(0), \\phi'(0), \\phi(t)`,
clipped to it (N&W section 3.5)."""
EXTRAPOLATION = (1.01, 10.0)
"""While bracketing, the next trial lies in ``[t + 0.01 (t - t_prev), 10 t]``."""
ZOOM_SAFEGUARD = 0.01
"""In zoom, an interpolated trial is kept this fraction of the interval away from its ends."""
_EPS = 2.0 ** -52
MAX_LINE_SEARCH_EVALS = 30
"""Evaluations one line search may make before it returns its best point."""
BB_MEMORY = 10
"""Nonmonotone window :math:`M` of the Barzilai-Borwein mode: the trial is compared
with the largest of the last ``M`` function values, :math:`f(x_k)` included
(``M = 1`` is the monotone Armijo test). 10 is the papers' value; this counts
the window as SPG does (Birgin, Martinez & Raydan 2000), where Raydan 1997
takes :math:`\\max_{0 \\le j \\le M}`, one value more."""
BB_STEP_MIN = 1e-30
"""Smallest Barzilai-Borwein step :math:`\\alpha_{\\min}` (SPG's ``lambda_min``)."""
BB_STEP_MAX = 1e30
"""Largest Barzilai-Borwein step :math:`\\alpha_{\\max}` (SPG's ``lambda_max``)."""
BB_VARIANTS: tuple[str, ...] = ("bb1", "bb2")
"""``"bb1"``: :math:`s^\\top s / s^\\top y` (the "long" step, Barzilai & Borwein eq. 5,
Raydan's); ``"bb2"``: :math:`s^\\top y / y^\\top y` (the "short" step)."""


@dataclass(frozen=True)
class LineSearchResult:
    """What a line search found: the step ``t`` along ``d`` and :math:`\\phi, \\phi'` there.

    ``success`` is whether the requested conditions hold at ``step``. When they do
    not, ``step`` is the best point found with sufficient decrease, or 0 (no
    decrease found: the caller must not move).
    """

    step: float
    value: float
    slope: float
    evaluations: int
    success: bool


Phi = Callable[[float], tuple[float, float]]
"""``t -> (phi(t), phi'(t))``; non-finite values count as "too far"."""


def cubic_minimizer(t1: float, f1: float, d1: float, t2: float, f2: float, d2: float
                    ) -> float | None:
    """Minimiser of the cubic through ``(t1, f1, d1)`` and ``(t2, f2, d2)`` (N&W eq. 3.59).

    ``None`` when the cubic has no real local minimiser or an input is not finite.
    """
    if not all(math.isfinite(v) for v in (t1, f1, d1, t2, f2, d2)) or t1 == t2:
        return None
    theta = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = theta * theta - d1 * d2
    if disc < 0.0:
        return None
    root = math.copysign(math.sqrt(disc), t2 - t1)
    denom = d2 - d1 + 2.0 * root
    if denom == 0.0:
        return None
    t = t2 - (t2 - t1) * (d2 + root - theta) / denom
    return t if math.isfinite(t) else None


def secant_minimizer(t1: float, d1: float, t2: float, d2: float) -> float | None:
    """Zero of the line through ``(t1, d1)`` and ``(t2, d2)``: the minimiser of the
    quadratic with those slopes.

    Used in zoom, when the slopes at the ends have opposite signs and the
    function values have lost the precision the cubic needs to rounding (near a
    minimum, long before the slopes do). Exact when :math:`\\phi` is quadratic.
    """
    if not all(math.isfinite(v) for v in (t1, d1, t2, d2)) or d1 == d2:
        return None
    t = t1 - d1 * (t2 - t1) / (d2 - d1)
    return t if math.isfinite(t) else None


def armijo_backtracking(phi: Phi, value0: float, slope0: float, step: float, *,
                        c1: float = ARMIJO_C1, max_evals: int = MAX_LINE_SEARCH_EVALS,
                        reference: float | None = None) -> LineSearchResult:
    """Backtrack from ``step`` until :math:`\\phi(t) \\le \\phi(0) + c_1 t \\phi'(0)`.

    ``slope0`` must be negative (``d`` a descent direction). Each retry takes the
    minimiser of the quadratic through :math:`\\phi(0), \\phi'(0), \\phi(t)`,
    kept within :data:`BACKTRACK_SHRINK` of ``t``.

    With ``reference`` (:math:`f_{\\rm ref} \\ge \\phi(0)`) the test is the nonmonotone
    one of Grippo, Lampariello & Lucidi (1986),
    :math:`\\phi(t) \\le f_{\\rm ref} + c_1 t \\phi'(0)`, with :math:`f_{\\rm ref}` the
    largest of the last few function values; the interpolation still uses
    :math:`\\phi(0)` (Raydan 1997, step 5).
    """
    if not slope0 < 0.0:
        raise ValueError(f"armijo_backtracking needs a descent direction, got slope {slope0}")
    if reference is not None and not reference >= value0:
        raise ValueError(f"armijo_backtracking needs reference >= phi(0), got reference "
                         f"{reference}, phi(0) {value0}")
    accept = value0 if reference is None else reference
    t = step
    for evals in range(1, max_evals + 1):
        value, slope = phi(t)
        if math.isfinite(value) and value <= accept + c1 * t * slope0:
            return LineSearchResult(t, value, slope, evals, True)
        curvature = value - value0 - slope0 * t
        low, high = BACKTRACK_SHRINK
        trial = -slope0 * t * t / (2.0 * curvature) if math.isfinite(value) else low * t
        t = min(max(trial, low * t), high * t)
    return LineSearchResult(0.0, value0, slope0, max_evals, False)


def strong_wolfe(phi: Phi, value0: float, slope0: float, step: float, *,
                 c1: float = ARMIJO_C1, c2: float = WOLFE_C2_GD,
                 max_evals: int = MAX_LINE_SEARCH_EVALS) -> LineSearchResult:
    """A step satisfying the strong Wolfe conditions (N&W Algorithms 3.5-3.6).

    Sufficient decrease :math:`\\phi(t) \\le \\phi(0) + c_1 t \\phi'(0)` and curvature
    :math:`|\\phi'(t)| \\le c_2 |\\phi'(0)|`, with ``0 < c1 < c2 < 1``. Starts at
    ``step``, extrapolates (:data:`EXTRAPOLATION`) until an interval containing
    such a step is bracketed, then zooms in by safeguarded cubic interpolation.
    """
    if not slope0 < 0.0:
        raise ValueError(f"strong_wolfe needs a descent direction, got slope {slope0}")
    if not 0.0 < c1 < c2 < 1.0:
        raise ValueError(f"strong_wolfe needs 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    evals = 0

    def armijo(t: float, value: float) -> bool:
        return math.isfinite(value) and value <= value0 + c1 * t * slope0

    def curvature(slope: float) -> bool:
        return abs(slope) <= -c2 * slope0

    # bracketing phase: (t_prev, f_prev, d_prev) is the last point with sufficient decrease
    t_prev, f_prev, d_prev = 0.0, value0, slope0
    t = step
    bracket: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    while evals < max_evals:
        value, slope = phi(t)
        evals += 1
        if not armijo(t, value) or (t_prev > 0.0 and value >= f_prev):
            bracket = ((t_prev, f_prev, d_prev), (t, value, slope))
            break
        if curvature(slope):
            return LineSearchResult(t, value, slope, evals, True)
        if slope >= 0.0:
            bracket = ((t, value, slope), (t_prev, f_prev, d_prev))
            break
        low, high = t + (EXTRAPOLATION[0] - 1.0) * (t - t_prev), EXTRAPOLATION[1] * t
        trial = cubic_minimizer(t_prev, f_prev, d_prev, t, value, slope)
        t_prev, f_prev, d_prev = t, value, slope
        t = high if trial is None else min(max(trial, low), high)
    if bracket is None:
        return LineSearchResult(t_prev, f_prev, d_prev, evals, False)

    # zoom phase: lo has sufficient decrease and the lowest value so far; the
    # interval between lo and hi contains a strong-Wolfe step
    (t_lo, f_lo, d_lo), (t_hi, f_hi, d_hi) = bracket
    while evals < max_evals:
        a, b = min(t_lo, t_hi), max(t_lo, t_hi)
        width = b - a
        if width <= 1e-12 * b or width * max(abs(d_lo), abs(d_hi)) <= _EPS * abs(f_lo):
            break  # the interval, or the change of phi across it, is below resolution
        # the cubic's mean slope (f_hi - f_lo) / (t_hi - t_lo) carries rounding error
        # eps |f| / width; once that is comparable to the slope accuracy asked for
        # (c2 |phi'(0)|), interpolate the slopes only
        noise = 2.0 * _EPS * max(abs(f_lo), abs(f_hi)) / width
        trial = (secant_minimizer(t_lo, d_lo, t_hi, d_hi)
                 if d_lo * d_hi < 0.0 and noise > 0.1 * c2 * -slope0
                 else cubic_minimizer(t_lo, f_lo, d_lo, t_hi, f_hi, d_hi))
        margin = ZOOM_SAFEGUARD * width
        t = 0.5 * (a + b) if trial is None else min(max(trial, a + margin), b - margin)
        value, slope = phi(t)
        evals += 1
        if not armijo(t, value) or value >= f_lo:
            t_hi, f_hi, d_hi = t, value, slope
            continue
        if curvature(slope):
            return LineSearchResult(t, value, slope, evals, True)
        if slope * (t_hi - t_lo) >= 0.0:
            t_hi, f_hi, d_hi = t_lo, f_lo, d_lo
        t_lo, f_lo, d_lo = t, value, slope
    return LineSearchResult(t_lo, f_lo, d_lo, evals, False)


# ---------------------------------------------------------------- diagnostics
CRITERIA: tuple[str, ...] = ("gradient_tolerance", "function_tolerance", "max_iterations")
"""The stopping criteria a step can report, in the order they are tested."""


@dataclass(frozen=True)
class StepDiagnostics:
    """What one ``step(closure)`` of a full-batch optimizer did, and whether to stop.

    ``converged`` is True when the gradient or function tolerance is met;
    ``criterion`` names the test that fired (one of :data:`CRITERIA`, or None), so
    ``criterion == "max_iterations"`` is a stop without convergence.
    """

    iteration: int
    """Iterations taken so far (steps that moved, or tried to)."""
    loss: float
    """:math:`f(x_{k+1})`."""
    loss_decrease: float
    """:math:`f(x_k) - f(x_{k+1})`."""
    grad_norm: float
    """:math:`\\|\\nabla f(x_{k+1})\\|_2`."""
    step_length: float
    """:math:`\\|x_{k+1} - x_k\\|_2`."""
    step_size: float
    """``t`` of :math:`x_{k+1} = x_k + t d_k`."""
    line_search_evals: int
    """Closure evaluations made by this step's line search."""
    func_evals: int
    """Closure evaluations since construction (or since the loaded state was saved)."""
    line_search_success: bool
    converged: bool
    criterion: str | None

    @property
    def done(self) -> bool:
        """Whether any stopping criterion fired."""
        return self.criterion is not None


@dataclass(frozen=True)
class _Count(Rule):
    """An integer ``>= 1``; with ``optional``, None too."""

    optional: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid {name}={value!r}: allowed is {self.describe()}")

    def describe(self) -> str:
        return "None or an integer >= 1" if self.optional else "an integer >= 1"


COUNT = _Count()
OPTIONAL_COUNT = _Count(optional=True)


@dataclass(frozen=True)
class OptionalRule(Rule):
    """None, or a value ``inner`` allows."""

    inner: Rule

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.inner.check(name, value)

    def describe(self) -> str:
        return f"None or {self.inner.describe()}"
UNIT_OPEN = Interval(0.0, 1.0, low_open=True, high_open=True)


class FullBatchOptimizer(Optimizer):
    """Base of the closure-based full-batch optimizers.

    All parameters (one parameter group, as ``torch.optim.LBFGS``) form one flat
    vector :math:`x`. ``step(closure)`` performs one iteration; the closure
    re-evaluates the loss and either calls ``loss.backward()`` (torch's convention)
    or only returns the loss (the gradient is then taken with ``torch.autograd``).

    The loss and gradient of the accepted point are kept in the state and reused
    by the next step when the parameters are unchanged (bit for bit), saving one
    evaluation per iteration; set ``reuse_evaluation=False`` when the objective
    changes between steps (new data).

    Stopping tests, after each step, in order: :math:`\\|g\\|_2 \\le` ``gtol``;
    :math:`f_k - f_{k+1} \\le` ``ftol`` :math:`\\cdot \\max(|f_k|, |f_{k+1}|, 1)`
    (with ``ftol=0``: a step that found no decrease); ``max_iterations`` reached.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference",)
    common_rules: ClassVar[dict[str, Rule]] = {
        "gtol": NON_NEGATIVE,
        "ftol": NON_NEGATIVE,
        "max_iterations": OPTIONAL_COUNT,
        "reuse_evaluation": FLAG,
    }

    diagnostics: StepDiagnostics | None
    """The last step's diagnostics (None before the first step)."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, gtol: float,
                 ftol: float, max_iterations: int | None, reuse_evaluation: bool,
                 impl: str) -> None:
        defaults = dict(defaults, gtol=gtol, ftol=ftol, max_iterations=max_iterations,
                        reuse_evaluation=reuse_evaluation)
        super().__init__(params, defaults, impl=impl)
        self.diagnostics = None
        params_list = self._params
        if not params_list:
            raise ValueError(f"{type(self).__name__} got no parameters")
        first = params_list[0]
        for i, p in enumerate(params_list):
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"{type(self).__name__} treats all parameters as one vector: parameter {i} "
                    f"has dtype {p.dtype} on {p.device}, parameter 0 {first.dtype} on "
                    f"{first.device}; allowed is one dtype and device")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError(f"{type(self).__name__} optimizes all parameters as one vector "
                             "and takes one parameter group only (as torch.optim.LBFGS)")
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        for name, rule in self.common_rules.items():
            rule.check(name, group[name])
        super()._validate_group(group)

    # ------------------------------------------------------------- flat vector
    @property
    def _params(self) -> list[Tensor]:
        return list(self.param_groups[0]["params"])

    @property
    def _state(self) -> dict[str, Any]:
        state = self.state[self._params[0]]
        if not state:
            state["func_evals"] = 0
            state["n_iter"] = 0
        return state

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _set_flat_params(self, x: Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.copy_(x[offset:offset + n].view_as(p))
            offset += n

    def _set_flat_grad(self, g: Tensor) -> None:
        """Leave the gradient at the accepted point in ``.grad`` (for hooks and recorders)."""
        offset = 0
        for p in self._params:
            n = p.numel()
            p.grad = g[offset:offset + n].view_as(p).clone()
            offset += n

    def _evaluate(self, closure: Callable[[], Any], *, create_graph: bool = False
                  ) -> tuple[float, Tensor, Any]:
        """One closure evaluation: (loss as float, flat gradient, the closure's return)."""
        params = self._params
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        self._state["func_evals"] += 1
        if not torch.is_tensor(loss):
            raise TypeError(f"{type(self).__name__}: the closure must return the loss tensor, "
                            f"got {type(loss).__name__}")
        called_backward = any(p.grad is not None for p in params)
        if create_graph and called_backward:
            raise RuntimeError(
                f"{type(self).__name__} differentiates the loss twice itself: pass a closure "
                "that returns the loss without calling backward()")
        if called_backward:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        elif loss.requires_grad:
            with torch.enable_grad():
                found = torch.autograd.grad(loss, params, create_graph=create_graph,
                                            allow_unused=True)
                # with create_graph the flat gradient keeps its graph (Newton's Hessian)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                  for g, p in zip(found, params, strict=True)])
            return float(loss.detach()), flat, loss
        else:
            raise RuntimeError(f"{type(self).__name__}: the closure's loss does not depend on "
                               "the parameters (no gradient), and it did not call backward()")
        flat = torch.cat([g.reshape(-1) for g in grads])
        return float(loss.detach()), flat, loss

    def _phi(self, closure: Callable[[], Any], x: Tensor, direction: Tensor,
             seen: dict[float, tuple[float, Tensor]]) -> Phi:
        """The restriction ``t -> (f(x + t d), g(x + t d) . d)``; records gradients in ``seen``."""
        def phi(t: float) -> tuple[float, float]:
            self._set_flat_params(x + t * direction)
            value, grad, _ = self._evaluate(closure)
            if not math.isfinite(value):
                return math.inf, math.nan
            seen[t] = (value, grad)
            return value, float(grad.dot(direction))
        return phi

    def _start(self, closure: Callable[[], Any] | None) -> tuple[dict[str, Any], Tensor,
                                                                  float, Tensor]:
        """Check the closure; (state, x, f(x), g(x)), reusing the last step's evaluation."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that re-evaluates "
                             "the loss (as torch.optim.LBFGS)")
        state = self._state
        x = self._flat_params()
        cached = state.get("x")
        if (self.param_groups[0]["reuse_evaluation"] and cached is not None
                and "loss" in state and torch.equal(cached, x)):
            return state, x, float(state["loss"]), state["flat_grad"].clone()
        value, grad, _ = self._evaluate(closure)
        if not math.isfinite(value) or not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(f"{type(self).__name__}: the loss or gradient at the "
                                     f"current parameters is not finite (loss {value})")
        return state, x, value, grad

    def _finish(self, state: dict[str, Any], x_old: Tensor, value_old: float, x: Tensor,
                value: float, grad: Tensor, step_size: float, evals: int, success: bool,
                moved: bool = True, reference: float | None = None) -> StepDiagnostics:
        """Store the accepted point, run the stopping tests, record diagnostics.

        ``reference`` (default ``value_old``) is the value the function-tolerance
        test measures the decrease from: a nonmonotone method passes the largest
        value of its window, the one its acceptance test compares with.
        """
        group = self.param_groups[0]
        self._set_flat_params(x)
        self._set_flat_grad(grad)
        state["x"] = x.clone()
        state["loss"] = value
        state["flat_grad"] = grad.clone()
        if moved:
            state["n_iter"] += 1
        grad_norm = float(grad.norm())
        decrease = value_old - value
        ref = value_old if reference is None else reference
        criterion: str | None = None
        if grad_norm <= group["gtol"]:
            criterion = "gradient_tolerance"
        elif moved and ref - value <= group["ftol"] * max(abs(ref), abs(value), 1.0):
            criterion = "function_tolerance"
        elif group["max_iterations"] is not None and state["n_iter"] >= group["max_iterations"]:
            criterion = "max_iterations"
        self.diagnostics = StepDiagnostics(
            iteration=state["n_iter"], loss=value, loss_decrease=decrease, grad_norm=grad_norm,
            step_length=float((x - x_old).norm()), step_size=step_size,
            line_search_evals=evals, func_evals=state["func_evals"],
            line_search_success=success,
            converged=criterion in ("gradient_tolerance", "function_tolerance"),
            criterion=criterion)
        return self.diagnostics

    def _converged_at_start(self, state: dict[str, Any], x: Tensor, value: float,
                            grad: Tensor) -> bool:
        """If the gradient tolerance already holds, record it and do not move."""
        if float(grad.norm()) > self.param_groups[0]["gtol"]:
            return False
        self._finish(state, x, value, x, value, grad, 0.0, 0, True, moved=False)
        return True

    @staticmethod
    def _check_no_scaling(name: str, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        if grad_scale is not None or found_inf is not None:
            raise ValueError(f"{name} evaluates its gradients itself through the closure; "
                             "grad_scale and found_inf are not supported")

    def _line_search(self, closure: Callable[[], Any], x: Tensor, value: float,
                     grad: Tensor, direction: Tensor, step: float, mode: str, c1: float,
                     c2: float) -> tuple[Tensor, float, Tensor, float, int, bool]:
        """Search along ``direction``: (new x, f, g, t, evaluations, success).

        If no decrease is found, the parameters stay at ``x`` (t = 0).
        """
        slope = float(grad.dot(direction))
        seen: dict[float, tuple[float, Tensor]] = {}
        phi = self._phi(closure, x, direction, seen)
        if mode == "armijo":
            result = armijo_backtracking(phi, value, slope, step, c1=c1)
        else:
            result = strong_wolfe(phi, value, slope, step, c1=c1, c2=c2)
        if result.step <= 0.0 or result.step not in seen or not result.value < value:
            return x, value, grad, 0.0, result.evaluations, False
        new_value, new_grad = seen[result.step]
        return (x + result.step * direction, new_value, new_grad, result.step,
                result.evaluations, result.success)


def check_wolfe_constants(name: str, c1: float, c2: float) -> None:
    """``ValueError`` unless ``c1 < c2`` (each already checked to lie in (0, 1))."""
    if not c1 < c2:
        raise ValueError(f"{name}: invalid c2={c2!r}: allowed is a finite number in "
                         f"({c1:g}, 1) (c1 < c2 < 1, c1={c1!r})")


def initial_step(value: float, previous_value: float | None, slope: float,
                 grad_norm: float) -> float:
    """First trial step: :math:`1.01 \\cdot 2 (f_{k-1} - f_k) / |\\phi'(0)|` (N&W eq. 3.60).

    The minimiser of the quadratic that interpolates the last decrease. On the
    first iteration :math:`f_{k-1} - f_k` is taken as :math:`\\|g\\|/2` (as scipy
    does), i.e. a step of length about 1 along :math:`-g`.
    """
    decrease = grad_norm / 2.0 if previous_value is None else previous_value - value
    if not decrease > 0.0 or not math.isfinite(decrease):
        decrease = grad_norm / 2.0
    return 1.01 * 2.0 * decrease / -slope


def barzilai_borwein_step(s: Tensor, y: Tensor, variant: str, grad_norm: float) -> float:
    """The next Barzilai-Borwein step from :math:`s = x_{k+1} - x_k`, :math:`y = g_{k+1} - g_k`.

    ``"bb1"``: :math:`s^\\top s / s^\\top y`; ``"bb2"``: :math:`s^\\top y / y^\\top y`;
    either clipped into [:data:`BB_STEP_MIN`, :data:`BB_STEP_MAX`] (Birgin, Martinez
    & Raydan 2000). Where :math:`s^\\top y \\le 0` (no positive curvature seen along
    ``s``; never on a strictly convex function) or a quotient is not finite, the
    step falls back to :math:`1 / \\|g_{k+1}\\|`, a step of unit length, clipped the
    same way: the first iteration's step. (SPG takes :data:`BB_STEP_MAX` there and
    Raydan a fixed :math:`\\delta`; either leaves the backtracking to find the scale,
    which a budget of :data:`MAX_LINE_SEARCH_EVALS` evaluations may not allow.)
    """
    sy = float(s.dot(y))
    quotient = math.nan
    if sy > 0.0:
        quotient = float(s.dot(s)) / sy if variant == "bb1" else sy / float(y.dot(y))
    if not (math.isfinite(quotient) and quotient > 0.0):
        quotient = 1.0 / grad_norm if grad_norm > 0.0 else 1.0
    return min(max(quotient, BB_STEP_MIN), BB_STEP_MAX)


class GradientDescent(FullBatchOptimizer):
    r"""Full-batch gradient descent with Armijo, strong-Wolfe, Barzilai-Borwein or a fixed step.

    .. math::
        x_{k+1} = x_k - t_k \nabla f(x_k)

    with :math:`t_k` from :func:`armijo_backtracking` (``line_search="armijo"``),
    :func:`strong_wolfe` (``"wolfe"``), :math:`t_k = ` ``lr`` (``"fixed"``), or the
    global Barzilai-Borwein method (``"barzilai_borwein"``, below). The Armijo and
    Wolfe searches start from :func:`initial_step`. With an exact line search on a
    quadratic with condition number :math:`\kappa`, :math:`f(x_{k+1}) - f^* \le
    ((\kappa-1)/(\kappa+1))^2 (f(x_k) - f^*)` (N&W Theorem 3.3).

    ``"barzilai_borwein"`` is Raydan's global Barzilai-Borwein (spectral gradient)
    method, the unconstrained case of SPG (Birgin, Martinez & Raydan). The
    direction is :math:`-g_k`; the trial step is :math:`\alpha_k = s^\top s / s^\top y`
    (``bb_variant="bb1"``) or :math:`s^\top y / y^\top y` (``"bb2"``) with
    :math:`s = x_k - x_{k-1}`, :math:`y = g_k - g_{k-1}`, clipped into
    [:data:`BB_STEP_MIN`, :data:`BB_STEP_MAX`] (see :func:`barzilai_borwein_step`;
    :math:`1/\|g_0\|` on the first iteration and where :math:`s^\top y \le 0`). It is
    accepted if :math:`f(x_k - t g_k) \le \max_{0 \le j < M} f(x_{k-j}) - c_1 t
    \|g_k\|^2`, the nonmonotone test of Grippo, Lampariello & Lucidi with the
    window :math:`M` = ``bb_memory`` (:data:`BB_MEMORY`); otherwise :math:`t` is
    backtracked by safeguarded quadratic interpolation into
    :data:`BACKTRACK_SHRINK` ``= (0.1, 0.5)`` of itself, Raydan's
    :math:`[\sigma_1, \sigma_2]`. :math:`f` may rise for a few iterations; the
    function-tolerance test then measures the decrease from the window's maximum.
    On a strictly convex quadratic the unsafeguarded BB method converges
    R-linearly (Raydan 1993; Dai & Liao 2002).

    Args:
        params: parameters (one group; all one dtype and device).
        lr: the step of ``line_search="fixed"`` (default 1e-3), ``> 0``.
        line_search: ``"armijo"``, ``"wolfe"`` (default), ``"barzilai_borwein"`` or
            ``"fixed"``.
        c1: sufficient-decrease constant (default :data:`ARMIJO_C1`), in (0, 1); the
            :math:`\gamma` of the Barzilai-Borwein mode.
        c2: curvature constant (default :data:`WOLFE_C2_GD`), in (c1, 1).
        bb_variant: ``"bb1"`` (default) or ``"bb2"`` (:data:`BB_VARIANTS`); read by
            ``"barzilai_borwein"`` only.
        bb_memory: the nonmonotone window :math:`M` (default :data:`BB_MEMORY`), an
            integer ``>= 1``; ``1`` makes the search monotone. Read by
            ``"barzilai_borwein"`` only.
        gtol, ftol, max_iterations, reuse_evaluation: see :class:`FullBatchOptimizer`.

    State (``state[first parameter]``), besides the accepted point's ``x``,
    ``loss``, ``flat_grad`` and the counters: ``prev_loss``; with
    ``"barzilai_borwein"`` also ``bb_step`` (the next trial step, a float) and
    ``bb_window`` (the previous :math:`M - 1` function values, a list of floats),
    so a run resumed from ``state_dict()`` continues bit for bit.

    References: Nocedal & Wright, *Numerical Optimization*, 2nd ed., chapter 3;
    J. Barzilai & J. M. Borwein, "Two-point step size gradient methods", IMA J.
    Numer. Anal. 8 (1988); M. Raydan, "The Barzilai and Borwein gradient method for
    the large scale unconstrained minimization problem", SIAM J. Optim. 7(1) (1997);
    E. G. Birgin, J. M. Martinez & M. Raydan, "Nonmonotone spectral projected
    gradient methods on convex sets", SIAM J. Optim. 10(4) (2000); L. Grippo,
    F. Lampariello & S. Lucidi, "A nonmonotone line search technique for Newton's
    method", SIAM J. Numer. Anal. 23(4) (1986).
    """

    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": POSITIVE,
        "line_search": Choice(("armijo", "wolfe", "barzilai_borwein", "fixed")),
        "c1": UNIT_OPEN,
        "c2": UNIT_OPEN,
        "bb_variant": Choice(BB_VARIANTS),
        "bb_memory": COUNT,
    }

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, line_search: str = "wolfe",
                 c1: float = ARMIJO_C1, c2: float = WOLFE_C2_GD, bb_variant: str = "bb1",
                 bb_memory: int = BB_MEMORY, gtol: float = 1e-5, ftol: float = 0.0,
                 max_iterations: int | None = None, reuse_evaluation: bool = True,
                 impl: str = "auto") -> None:
        defaults = {"lr": lr, "line_search": line_search, "c1": c1, "c2": c2,
                    "bb_variant": bb_variant, "bb_memory": bb_memory}
        super().__init__(params, defaults, gtol=gtol, ftol=ftol, max_iterations=max_iterations,
                         reuse_evaluation=reuse_evaluation, impl=impl)
        check_wolfe_constants(type(self).__name__, c1, c2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """One iteration; returns the loss before it. Diagnostics in :attr:`diagnostics`."""
        self._check_no_scaling("GradientDescent", grad_scale, found_inf)
        state, x, value, grad = self._start(closure)
        assert closure is not None
        if self._converged_at_start(state, x, value, grad):
            return torch.tensor(value)
        group = self.param_groups[0]
        if group["line_search"] == "barzilai_borwein":
            self._barzilai_borwein_step(closure, state, x, value, grad)
            return torch.tensor(value)
        direction = -grad
        evals_before = state["func_evals"]
        if group["line_search"] == "fixed":
            t = float(group["lr"])
            new_x = x + t * direction
            self._set_flat_params(new_x)
            new_value, new_grad, _ = self._evaluate(closure)
            success = math.isfinite(new_value) and bool(torch.isfinite(new_grad).all())
            if not success:  # never leave non-finite values in the parameters
                new_x, new_value, new_grad, t = x, value, grad, 0.0
        else:
            t0 = initial_step(value, state.get("prev_loss"), float(grad.dot(direction)),
                              float(grad.norm()))
            new_x, new_value, new_grad, t, _, success = self._line_search(
                closure, x, value, grad, direction, t0, group["line_search"], group["c1"],
                group["c2"])
        state["prev_loss"] = value
        self._finish(state, x, value, new_x, new_value, new_grad, t,
                     state["func_evals"] - evals_before, success)
        return torch.tensor(value)

    def _barzilai_borwein_step(self, closure: Callable[[], Any], state: dict[str, Any],
                               x: Tensor, value: float, grad: Tensor) -> None:
        """One iteration of the global Barzilai-Borwein method (Raydan 1997, steps 2-6)."""
        group = self.param_groups[0]
        memory = group["bb_memory"]
        grad_norm = float(grad.norm())
        previous: list[float] = state.get("bb_window", [])
        window = [*previous, value][-memory:]
        reference = max(window)
        t0 = state.get("bb_step")
        if t0 is None:
            t0 = min(max(1.0 / grad_norm, BB_STEP_MIN), BB_STEP_MAX)
        direction = -grad
        evals_before = state["func_evals"]
        seen: dict[float, tuple[float, Tensor]] = {}
        result = armijo_backtracking(self._phi(closure, x, direction, seen), value,
                                     float(grad.dot(direction)), t0, c1=group["c1"],
                                     reference=reference)
        if result.success and result.step in seen:
            t = result.step
            new_x = x + t * direction
            new_value, new_grad = seen[t]
            next_step = barzilai_borwein_step(new_x - x, new_grad - grad, group["bb_variant"],
                                              float(new_grad.norm()))
        else:  # nothing acceptable within the evaluation budget: stay (the ftol test stops)
            t, new_x, new_value, new_grad = 0.0, x, value, grad
            next_step = t0
            reference = value
        # a new list each step, never one changed in place (as the tensors in the state)
        state["bb_window"] = window[1:] if len(window) == memory else window
        state["bb_step"] = next_step
        state["prev_loss"] = value
        self._finish(state, x, value, new_x, new_value, new_grad, t,
                     state["func_evals"] - evals_before, result.success, reference=reference)
