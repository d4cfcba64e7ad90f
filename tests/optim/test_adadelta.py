"""Adadelta is torch.optim.Adadelta, in every implementation."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.adadelta import Adadelta
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
    {"lr": 0.5, "rho": 0.95, "eps": 1e-4},
    {"weight_decay": 0.1},
    {"maximize": True},
    {"maximize": True, "weight_decay": 0.05},
    {"rho": 0.0},
    {"rho": 1.0, "eps": 1e-2},
]

GROUPS = {"lr": 0.3, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.02}


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_reference_equals_torch(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: Adadelta(groups(ps), impl="reference", **config),
        lambda ps: torch.optim.Adadelta(groups(ps), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", GRID[1:5], ids=config_ids(GRID[1:5]))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: Adadelta(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: Adadelta(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol, keys=["square_avg", "acc_delta"])


def test_foreach_equals_reference_when_tensors_are_cut_into_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 32)
    config = {"maximize": True, "weight_decay": 0.05}
    ours, _, ref, _ = lockstep(
        lambda ps: Adadelta(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: Adadelta(two_groups(ps, GROUPS), impl="reference", **config), 100)
    assert_params_close(ours, ref, 1e-12)


def test_auto_picks_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adadelta([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


def test_constructor_matches_torch_names_and_defaults() -> None:
    torch_params = inspect.signature(torch.optim.Adadelta).parameters
    for name, param in inspect.signature(Adadelta).parameters.items():
        if name in ("impl", "state_dtype"):
            continue
        assert name in torch_params, f"Adadelta.{name} not in torch"
        assert param.default == torch_params[name].default, name


@pytest.mark.parametrize("name,value", [("eps", 0.0), ("rho", 1.5), ("rho", -0.1),
                                        ("lr", -1.0), ("weight_decay", -0.1)])
def test_out_of_range_hyperparameter_is_refused_by_name(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"invalid {name}="):
        Adadelta([torch.nn.Parameter(torch.ones(2))], **{name: value})


def test_state_dict_layout_matches_torch() -> None:
    _, opt, _, ref = lockstep(lambda ps: Adadelta(ps), lambda ps: torch.optim.Adadelta(ps), 3)
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
    config = {"weight_decay": 0.1, "rho": 0.95}

    def torch_adadelta(ps):
        return torch.optim.Adadelta(two_groups(ps, GROUPS), foreach=False, **config)

    def ours_adadelta(ps):
        return Adadelta(two_groups(ps, GROUPS), impl="reference", **config)

    first, second = (torch_adadelta, ours_adadelta) if direction == "torch->gradguard" else (
        ours_adadelta, torch_adadelta)
    assert_round_trip_continues(first, second)


def test_torch_foreach_flag_maps_to_impl_on_load() -> None:
    ref = torch.optim.Adadelta([torch.nn.Parameter(torch.ones(2))], foreach=True)
    opt = Adadelta([torch.nn.Parameter(torch.ones(2))])
    opt.load_state_dict(ref.state_dict())
    group = opt.param_groups[0]
    assert group["impl"] == "foreach"
    assert not {"foreach", "capturable", "differentiable"} & set(group)


def test_first_step_size_is_set_by_eps() -> None:
    # u_0 = 0, so the first step is lr * sqrt(eps) / sqrt((1 - rho) g^2 + eps) * g.
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Adadelta([p], lr=1.0, rho=0.9, eps=1e-6)
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    expected = -(1e-6 ** 0.5) / (0.1 + 1e-6) ** 0.5
    assert p.item() == pytest.approx(expected, rel=1e-12)


def test_bfloat16_params_keep_float32_state() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = Adadelta(params)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    assert state["square_avg"].dtype == torch.float32
    assert state["acc_delta"].dtype == torch.float32
    assert state["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16


def test_sparse_gradient_is_refused_naming_the_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = Adadelta([p])
    p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse gradient for parameter 0"):
        opt.step()
