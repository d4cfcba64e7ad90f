"""Closure-based optimizers under the recorder and the guard: torch.optim.LBFGS and
gradguard's GradientDescent, NonlinearCG and Newton behave alike.

For each: the recorder emits its per-step records from the step hooks; a guarded run
with clean gradients equals the unguarded run bit for bit; a step whose gradients are
non-finite is skipped with parameters and state untouched, and audited.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from gradguard.guard import Guard
from gradguard.optim.cg import NonlinearCG
from gradguard.optim.linesearch import GradientDescent
from gradguard.optim.newton import Newton
from gradguard.watch import Recorder

from ..watch.helpers import ListSink

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]], dtype=torch.float64)


def objective(x: torch.Tensor) -> torch.Tensor:
    """A smooth, strictly convex test function (a quadratic plus a quartic)."""
    return 0.5 * x @ A @ x + 0.25 * (x ** 4).sum() - x.sum()


# (make optimizer, whether its closure calls backward)
METHODS: dict[str, tuple[Callable[[list[torch.Tensor]], torch.optim.Optimizer], bool]] = {
    "lbfgs": (lambda ps: torch.optim.LBFGS(ps, lr=1.0, max_iter=1,
                                           line_search_fn="strong_wolfe"), True),
    "gradient_descent": (lambda ps: GradientDescent(ps, gtol=1e-14), False),
    "nonlinear_cg": (lambda ps: NonlinearCG(ps, gtol=1e-14), False),
    "newton": (lambda ps: Newton(ps, gtol=1e-14), False),
}


def closure_for(opt: torch.optim.Optimizer, x: torch.Tensor, backward: bool
                ) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        with torch.enable_grad():
            loss = objective(x)
            if backward:
                opt.zero_grad()
                loss.backward()
        return loss
    return closure


def gradients_at(x: torch.Tensor) -> torch.Tensor:
    """The loss at x, with x.grad set (what a training loop has when it calls the guard)."""
    x.grad = None
    loss = objective(x)
    loss.backward()
    return loss.detach()


def run(name: str, steps: int, *, guarded: bool, nan_at: int | None = None
        ) -> tuple[torch.Tensor, Any, list[Any], Guard | None]:
    make, backward = METHODS[name]
    x = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64, requires_grad=True)
    opt = make([x])
    sink = ListSink()
    recorder = Recorder(opt, [sink], every=1, full_every=1)
    guard = Guard(opt, {"detectors": {"loss_spike": False, "grad_spike": False}},
                  recorder=recorder) if guarded else None
    closure = closure_for(opt, x, backward)
    for step in range(1, steps + 1):
        loss = gradients_at(x)
        if step == nan_at:
            assert x.grad is not None
            x.grad[0] = math.nan
        if guard is not None:
            guard.step(loss, closure)
        else:
            opt.step(closure)
    recorder.close()
    return x.detach().clone(), opt, sink.records, guard


@pytest.mark.parametrize("name", list(METHODS))
def test_the_recorder_sees_every_step_of_a_closure_optimizer(name: str) -> None:
    _, _, records, _ = run(name, 5, guarded=False)
    steps = sorted({r.step for r in records if "param_norm" in r.metrics})
    assert steps == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r.metrics["param_norm"]) for r in records
               if "param_norm" in r.metrics)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_clean_guarded_run_equals_the_unguarded_run(name: str) -> None:
    plain, _, _, _ = run(name, 6, guarded=False)
    guarded, _, records, guard = run(name, 6, guarded=True)
    assert torch.equal(plain, guarded)
    assert guard is not None and guard.counts == {}
    assert {r.step for r in records if "grad_norm" in r.metrics} >= {1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_non_finite_gradient_is_skipped_before_the_closure_runs(name: str) -> None:
    before, opt_before, _, _ = run(name, 3, guarded=True)
    after, opt_after, _, guard = run(name, 4, guarded=True, nan_at=4)
    assert torch.equal(before, after)                     # step 4 did not move x
    assert guard is not None and guard.counts == {"skip": 1}
    assert [r["detector"] for r in guard.audit.records] == ["nonfinite"]
    assert str(opt_before.state_dict()) == str(opt_after.state_dict())
