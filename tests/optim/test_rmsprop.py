"""RMSprop is torch.optim.RMSprop, in every implementation."""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.rmsprop import RMSprop
from tests.optim.harness import (
    assert_params_close,
    assert_round_trip_continues,
    assert_states_close,
    config_ids,
    lockstep,
    two_groups,
)

STEPS = 500

# Every combination of the flags that change the arithmetic.
GRID: list[dict[str, Any]] = [
    {"centered": centered, "momentum": momentum, "weight_decay": weight_decay,
     "maximize": maximize}
    for centered, momentum, weight_decay, maximize in itertools.product(
        [False, True], [0.0, 0.9], [0.0, 0.1], [False, True])
]

# The second group differs in every continuous hyperparameter and in momentum.
GROUPS = {"lr": 0.003, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.02, "momentum": 0.5}

FAST_GRID: list[dict[str, Any]] = [
    {},
    {"maximize": True, "momentum": 0.9},
    {"maximize": True, "weight_decay": 0.1},
    {"centered": True, "maximize": True},
    {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    {"centered": True, "momentum": 0.9, "weight_decay": 0.1},
]


@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_reference_equals_torch(config: dict[str, Any]) -> None:
    ours, opt, theirs, ref = lockstep(
        lambda ps: RMSprop(two_groups(ps, GROUPS), impl="reference", **config),
        lambda ps: torch.optim.RMSprop(two_groups(ps, GROUPS), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("config", [{}, {"lr": 0.001, "alpha": 0.5, "eps": 1e-4},
                                    {"alpha": 0.0, "momentum": 0.3}])
def test_reference_equals_torch_in_one_group(config: dict[str, Any]) -> None:
    ours, opt, theirs, ref = lockstep(
        lambda ps: RMSprop(ps, impl="reference", **config),
        lambda ps: torch.optim.RMSprop(ps, foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", FAST_GRID, ids=config_ids(FAST_GRID))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: RMSprop(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: RMSprop(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol, keys=["square_avg", "momentum_buffer", "grad_avg"])


def test_foreach_equals_reference_when_tensors_are_cut_into_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 32)
    config = FAST_GRID[-2]
    ours, _, ref, _ = lockstep(
        lambda ps: RMSprop(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: RMSprop(two_groups(ps, GROUPS), impl="reference", **config), 100)
    assert_params_close(ours, ref, 1e-12)


def test_auto_picks_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


def test_fused_impl_is_refused() -> None:
    with pytest.raises(ValueError, match="impl"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], impl="fused")


def test_constructor_matches_torch_names_and_defaults() -> None:
    torch_params = inspect.signature(torch.optim.RMSprop).parameters
    for name, param in inspect.signature(RMSprop).parameters.items():
        if name in ("impl", "state_dtype"):
            continue
        assert name in torch_params, f"RMSprop.{name} not in torch"
        assert param.default == torch_params[name].default, name


@pytest.mark.parametrize("name,value", [("eps", 0.0), ("alpha", 1.5), ("alpha", -0.1),
                                        ("momentum", -0.9)])
def test_out_of_range_hyperparameter_is_refused_by_name(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"invalid {name}="):
        RMSprop([torch.nn.Parameter(torch.ones(2))], **{name: value})


@pytest.mark.parametrize("config", [{}, {"momentum": 0.9}, {"centered": True},
                                    {"momentum": 0.9, "centered": True}])
def test_state_dict_layout_matches_torch(config: dict[str, Any]) -> None:
    _, opt, _, ref = lockstep(lambda ps: RMSprop(ps, **config),
                              lambda ps: torch.optim.RMSprop(ps, **config), 3)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for pid in theirs["state"]:
        assert ours["state"][pid].keys() == theirs["state"][pid].keys()
        assert ours["state"][pid]["step"].dtype == theirs["state"][pid]["step"].dtype
    torch_only = {"foreach", "capturable", "differentiable"}
    assert set(theirs["param_groups"][0]) - torch_only == set(ours["param_groups"][0]) - {
        "impl", "state_dtype"}


@pytest.mark.parametrize("direction", ["torch->gradguard", "gradguard->torch"])
def test_state_dict_round_trip_with_torch(direction: str) -> None:
    config = {"momentum": 0.9, "centered": True, "weight_decay": 0.1}

    def torch_rmsprop(ps):
        return torch.optim.RMSprop(two_groups(ps, GROUPS), foreach=False, **config)

    def ours_rmsprop(ps):
        return RMSprop(two_groups(ps, GROUPS), impl="reference", **config)

    first, second = (torch_rmsprop, ours_rmsprop) if direction == "torch->gradguard" else (
        ours_rmsprop, torch_rmsprop)
    assert_round_trip_continues(first, second)


def test_torch_foreach_flag_maps_to_impl_on_load() -> None:
    ref = torch.optim.RMSprop([torch.nn.Parameter(torch.ones(2))], foreach=True)
    opt = RMSprop([torch.nn.Parameter(torch.ones(2))])
    opt.load_state_dict(ref.state_dict())
    group = opt.param_groups[0]
    assert group["impl"] == "foreach"
    assert not {"foreach", "capturable", "differentiable"} & set(group)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_momentum_switched_on_after_the_first_step_starts_from_zero(impl: str) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([p], impl=impl)
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    before = p.detach().clone()
    opt.step()
    avg = opt.state[p]["square_avg"].sqrt() + 1e-8
    assert torch.allclose(opt.state[p]["momentum_buffer"], p.grad / avg)
    assert torch.allclose(p, before - 1e-2 * p.grad / avg)


def test_bfloat16_params_keep_float32_state() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = RMSprop(params, momentum=0.9, centered=True)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    for key in ("square_avg", "momentum_buffer", "grad_avg"):
        assert state[key].dtype == torch.float32, key
    assert state["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16


def test_sparse_gradient_is_refused_naming_the_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = RMSprop([p])
    p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse gradient for parameter 0"):
        opt.step()


def test_centered_variance_rounding_below_zero_stays_finite_where_torch_gives_nan() -> None:
    # alpha=0: v = g*g rounded, gbar = g; v - gbar*gbar (a fused multiply-add) is the
    # rounding error of g*g, negative for this g.
    grad = torch.tensor([3.615036186678367], dtype=torch.float64)
    for impl in ("reference", "foreach"):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = RMSprop([p], lr=0.1, alpha=0.0, centered=True, impl=impl)
        p.grad = grad.clone()
        opt.step()
        assert torch.isfinite(p).all(), impl
    theirs = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    torch_opt = torch.optim.RMSprop([theirs], lr=0.1, alpha=0.0, centered=True, foreach=False)
    theirs.grad = grad.clone()
    torch_opt.step()
    assert torch.isnan(theirs).all()  # the failure gradguard's clamp prevents
