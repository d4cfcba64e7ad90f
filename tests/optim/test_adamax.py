"""Adamax is torch.optim.Adamax, in every implementation."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.adamax import Adamax
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
    {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
    {"weight_decay": 0.1},
    {"maximize": True, "lr": 0.003},
    {"maximize": True, "weight_decay": 0.05},
    {"betas": (0.0, 0.5), "eps": 1e-3},
]

GROUPS = {"lr": 0.02, "weight_decay": 0.01, "betas": (0.5, 0.9)}


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_reference_equals_torch(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: Adamax(groups(ps), impl="reference", **config),
        lambda ps: torch.optim.Adamax(groups(ps), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", GRID[1:5], ids=config_ids(GRID[1:5]))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: Adamax(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: Adamax(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol)


@pytest.mark.parametrize("config", [{}, {"maximize": True, "weight_decay": 0.1}],
                         ids=["defaults", "maximize,weight_decay"])
def test_foreach_in_small_cpu_blocks_equals_reference(
        config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 float64 elements per block: tensors are cut into slices and small ones share blocks;
    # a transposed (non-contiguous) parameter is kept whole.
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 32)
    shapes = ((5, 3), (7,), (2, 2, 2), (1,), (3, 4))

    def transposed(ps):
        ps[4] = torch.nn.Parameter(ps[4].detach().t())
        return ps

    ours, opt, ref, ref_opt = lockstep(
        lambda ps: Adamax(transposed(ps), impl="foreach", **config),
        lambda ps: Adamax(transposed(ps), impl="reference", **config),
        50, shapes=shapes)
    assert not ours[4].is_contiguous()
    assert_params_close(ours, ref, 1e-15)
    assert_states_close(opt, ref_opt, 1e-15)


def test_auto_picks_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adamax([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


def test_fused_impl_is_refused() -> None:
    with pytest.raises(ValueError, match="impl='fused'"):
        Adamax([torch.nn.Parameter(torch.ones(2))], impl="fused")


@pytest.mark.parametrize("bad,name", [({"eps": 0.0}, "eps"), ({"betas": (0.9, 1.0)}, "betas"),
                                      ({"lr": -1.0}, "lr"), ({"weight_decay": -0.1},
                                                             "weight_decay")])
def test_invalid_hyperparameter_is_refused_naming_it(bad: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Adamax([torch.nn.Parameter(torch.ones(2))], **bad)


def test_constructor_matches_torch_names_and_defaults() -> None:
    torch_params = inspect.signature(torch.optim.Adamax).parameters
    for name, param in inspect.signature(Adamax).parameters.items():
        if name in ("impl", "state_dtype"):
            continue
        assert name in torch_params, f"Adamax.{name} not in torch"
        assert param.default == torch_params[name].default, name


def test_state_dict_layout_matches_torch() -> None:
    _, opt, _, ref = lockstep(Adamax, torch.optim.Adamax, 3)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for pid, state in theirs["state"].items():
        assert list(ours["state"][pid]) == list(state)
        for key, value in state.items():
            assert ours["state"][pid][key].dtype == value.dtype, key
            assert ours["state"][pid][key].device == value.device, key
    torch_only = {"foreach", "differentiable", "capturable"}
    assert set(theirs["param_groups"][0]) - torch_only == set(ours["param_groups"][0]) - {
        "impl", "state_dtype"}


@pytest.mark.parametrize("direction", ["torch->gradguard", "gradguard->torch"])
def test_state_dict_round_trip_with_torch(direction: str) -> None:
    def torch_adamax(ps):
        return torch.optim.Adamax(two_groups(ps, GROUPS), weight_decay=0.1, foreach=False)

    def ours_adamax(ps):
        return Adamax(two_groups(ps, GROUPS), weight_decay=0.1, impl="reference")

    first, second = (torch_adamax, ours_adamax) if direction == "torch->gradguard" else (
        ours_adamax, torch_adamax)
    assert_round_trip_continues(first, second)


def test_bfloat16_params_keep_float32_state() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = Adamax(params, lr=1e-2)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32
    assert state["exp_inf"].dtype == torch.float32
    assert state["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16


def test_coordinate_never_updated_stays_finite() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adamax([p])
    p.grad = torch.tensor([1.0, 0.0, 0.0])
    opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(opt.state[p]["exp_inf"][1:], torch.full((2,), 1e-8))
