"""Adam and AdamW are torch.optim.Adam / AdamW, in every implementation."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from gradguard.optim import Adam, AdamW
from tests.optim.harness import (
    assert_params_close,
    assert_round_trip_continues,
    assert_states_close,
    config_ids,
    lockstep,
    two_groups,
)

STEPS = 500

ADAM_GRID: list[dict[str, Any]] = [
    {},
    {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"amsgrad": True},
    {"amsgrad": True, "weight_decay": 0.05, "maximize": True},
    {"maximize": True, "lr": 0.003},
    {"betas": (0.0, 0.5), "eps": 1e-3},
]

GROUPS = {"lr": 0.02, "weight_decay": 0.01, "amsgrad": True}


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", ADAM_GRID, ids=config_ids(ADAM_GRID))
def test_adam_reference_equals_torch(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: Adam(groups(ps), impl="reference", **config),
        lambda ps: torch.optim.Adam(groups(ps), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("config", [{}, {"weight_decay": 0.3, "amsgrad": True},
                                    {"maximize": True, "lr": 0.02}])
def test_adamw_reference_equals_torch(config: dict[str, Any]) -> None:
    ours, opt, theirs, ref = lockstep(
        lambda ps: AdamW(ps, impl="reference", **config),
        lambda ps: torch.optim.AdamW(ps, foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("config", ADAM_GRID[1:6], ids=config_ids(ADAM_GRID[1:6]))
def test_fast_paths_equal_reference(cls: type[Adam], config: dict[str, Any], impl: str,
                                    dtype: torch.dtype, tol: float) -> None:
    config = {k: v for k, v in config.items()
              if not (cls is AdamW and k == "decoupled_weight_decay")}
    ours, _, ref, _ = lockstep(
        lambda ps: cls(two_groups(ps, GROUPS), impl=impl, **config),
        lambda ps: cls(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)


def test_auto_picks_fused_on_cpu_float() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "fused"


def test_constructor_matches_torch_names_and_defaults() -> None:
    for ours, theirs in [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)]:
        torch_params = inspect.signature(theirs).parameters
        for name, param in inspect.signature(ours).parameters.items():
            if name in ("impl", "state_dtype"):
                continue
            assert name in torch_params, f"{ours.__name__}.{name} not in torch"
            if param.default is not inspect.Parameter.empty:
                assert param.default == torch_params[name].default, name


def test_state_dict_layout_matches_torch() -> None:
    _, opt, _, ref = lockstep(lambda ps: Adam(ps, amsgrad=True),
                              lambda ps: torch.optim.Adam(ps, amsgrad=True), 3)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for pid in theirs["state"]:
        assert ours["state"][pid].keys() == theirs["state"][pid].keys()
        assert ours["state"][pid]["step"].dtype == theirs["state"][pid]["step"].dtype
    torch_only = {"foreach", "fused", "capturable", "differentiable"}
    assert set(theirs["param_groups"][0]) - torch_only == set(ours["param_groups"][0]) - {
        "impl", "state_dtype"}


@pytest.mark.parametrize("direction", ["torch->gradguard", "gradguard->torch"])
def test_state_dict_round_trip_with_torch(direction: str) -> None:
    def torch_adam(ps):
        return torch.optim.Adam(two_groups(ps, GROUPS), amsgrad=True, weight_decay=0.1,
                                foreach=False)

    def ours_adam(ps):
        return Adam(two_groups(ps, GROUPS), amsgrad=True, weight_decay=0.1,
                    impl="reference")

    first, second = (torch_adam, ours_adam) if direction == "torch->gradguard" else (
        ours_adam, torch_adam)
    assert_round_trip_continues(first, second)


def test_torch_impl_flags_map_to_impl_on_load() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.Adam([p], foreach=True)
    opt = Adam([torch.nn.Parameter(torch.ones(2))])
    opt.load_state_dict(ref.state_dict())
    group = opt.param_groups[0]
    assert group["impl"] == "foreach"
    assert not {"foreach", "fused", "capturable", "differentiable"} & set(group)


def test_bfloat16_params_keep_float32_state() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = Adam(params, lr=1e-2)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32
    assert state["exp_avg_sq"].dtype == torch.float32
    assert state["step"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16
    assert opt.resolve_impl(opt.param_groups[0], params) == "foreach"


def test_bfloat16_state_survives_state_dict_round_trip_at_full_precision() -> None:
    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))]
    opt = Adam(params)
    params[0].grad = torch.randn(8, dtype=torch.bfloat16) * 1e-3
    opt.step()
    saved = opt.state_dict()
    restored = Adam([torch.nn.Parameter(params[0].detach().clone())])
    restored.load_state_dict(saved)
    state = next(iter(restored.state.values()))
    assert state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])


def test_fused_impl_refused_with_reason_for_mixed_precision() -> None:
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    opt = Adam(params, impl="fused")
    params[0].grad = torch.randn(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step()


def test_sparse_gradient_is_refused_naming_the_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = Adam([p])
    p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse gradient for parameter 0"):
        opt.step()
