"""Shared machinery for optimizer tests: random problems and lock-step comparisons.

A *problem* is a list of parameters of assorted shapes and a deterministic
gradient stream: at step ``t`` the gradient of parameter ``i`` is
``curvature_i * (p_i - target_i) + noise_t``, so gradients depend on the
trajectory (state and parameters interact) and two optimizers driven in lock
step see exactly the same inputs. Some steps leave one parameter without a
gradient and give another an all-zero gradient, as real training does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

SHAPES: tuple[tuple[int, ...], ...] = ((5, 3), (7,), (2, 2, 2), (1,))

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def make_params(seed: int = 0, dtype: torch.dtype = torch.float64,
                shapes: Sequence[tuple[int, ...]] = SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in shapes]


def clone_params(params: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


class GradientStream:
    """Deterministic, trajectory-dependent gradients for a list of parameters."""

    def __init__(self, params: Sequence[Tensor], seed: int = 0, noise: float = 0.3,
                 gaps: bool = True) -> None:
        gen = torch.Generator().manual_seed(10_000 + seed)
        self.targets = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        self.curvatures = [float(c) for c in torch.rand(len(params), generator=gen) * 2 + 0.1]
        self.seed = seed
        self.noise = noise
        self.gaps = gaps

    def apply(self, params: Sequence[Tensor], t: int) -> None:
        """Set ``p.grad`` for every parameter for step ``t``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        for i, p in enumerate(params):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * self.noise
            if self.gaps and i == len(params) - 1 and t % 7 == 3:
                p.grad = None  # a parameter that received no gradient this step
                continue
            grad = self.curvatures[i] * (p.detach().double() - self.targets[i]) + noise
            if self.gaps and i == 1 and t % 5 == 2:
                grad = torch.zeros_like(grad)  # an all-zero gradient
            p.grad = grad.to(p.dtype)


def drive(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], steps: int,
          seed: int = 0, stream: GradientStream | None = None) -> None:
    stream = stream or GradientStream(params, seed)
    for t in range(steps):
        stream.apply(params, t)
        optimizer.step()


def lockstep(make_a: OptimizerFactory, make_b: OptimizerFactory, steps: int, seed: int = 0,
             dtype: torch.dtype = torch.float64, shapes: Sequence[tuple[int, ...]] = SHAPES,
             ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                        list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Run two optimizers from the same start on the same gradient stream."""
    params_a = make_params(seed, dtype, shapes)
    return step_pair(params_a, clone_params(params_a), make_a, make_b,
                     lambda params: GradientStream(params, seed), steps)


class Stream(Protocol):
    """Sets the gradients of step ``t`` on a list of parameters."""

    def apply(self, params: Sequence[torch.nn.Parameter], t: int) -> None: ...


def step_pair(params_a: list[torch.nn.Parameter], params_b: list[torch.nn.Parameter],
              make_a: OptimizerFactory, make_b: OptimizerFactory,
              make_stream: Callable[[list[torch.nn.Parameter]], Stream], steps: int,
              ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                         list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Step an optimizer on each list of parameters, ``steps`` times, on the same gradients.

    The stream is made from ``params_a`` after the optimizers, which may replace
    parameters in the lists (a test's transposed parameter, for instance).
    """
    opt_a, opt_b = make_a(params_a), make_b(params_b)
    stream = make_stream(params_a)
    for t in range(steps):
        stream.apply(params_a, t)
        stream.apply(params_b, t)
        opt_a.step()
        opt_b.step()
    return params_a, opt_a, params_b, opt_b


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max|actual - expected| / max|expected| (absolute when expected is all zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_params_close(actual: Sequence[Tensor], expected: Sequence[Tensor],
                        tol: float) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err = rel_err(a, e)
        assert err <= tol, f"parameter {i}: relative error {err:.3e} > {tol:.1e}"


def assert_states_close(actual: torch.optim.Optimizer, expected: torch.optim.Optimizer,
                        tol: float, keys: Sequence[str] | None = None) -> None:
    """Every state tensor of ``expected`` (or only ``keys``) matches in ``actual``."""
    sa, se = actual.state_dict()["state"], expected.state_dict()["state"]
    assert sa.keys() == se.keys(), f"state for params {sorted(sa)} vs {sorted(se)}"
    for pid, state in se.items():
        for key, value in state.items():
            if keys is not None and key not in keys:
                continue
            assert key in sa[pid], f"param {pid}: state key {key!r} missing"
            if torch.is_tensor(value):
                err = rel_err(sa[pid][key], value)
                assert err <= tol, f"param {pid} state {key!r}: relative error {err:.3e}"


def two_groups(params: list[torch.nn.Parameter], second: dict[str, Any]) -> list[dict[str, Any]]:
    """Split parameters into two groups, the second with its own hyperparameters."""
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def assert_round_trip_continues(first: OptimizerFactory, second: OptimizerFactory,
                                steps: int = 20, more: int = 30, tol: float = 1e-12) -> None:
    """``second`` loaded with ``first``'s state dict after ``steps`` steps continues as
    ``first`` reloaded from its own state dict would, for ``more`` steps."""
    params, opt, _, _ = lockstep(first, first, steps)
    moved = clone_params(params)
    other = second(moved)
    other.load_state_dict(opt.state_dict())
    stayed = clone_params(params)
    same = first(stayed)
    same.load_state_dict(opt.state_dict())
    stream = GradientStream(params, seed=5)
    for t in range(more):
        stream.apply(moved, t)
        stream.apply(stayed, t)
        other.step()
        same.step()
    assert_params_close(moved, stayed, tol)
    assert_states_close(other, same, tol)


def config_ids(grid: Sequence[dict[str, Any]]) -> list[str]:
    """pytest ids for a grid of hyperparameter dicts: ``"lr=0.1,amsgrad=True"``."""
    return [",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults" for cfg in grid]
