"""Lion is Program 1 of Chen et al. (2023), in every implementation.

torch.optim has no Lion, so the reference below is the paper's Program 1
written out per tensor, with the formula's own arithmetic (no lerp).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.lion import Lion
from tests.optim.harness import (
    GradientStream,
    assert_params_close,
    assert_states_close,
    clone_params,
    config_ids,
    drive,
    lockstep,
    make_params,
    two_groups,
)

STEPS = 500

LION_GRID: list[dict[str, Any]] = [
    {},
    {"lr": 3e-3, "betas": (0.8, 0.95)},
    {"lr": 1e-3, "weight_decay": 0.5},
    {"maximize": True, "lr": 2e-3},
    {"maximize": True, "weight_decay": 0.1, "lr": 1e-3},
    {"betas": (0.0, 0.5), "lr": 1e-3},
]

GROUPS = {"lr": 5e-3, "betas": (0.95, 0.98), "weight_decay": 0.2}


def transposed(dtype: torch.dtype) -> torch.nn.Parameter:
    """A non-contiguous parameter."""
    gen = torch.Generator().manual_seed(1)
    return torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype).t())


class ProgramOne(torch.optim.Optimizer):
    """Program 1, plainly.

    c = b1 m + (1-b1) g;  w = w (1 - lr wd) - lr sign(c);  m = b2 m + (1-b2) g.
    """

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, maximize: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                                  "maximize": maximize})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                c = beta1 * m + (1 - beta1) * g
                p.copy_(p * (1 - lr * wd) - lr * torch.sign(c))
                state["exp_avg"] = beta2 * m + (1 - beta2) * g


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", LION_GRID, ids=config_ids(LION_GRID))
def test_reference_equals_program_1(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: Lion(groups(ps), impl="reference", **config),
        lambda ps: ProgramOne(groups(ps), **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", LION_GRID[1:5], ids=config_ids(LION_GRID[1:5]))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref_params, ref = lockstep(
        lambda ps: Lion(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: Lion(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref_params, tol)
    assert_states_close(opt, ref, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_foreach_cut_into_cpu_blocks_equals_reference(monkeypatch: pytest.MonkeyPatch,
                                                      dtype: torch.dtype, tol: float) -> None:
    # blocks of 3 elements per thread: tensors are cut into views and small ones
    # share a block; the transposed (non-contiguous) parameter stays whole
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 24)
    params = [*make_params(dtype=dtype), transposed(dtype)]
    assert not params[-1].is_contiguous()
    copies = clone_params(params)
    ours = Lion(two_groups(params, GROUPS), impl="foreach", lr=1e-3,
                weight_decay=0.1, maximize=True)
    ref = Lion(two_groups(copies, GROUPS), impl="reference", lr=1e-3,
               weight_decay=0.1, maximize=True)
    stream = GradientStream(params)
    for t in range(100):
        stream.apply(params, t)
        stream.apply(copies, t)
        ours.step()
        ref.step()
    assert_params_close(params, copies, tol)
    assert_states_close(ours, ref, tol)


def test_auto_picks_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lion([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_every_coordinate_moves_by_exactly_lr(impl: str) -> None:
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = Lion([p], lr=0.25, impl=impl)
    p.grad = torch.tensor([3.0, -1e-9, 0.5, -7.0, 1e-300, -2.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([-0.25, 0.25, -0.25, 0.25, -0.25, 0.25],
                                                dtype=torch.float64))


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_zero_interpolation_leaves_the_coordinate_to_weight_decay(impl: str) -> None:
    p = torch.nn.Parameter(torch.tensor([2.0, -4.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1, weight_decay=0.5, impl=impl)
    p.grad = torch.zeros(2, dtype=torch.float64)  # m = 0 and g = 0: sign(c) = 0
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([2.0, -4.0], dtype=torch.float64) * 0.95)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_step_counts_the_steps_each_parameter_received_a_gradient(impl: str) -> None:
    params = make_params()
    opt = Lion(params, impl=impl)
    drive(opt, params, 20)
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in steps)
    # the harness withholds the last parameter's gradient at t % 7 == 3 (t = 3, 10, 17)
    assert [s.item() for s in steps] == [20.0, 20.0, 20.0, 17.0]


def test_state_keys_are_step_and_exp_avg() -> None:
    params = make_params()
    opt = Lion(params)
    drive(opt, params, 2)
    assert all(set(s) == {"step", "exp_avg"} for s in opt.state_dict()["state"].values())


def test_state_dict_round_trip_continues_identically() -> None:
    params = make_params()
    opt = Lion(two_groups(params, GROUPS), lr=1e-3, impl="reference")
    drive(opt, params, 20)
    moved, stayed = clone_params(params), clone_params(params)
    other = Lion(two_groups(moved, GROUPS), lr=1e-3, impl="foreach")
    other.load_state_dict(opt.state_dict())
    same = Lion(two_groups(stayed, GROUPS), lr=1e-3, impl="reference")
    same.load_state_dict(opt.state_dict())
    stream = GradientStream(params, seed=5)
    for t in range(30):
        stream.apply(moved, t)
        stream.apply(stayed, t)
        other.step()
        same.step()
    assert_params_close(moved, stayed, 1e-12)
    assert_states_close(other, same, 1e-12)


def test_bfloat16_params_keep_float32_state() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = Lion(params, lr=1e-2)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32
    assert state["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16


@pytest.mark.parametrize("bad,match", [
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.99)}, r"betas\[0\]"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"maximize": 1}, "maximize"),
    ({"impl": "fused"}, "impl"),
])
def test_invalid_hyperparameters_are_refused_by_name(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.ones(2))], **bad)


def test_docstring_starts_with_a_one_line_summary() -> None:
    assert Lion.__doc__ is not None
    first, second = Lion.__doc__.splitlines()[:2]
    assert first.strip() and not second.strip()
