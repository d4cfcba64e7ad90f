"""NAdam is torch.optim.NAdam, in every implementation."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.nadam import NAdam
from tests.optim.harness import (
    GradientStream,
    assert_params_close,
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
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"momentum_decay": 0.0},
    {"momentum_decay": 0.5, "lr": 0.005},
    {"maximize": True, "weight_decay": 0.05},
    {"maximize": True, "weight_decay": 0.05, "decoupled_weight_decay": True},
    {"betas": (0.0, 0.5), "eps": 1e-3},
]

GROUPS = {"lr": 0.02, "weight_decay": 0.01, "momentum_decay": 0.1}


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_reference_equals_torch(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: NAdam(groups(ps), impl="reference", **config),
        lambda ps: torch.optim.NAdam(groups(ps), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", GRID[1:8], ids=config_ids(GRID[1:8]))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: NAdam(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: NAdam(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol)


@pytest.mark.parametrize("config", [{"weight_decay": 0.1},
                                    {"maximize": True, "weight_decay": 0.1,
                                     "decoupled_weight_decay": True}],
                         ids=["weight_decay", "maximize,decoupled"])
def test_foreach_in_small_cpu_blocks_equals_reference(
        config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 float64 elements per block: tensors are cut into slices and small ones share blocks.
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 32)
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: NAdam(ps, impl="foreach", **config),
        lambda ps: NAdam(ps, impl="reference", **config), 50)
    assert_params_close(ours, ref, 1e-12)
    assert_states_close(opt, ref_opt, 1e-12)


def test_auto_picks_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = NAdam([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


@pytest.mark.parametrize("bad,name", [({"eps": 0.0}, "eps"),
                                      ({"momentum_decay": -1e-3}, "momentum_decay"),
                                      ({"betas": (1.0, 0.999)}, "betas"),
                                      ({"decoupled_weight_decay": 1}, "decoupled_weight_decay")])
def test_invalid_hyperparameter_is_refused_naming_it(bad: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NAdam([torch.nn.Parameter(torch.ones(2))], **bad)


def test_constructor_matches_torch_names_and_defaults() -> None:
    torch_params = inspect.signature(torch.optim.NAdam).parameters
    for name, param in inspect.signature(NAdam).parameters.items():
        if name in ("impl", "state_dtype"):
            continue
        assert name in torch_params, f"NAdam.{name} not in torch"
        assert param.default == torch_params[name].default, name
        assert param.kind == torch_params[name].kind, name


def test_state_dict_layout_matches_torch() -> None:
    _, opt, _, ref = lockstep(NAdam, torch.optim.NAdam, 3)
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


def test_mu_product_is_a_scalar_of_torchs_dtype_under_float64_default() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _, opt, _, ref = lockstep(NAdam, torch.optim.NAdam, 3)
    finally:
        torch.set_default_dtype(previous)
    ours, theirs = opt.state_dict()["state"][0], ref.state_dict()["state"][0]
    for key in ("step", "mu_product"):
        assert ours[key].shape == ()
        assert ours[key].dtype == theirs[key].dtype == torch.float64
        assert torch.equal(ours[key], theirs[key])


def _torch_nadam(ps):
    return torch.optim.NAdam(two_groups(ps, GROUPS), weight_decay=0.1, foreach=False)


def _ours_nadam(ps):
    return NAdam(two_groups(ps, GROUPS), weight_decay=0.1, impl="reference")


def _continue(opt, params) -> None:
    stream = GradientStream(params, seed=5)
    for t in range(30):
        stream.apply(params, t)
        opt.step()


def _reload(factory, params, state_dict):
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = factory(moved)
    opt.load_state_dict(state_dict)
    return moved, opt


def test_torch_state_loaded_into_gradguard_continues_the_uninterrupted_torch_run() -> None:
    _, _, theirs, ref = lockstep(_ours_nadam, _torch_nadam, 20)
    moved, ours = _reload(_ours_nadam, theirs, ref.state_dict())
    _continue(ours, moved)
    _continue(ref, theirs)
    assert_params_close(moved, theirs, 1e-12)
    assert_states_close(ours, ref, 1e-12)


def test_gradguard_state_loaded_into_torch_equals_torch_state_loaded_into_torch() -> None:
    """torch's loader casts ``mu_product`` to the parameter dtype whatever its source,
    so a torch run resumed from gradguard is a torch run resumed from torch."""
    ours, opt, theirs, ref = lockstep(_ours_nadam, _torch_nadam, 20)
    from_ours, torch_a = _reload(_torch_nadam, ours, opt.state_dict())
    from_torch, torch_b = _reload(_torch_nadam, theirs, ref.state_dict())
    _continue(torch_a, from_ours)
    _continue(torch_b, from_torch)
    assert_params_close(from_ours, from_torch, 1e-12)
    assert_states_close(torch_a, torch_b, 1e-12)


def test_float_mu_product_from_old_state_dict_becomes_a_tensor() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = NAdam([p])
    p.grad = torch.ones(2)
    opt.step()
    saved = opt.state_dict()
    expected = opt.state[p]["mu_product"].item()
    saved["state"][0] = {**saved["state"][0], "step": 1.0, "mu_product": expected}
    restored = NAdam([torch.nn.Parameter(p.detach().clone())])
    restored.load_state_dict(saved)
    state = next(iter(restored.state.values()))
    assert torch.is_tensor(state["mu_product"]) and state["mu_product"].shape == ()
    assert state["mu_product"].item() == expected


def test_bfloat16_params_keep_float32_state() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = NAdam(params, lr=1e-2)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[params[0]]
    for key in ("step", "mu_product", "exp_avg", "exp_avg_sq"):
        assert state[key].dtype == torch.float32, key
    assert params[0].dtype == torch.bfloat16
