"""FTRL is Algorithm 1 of McMahan et al. (2013), per coordinate, in every implementation.

torch.optim has no FTRL, so the reference below is Algorithm 1 written out
with Python floats, one coordinate at a time.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.ftrl import FTRL
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

# On the harness problem, l1 of 50-200 zeroes 10-45% of the coordinates, so the
# threshold's both branches (and coordinates crossing it) are compared.
FTRL_GRID: list[dict[str, Any]] = [
    {},
    {"l1": 50.0},
    {"l1": 200.0, "l2": 0.3},
    {"lr": 0.5, "beta": 0.0, "initial_accumulator_value": 0.1, "l1": 100.0},
    {"lr": 0.02, "l2": 1.0, "initial_accumulator_value": 2.0},
    {"maximize": True, "l1": 100.0},
]

GROUPS = {"lr": 0.3, "beta": 0.5, "l1": 100.0, "l2": 0.1}


def transposed(dtype: torch.dtype) -> torch.nn.Parameter:
    """A non-contiguous parameter."""
    gen = torch.Generator().manual_seed(1)
    return torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype).t())


def algorithm_1(w: float, g: float, z: float, n: float, *, lr: float, beta: float, l1: float,
                l2: float) -> tuple[float, float, float]:
    """One coordinate's step: the new (w, z, n)."""
    sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / lr
    z = z + g - sigma * w
    n = n + g * g
    if abs(z) <= l1:
        w = 0.0
    else:
        sign = 1.0 if z > 0 else -1.0
        w = -(z - sign * l1) / ((beta + math.sqrt(n)) / lr + l2)
    return w, z, n


class ScalarFTRL(torch.optim.Optimizer):
    """Algorithm 1 coordinate by coordinate on Python floats."""

    def __init__(self, params: Any, lr: float = 0.1, beta: float = 1.0, l1: float = 0.0,
                 l2: float = 0.0, initial_accumulator_value: float = 0.0,
                 maximize: bool = False) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "l1": l1, "l2": l2,
                                  "initial_accumulator_value": initial_accumulator_value,
                                  "maximize": maximize})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            hyper = {k: group[k] for k in ("lr", "beta", "l1", "l2")}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = torch.zeros_like(p)
                    state["n"] = torch.full_like(p, group["initial_accumulator_value"])
                ws, zs, ns = p.flatten().tolist(), state["z"].flatten().tolist(), \
                    state["n"].flatten().tolist()
                gs = p.grad.flatten().tolist()
                for i, g in enumerate(gs):
                    g = -g if group["maximize"] else g
                    ws[i], zs[i], ns[i] = algorithm_1(ws[i], g, zs[i], ns[i], **hyper)
                p.copy_(torch.tensor(ws, dtype=p.dtype).view_as(p))
                state["z"] = torch.tensor(zs, dtype=p.dtype).view_as(p)
                state["n"] = torch.tensor(ns, dtype=p.dtype).view_as(p)


