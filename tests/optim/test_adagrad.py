"""Adagrad is torch.optim.Adagrad, in every implementation."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.adagrad import Adagrad
from tests.optim.harness import (
    assert_params_close,
    assert_round_trip_continues,
    assert_states_close,
    config_ids,
    lockstep,
    two_groups,
)

STEPS = 500

GRID: list[dict[str, Any]] = [
    {},
    {"lr": 0.1, "lr_decay": 0.01},
    {"weight_decay": 0.1},
    {"initial_accumulator_value": 0.5},
    {"eps": 1e-3, "lr": 0.05},
    {"maximize": True},
    {"maximize": True, "weight_decay": 0.05, "lr_decay": 0.003,
     "initial_accumulator_value": 0.1},
]

FAST_GRID: list[dict[str, Any]] = [
    {"lr": 0.1, "lr_decay": 0.01},
    {"weight_decay": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-3},
    {"maximize": True},
    GRID[-1],
]

# torch.optim.Adagrad ignores a group's own initial_accumulator_value (see
# test_group_initial_accumulator_value_is_used), so the groups differ in everything else.
GROUPS = {"lr": 0.03, "lr_decay": 0.02, "weight_decay": 0.01, "eps": 1e-6, "maximize": True}


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_reference_equals_torch(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: Adagrad(groups(ps), impl="reference", **config),
        lambda ps: torch.optim.Adagrad(groups(ps), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


# The fused kernel handles maximize and weight decay inside; foreach has a path per case.
FAST_CASES = [("foreach", config) for config in FAST_GRID] + [
    ("fused", FAST_GRID[0]), ("fused", FAST_GRID[-1])]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl,config", FAST_CASES,
                         ids=[f"{impl}-{config_ids([cfg])[0]}" for impl, cfg in FAST_CASES])
def test_fast_paths_equal_reference(config: dict[str, Any], impl: str, dtype: torch.dtype,
                                    tol: float) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: Adagrad(two_groups(ps, GROUPS), impl=impl, **config),
        lambda ps: Adagrad(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol, keys=["sum"])


def test_fused_equals_torch_fused() -> None:
    # One kernel on the same inputs: equal in any dtype (float32 here: torch's float64 CPU
    # kernel is slow on small tensors when the machine's cores are busy).
    config = {"lr_decay": 0.01, "weight_decay": 0.05, "maximize": True}
    ours, opt, theirs, ref = lockstep(
        lambda ps: Adagrad(ps, impl="fused", **config),
        lambda ps: torch.optim.Adagrad(ps, fused=True, **config), STEPS, dtype=torch.float32)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


def test_foreach_equals_reference_when_tensors_are_cut_into_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 32)
    config = {"weight_decay": 0.05, "lr_decay": 0.01, "maximize": True}
    ours, _, ref, _ = lockstep(
        lambda ps: Adagrad(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: Adagrad(two_groups(ps, GROUPS), impl="reference", **config), 100)
    assert_params_close(ours, ref, 1e-12)


def test_state_exists_from_construction_like_torch() -> None:
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    ours = Adagrad(params, initial_accumulator_value=0.25).state_dict()
    theirs = torch.optim.Adagrad(params, initial_accumulator_value=0.25).state_dict()
    assert ours["state"].keys() == theirs["state"].keys() == {0, 1}
    for pid, state in theirs["state"].items():
        assert ours["state"][pid].keys() == state.keys() == {"step", "sum"}
        assert ours["state"][pid]["step"].dtype == state["step"].dtype
        assert torch.equal(ours["state"][pid]["sum"], state["sum"])


def test_group_initial_accumulator_value_is_used() -> None:
    # torch.optim.Adagrad fills every group's sum with the constructor's value.
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = Adagrad([{"params": params[:1]},
                   {"params": params[1:], "initial_accumulator_value": 3.0}],
                  initial_accumulator_value=1.0)
    assert torch.equal(opt.state[params[0]]["sum"], torch.full((2,), 1.0))
    assert torch.equal(opt.state[params[1]]["sum"], torch.full((2,), 3.0))


def test_group_added_later_gets_state_at_its_first_step() -> None:
    opt = Adagrad([torch.nn.Parameter(torch.zeros(2))])
    late = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [late], "initial_accumulator_value": 2.0})
    assert late not in opt.state
    late.grad = torch.ones(3)
    opt.step()
    assert torch.equal(opt.state[late]["sum"], torch.full((3,), 3.0))


def test_auto_picks_fused_on_cpu_float() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adagrad([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "fused"


def test_constructor_matches_torch_names_and_defaults() -> None:
    torch_params = inspect.signature(torch.optim.Adagrad).parameters
    for name, param in inspect.signature(Adagrad).parameters.items():
        if name in ("impl", "state_dtype"):
            continue
        assert name in torch_params, f"Adagrad.{name} not in torch"
        assert param.default == torch_params[name].default, name


def test_eps_zero_is_refused_naming_eps() -> None:
    with pytest.raises(ValueError, match="eps"):
        Adagrad([torch.nn.Parameter(torch.ones(2))], eps=0.0)


def test_state_dict_layout_matches_torch_after_steps() -> None:
    _, opt, _, ref = lockstep(lambda ps: Adagrad(ps), lambda ps: torch.optim.Adagrad(ps), 3)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for pid in theirs["state"]:
        assert ours["state"][pid].keys() == theirs["state"][pid].keys()
        assert ours["state"][pid]["step"].dtype == theirs["state"][pid]["step"].dtype
    torch_only = {"foreach", "fused", "differentiable"}
    assert set(theirs["param_groups"][0]) - torch_only == set(ours["param_groups"][0]) - {
        "impl", "state_dtype"}


@pytest.mark.parametrize("direction", ["torch->gradguard", "gradguard->torch"])
def test_state_dict_round_trip_with_torch(direction: str) -> None:
    config = {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}

    def torch_adagrad(ps):
        return torch.optim.Adagrad(two_groups(ps, GROUPS), foreach=False, **config)

    def ours_adagrad(ps):
        return Adagrad(two_groups(ps, GROUPS), impl="reference", **config)

    first, second = (torch_adagrad, ours_adagrad) if direction == "torch->gradguard" else (
        ours_adagrad, torch_adagrad)
    assert_round_trip_continues(first, second)


def test_torch_fused_flag_maps_to_impl_on_load() -> None:
    ref = torch.optim.Adagrad([torch.nn.Parameter(torch.ones(2))], fused=True)
    opt = Adagrad([torch.nn.Parameter(torch.ones(2))])
    opt.load_state_dict(ref.state_dict())
    group = opt.param_groups[0]
    assert group["impl"] == "fused"
    assert not {"foreach", "fused", "differentiable"} & set(group)


def test_bfloat16_params_keep_float32_sum() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = Adagrad(params, initial_accumulator_value=0.1)
    assert opt.state[params[0]]["sum"].dtype == torch.float32
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[params[0]]["sum"].dtype == torch.float32
    assert opt.state[params[0]]["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16
    assert opt.resolve_impl(opt.param_groups[0], params) == "foreach"


def test_share_memory_moves_sums_to_shared_memory() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adagrad([p])
    opt.share_memory()
    assert opt.state[p]["sum"].is_shared()

