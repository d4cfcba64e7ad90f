"""Analytic test problems with known optima: ``quadratic`` and ``rosenbrock``.

Full-batch problems without data (``train`` and ``eval`` are empty
:class:`~gradguard.run.workload.TensorData`): the model is a :class:`Point`
holding one parameter ``x``, the loss is the objective ``f(x)`` and every
step sees the whole problem, so the closure-based optimizers
(:class:`~gradguard.optim.GradientDescent`, :class:`~gradguard.optim.NonlinearCG`,
:class:`~gradguard.optim.Newton`) apply. Metrics: ``objective`` (``f(x) - f*``),
``distance`` (``||x - x*||``, the primary metric, lower is better) and
``grad_norm`` (``||grad f(x)||``, in closed form).

The parameter is float64 by default (option ``dtype``): the targets
(``||x - x*|| <= 1e-6``) are below what float32 arithmetic resolves on these
problems. The objective and metrics are evaluated in the parameter's dtype
and on its device, so ``model.double()`` / ``model.float()`` / ``model.to(device)``
done by the training loop carry over; the problem's constants are kept in
float64 and converted on use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..workload import Batch, Target, TensorData, Workload

__all__ = ["DTYPES", "ROSENBROCK_VARIANTS", "TARGET_DISTANCE", "Objective", "Point", "Quadratic",
           "Rosenbrock", "quadratic", "rosenbrock"]

TARGET_DISTANCE = 1e-6
"""The documented target of both problems: ``||x - x*|| <= 1e-6``."""

ROSENBROCK_VARIANTS = ("chained", "extended")
"""Values of the ``rosenbrock`` workload's ``variant`` option."""

DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
"""Values of the ``dtype`` option."""


class Point(nn.Module):
    """The model of an analytic problem: one parameter vector ``x`` (the iterate)."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def forward(self) -> Tensor:
        return self.x


class _Constants:
    """Float64 master tensors, converted to a parameter's dtype/device on use (cached)."""

    def __init__(self, **tensors: Tensor) -> None:
        self._master = {k: v.to(torch.float64) for k, v in tensors.items()}
        self._cache: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self._master[name].to(dtype=like.dtype, device=like.device)
        return self._cache[key]

    def master(self, name: str) -> Tensor:
        return self._master[name]


class Quadratic:
    r"""``f(x) = 0.5 (x - x*)^T A (x - x*)``, ``A`` symmetric positive definite; ``f* = 0``."""

    def __init__(self, A: Tensor, x_star: Tensor) -> None:
        self.constants = _Constants(A=A, x_star=x_star)

    @property
    def x_star(self) -> Tensor:
        return self.constants.master("x_star")

    @property
    def A(self) -> Tensor:
        return self.constants.master("A")

    def value(self, x: Tensor) -> Tensor:
        d = x - self.constants.get("x_star", x)
        return 0.5 * torch.dot(d, self.constants.get("A", x) @ d)

    def gradient(self, x: Tensor) -> Tensor:
        return self.constants.get("A", x) @ (x - self.constants.get("x_star", x))