def _run(steps: int = 200, impl: str = "auto", seed: int = 0,
         **config: Any) -> tuple[list[torch.nn.Parameter], FTRL]:
    params = make_params(seed, shapes=((40, 10), (25,)))
    opt = FTRL(params, impl=impl, **config)
    drive(opt, params, steps, seed)
    return params, opt


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", FTRL_GRID, ids=config_ids(FTRL_GRID))
def test_reference_equals_algorithm_1(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: FTRL(groups(ps), impl="reference", **config),
        lambda ps: ScalarFTRL(groups(ps), **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", FTRL_GRID[1:], ids=config_ids(FTRL_GRID[1:]))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref_params, ref = lockstep(
        lambda ps: FTRL(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: FTRL(two_groups(ps, GROUPS), impl="reference", **config),
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
    ours = FTRL(two_groups(params, GROUPS), impl="foreach", l1=100.0, l2=0.3,
                maximize=True)
    ref = FTRL(two_groups(copies, GROUPS), impl="reference", l1=100.0, l2=0.3,
               maximize=True)
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
    opt = FTRL([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_large_l1_gives_exact_zeros_exactly_where_z_is_within_l1(impl: str) -> None:
    params, opt = _run(impl=impl, l1=30.0)
    zeros = 0
    for p in params:
        w, z = p.detach(), opt.state[p]["z"]
        assert torch.equal(w == 0, z.abs() <= 30.0)
        assert not torch.signbit(w[w == 0]).any(), "zeros must be +0.0"
        zeros += int((w == 0).sum())
    assert zeros > 0


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_zero_l1_forces_no_zeros(impl: str) -> None:
    params, _ = _run(impl=impl, l1=0.0)
    assert all(bool((p != 0).all()) for p in params)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_sparsity_increases_with_l1(impl: str) -> None:
    counts = []
    for l1 in (0.0, 10.0, 30.0, 100.0, 300.0):
        params, _ = _run(impl=impl, l1=l1)
        counts.append(sum(int((p == 0).sum()) for p in params))
    assert counts == sorted(counts), counts
    assert counts[0] == 0 and counts[-1] > counts[1] > 0, counts


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_first_step_replaces_the_initial_weights(impl: str) -> None:
    # with z = 0 and a zero gradient, the closed form is w = 0 whatever w was
    p = torch.nn.Parameter(torch.tensor([5.0, -3.0, 0.25], dtype=torch.float64))
    opt = FTRL([p], impl=impl)
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, dtype=torch.float64))
    assert not torch.signbit(p.detach()).any()


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_coordinates_without_gradient_stay_finite_zero(impl: str) -> None:
    # n = 0 and beta > 0: the denominator is beta / lr, no 0/0
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = FTRL([p], impl=impl, initial_accumulator_value=0.0, l1=0.0)
    for _ in range(3):
        p.grad = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64)
        opt.step()
    w = p.detach()
    assert torch.isfinite(w).all()
    assert torch.equal(w[:2], torch.zeros(2, dtype=torch.float64))
    assert not torch.signbit(w[:2]).any()


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_step_counts_the_steps_each_parameter_received_a_gradient(impl: str) -> None:
    params = make_params()
    opt = FTRL(params, impl=impl)
    drive(opt, params, 20)
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in steps)
    # the harness withholds the last parameter's gradient at t % 7 == 3 (t = 3, 10, 17)
    assert [s.item() for s in steps] == [20.0, 20.0, 20.0, 17.0]


def test_state_keys_are_step_z_and_n_with_n_starting_at_the_accumulator_value() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FTRL([p], initial_accumulator_value=0.5)
    p.grad = torch.tensor([1.0, 0.0, -2.0])
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", "z", "n"}
    assert torch.equal(state["n"], torch.tensor([1.5, 0.5, 4.5]))


def test_state_dict_round_trip_continues_identically() -> None:
    params = make_params()
    opt = FTRL(two_groups(params, GROUPS), l1=0.3, impl="reference")
    drive(opt, params, 20)
    moved, stayed = clone_params(params), clone_params(params)
    other = FTRL(two_groups(moved, GROUPS), l1=0.3, impl="foreach")
    other.load_state_dict(opt.state_dict())
    same = FTRL(two_groups(stayed, GROUPS), l1=0.3, impl="reference")
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
    opt = FTRL(params, l1=0.1)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    assert state["z"].dtype == torch.float32
    assert state["n"].dtype == torch.float32
    assert state["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16


@pytest.mark.parametrize("bad,match", [
    ({"lr": 0.0}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"beta": -1.0}, "beta"),
    ({"l1": -0.1}, "l1"),
    ({"l2": -0.1}, "l2"),
    ({"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
    ({"maximize": "yes"}, "maximize"),
    ({"impl": "fused"}, "impl"),
])
def test_invalid_hyperparameters_are_refused_by_name(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FTRL([torch.nn.Parameter(torch.ones(2))], **bad)


def test_zero_beta_with_zero_accumulator_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"beta=0.*initial_accumulator_value"):
        FTRL([torch.nn.Parameter(torch.ones(2))], beta=0.0)
    FTRL([torch.nn.Parameter(torch.ones(2))], beta=0.0, initial_accumulator_value=0.1)


def test_docstring_starts_with_a_one_line_summary() -> None:
    assert FTRL.__doc__ is not None
    first, second = FTRL.__doc__.splitlines()[:2]
    assert first.strip() and not second.strip()