class Rosenbrock:
    r"""Rosenbrock's function in ``dim`` dimensions; ``f* = 0``.

    ``"chained"``: ``sum_{i<n-1} b (x_{i+1} - x_i^2)^2 + (a - x_i)^2`` (as
    ``scipy.optimize.rosen``). ``"extended"``: the same terms over the disjoint
    pairs ``(x_0, x_1), (x_2, x_3), ...`` only (Moré, Garbow & Hillstrom 1981,
    problem 21). The two agree for ``dim = 2``.
    """

    def __init__(self, dim: int, a: float, b: float, variant: str = "chained") -> None:
        self.dim, self.a, self.b, self.variant = dim, a, b, variant
        if variant == "extended" or dim == 2:
            star = torch.tensor([a, a * a], dtype=torch.float64).repeat(dim // 2)
        else:
            star = torch.full((dim,), a, dtype=torch.float64)
        self.constants = _Constants(x_star=star)

    @property
    def x_star(self) -> Tensor:
        return self.constants.master("x_star")

    def _pairs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.variant == "extended":
            return x[0::2], x[1::2]
        return x[:-1], x[1:]

    def value(self, x: Tensor) -> Tensor:
        head, tail = self._pairs(x)
        return (self.b * (tail - head * head) ** 2 + (self.a - head) ** 2).sum()

    def gradient(self, x: Tensor) -> Tensor:
        head, tail = self._pairs(x)
        inner = tail - head * head
        from_head = -4.0 * self.b * head * inner - 2.0 * (self.a - head)
        from_tail = 2.0 * self.b * inner
        if self.variant == "extended":
            return torch.stack([from_head, from_tail], dim=1).reshape(-1)
        zero = x.new_zeros(1)
        return torch.cat([from_head, zero]) + torch.cat([zero, from_tail])


Problem = Quadratic | Rosenbrock


class Objective:
    """The workload's ``loss`` (``f(x)``), with its ``evaluate`` and the ``problem`` behind it."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        """``f(x)`` at the model's point, in the parameter's dtype (``batch`` is empty)."""
        return self.problem.value(_point(model))

    def evaluate(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """``objective`` (``f(x) - f*``), ``distance`` (``||x - x*||``), ``grad_norm``."""
        x = _point(model).detach()
        return {
            "objective": float(self.problem.value(x)),
            "distance": float(torch.linalg.vector_norm(
                x - self.problem.constants.get("x_star", x))),
            "grad_norm": float(torch.linalg.vector_norm(self.problem.gradient(x))),
        }


def _workload(name: str, problem: Problem, x0: Tensor, info: dict[str, Any]) -> Workload:
    objective = Objective(problem)
    empty = TensorData(())
    x0_64 = x0.to(torch.float64)
    info = {
        "dim": x0.numel(),
        "f_star": 0.0,
        "start_distance": float(torch.linalg.vector_norm(x0_64 - problem.x_star)),
        "start_objective": float(problem.value(x0_64)),
        **info,
    }
    return Workload(
        name=name,
        model=Point(x0),
        train=empty,
        eval=empty,
        loss=objective,
        evaluate=objective.evaluate,
        primary_metric="distance",
        mode="min",
        target=Target("distance", TARGET_DISTANCE, "min"),
        full_batch=True,
        embeddings=[],
        info=info,
    )


def _point(model: nn.Module) -> Tensor:
    """The iterate: ``model.x`` of a :class:`Point` (else the model's only parameter)."""
    if isinstance(model, Point):
        return model.x
    return next(model.parameters())


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    return DTYPES[dtype]


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")
    return value


def quadratic(*, seed: int = 0, dim: int = 50, condition: float = 100.0,
              dtype: str = "float64") -> Workload:
    """Convex quadratic ``0.5 (x - x*)^T A (x - x*)``: chosen dimension and condition number.

    Options:
        dim: dimension of ``x``.
        condition: condition number of ``A``; its eigenvalues are log-spaced
            from 1 to ``condition``, rotated by a random orthogonal matrix.
        dtype: ``"float64"`` or ``"float32"``, the parameter's dtype.

    From ``seed``: the rotation, the optimum ``x*`` (standard normal entries)
    and the start ``x0 = x* + r u`` (``u`` a random unit vector, ``r`` uniform
    in [1, 10]). ``f* = 0``; target ``||x - x*|| <= 1e-6``.
    """
    dim = _positive_int("dim", dim)
    if isinstance(condition, bool) or not isinstance(condition, (int, float)) \
            or not math.isfinite(condition) or condition < 1.0:
        raise ValueError(f"condition must be a finite number >= 1, got {condition!r}")
    if dim == 1 and condition != 1.0:
        raise ValueError(f"dim 1 has condition number 1, got condition={condition!r}")
    param_dtype = _dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed rotation
    eigenvalues = torch.logspace(0.0, math.log10(condition), dim, dtype=torch.float64)
    A = (q * eigenvalues) @ q.T
    A = 0.5 * (A + A.T)
    x_star = torch.randn(dim, generator=g, dtype=torch.float64)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    radius = 1.0 + 9.0 * float(torch.rand((), generator=g, dtype=torch.float64))
    x0 = x_star + radius * u / torch.linalg.vector_norm(u)
    problem = Quadratic(A, x_star)
    info = {
        "condition": float(condition),
        "eigenvalues": f"log-spaced in [1, {float(condition):g}]",
        "optimum": "x* ~ N(0, I) from the seed",
    }
    return _workload("quadratic", problem, x0.to(param_dtype), info)


def rosenbrock(*, seed: int = 0, dim: int = 2, a: float = 1.0, b: float = 100.0,
               variant: str = "chained", dtype: str = "float64") -> Workload:
    """Rosenbrock's function in ``dim`` dimensions from the standard start (-1.2, 1, -1.2, ...).

    Options:
        dim: dimension (at least 2; even for ``"extended"``).
        a, b: the constants (1 and 100).
        variant: ``"chained"`` (default), ``sum_{i<n-1} b (x_{i+1} - x_i^2)^2 +
            (a - x_i)^2`` as ``scipy.optimize.rosen``; it has, for 4 <= dim <= 30
            or so, a second local minimiser near (-1, 1, ..., 1) (f about 4) that
            some methods reach from the alternating start. ``"extended"``: the
            terms of the disjoint pairs (x_0, x_1), (x_2, x_3), ... only (Moré,
            Garbow & Hillstrom's extended Rosenbrock, whose standard start the
            alternating point is); one minimiser. Both agree for ``dim = 2``.
        dtype: ``"float64"`` or ``"float32"``, the parameter's dtype.

    The minimiser is ``(a, a^2)`` for ``dim = 2`` (repeated, for
    ``"extended"``) and all ``a`` for the chained form with ``dim > 2``, which
    needs ``a`` in {0, 1}. Deterministic (the seed is unused). ``f* = 0``;
    target ``||x - x*|| <= 1e-6``.
    """
    dim = _positive_int("dim", dim, minimum=2)
    for key, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    if b <= 0:
        raise ValueError(f"b must be positive, got {b!r}")
    if variant not in ROSENBROCK_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, ROSENBROCK_VARIANTS))}, "
                         f"got {variant!r}")
    if variant == "extended" and dim % 2:
        raise ValueError(f"the extended Rosenbrock function needs an even dim, got {dim}")
    if variant == "chained" and dim > 2 and float(a) not in (0.0, 1.0):
        raise ValueError(f"the minimiser of the chained {dim}-dimensional Rosenbrock function "
                         f"is known in closed form only for a = 1 (or 0), got a={a!r}; "
                         "variant='extended' takes any a")
    param_dtype = _dtype(dtype)
    x0 = torch.tensor([-1.2 if i % 2 == 0 else 1.0 for i in range(dim)], dtype=torch.float64)
    problem = Rosenbrock(dim, float(a), float(b), variant)
    info = {
        "a": float(a),
        "b": float(b),
        "variant": variant,
        "start": x0.tolist() if dim <= 10 else "(-1.2, 1, -1.2, 1, ...)",
        "optimum": problem.x_star.tolist() if dim <= 10 else (
            f"all {float(a):g}" if variant == "chained" else f"({float(a):g}, {float(a)**2:g}) "
            "repeated"),
    }
    return _workload("rosenbrock", problem, x0.to(param_dtype), info)
