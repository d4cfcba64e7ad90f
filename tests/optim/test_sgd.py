"""SGD is torch.optim.SGD, in every implementation."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from gradguard.optim.sgd import SGD
from tests.optim.harness import (
    GradientStream,
    assert_params_close,
    assert_round_trip_continues,
    assert_states_close,
    config_ids,
    lockstep,
    make_params,
    two_groups,
)

STEPS = 500
IMPLS = ["reference", "foreach", "fused"]

SGD_GRID: list[dict[str, Any]] = [
    {},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"lr": 0.05, "weight_decay": 0.1},
    {"lr": 0.02, "momentum": 0.7, "dampening": 0.2, "weight_decay": 0.1},
    {"lr": 0.001, "momentum": 0.9, "weight_decay": 0.05, "maximize": True},
    {"lr": 0.01, "momentum": 0.5, "nesterov": True, "weight_decay": 0.05, "maximize": True},
    {"lr": 0.01, "maximize": True},
]

GROUPS = {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.01}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run intra-op single-threaded: the result is the same, and on a loaded machine
    torch's fused CPU kernel waits ~15 ms per call for a descheduled second thread,
    even on tensors of 15 elements."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("config", SGD_GRID, ids=config_ids(SGD_GRID))
def test_reference_equals_torch(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, ref = lockstep(
        lambda ps: SGD(groups(ps), impl="reference", **config),
        lambda ps: torch.optim.SGD(groups(ps), foreach=False, **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("config", SGD_GRID[1:], ids=config_ids(SGD_GRID[1:]))
def test_fast_paths_equal_reference(config: dict[str, Any], impl: str, dtype: torch.dtype,
                                    tol: float, one_thread: None) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: SGD(two_groups(ps, GROUPS), impl=impl, **config),
        lambda ps: SGD(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_parameter_joining_later_starts_its_buffer_from_its_gradient(impl: str,
                                                                   one_thread: None) -> None:
    # torch's fused path assumes every buffer is created on the same step; here
    # parameter 2 gets its first gradient on step 3, when the others have buffers.
    config = {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}
    params = make_params()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = SGD(params, impl=impl, **config)
    ref = torch.optim.SGD(theirs, foreach=False, **config)
    stream = GradientStream(params, gaps=False)
    for t in range(20):
        for ps, o in ((params, opt), (theirs, ref)):
            stream.apply(ps, t)
            if t < 3:
                ps[2].grad = None
            o.step()
    assert_params_close(params, theirs, 1e-12)
    assert_states_close(opt, ref, 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_momentum_no_state_is_kept(impl: str, one_thread: None) -> None:
    _, opt, _, ref = lockstep(lambda ps: SGD(ps, lr=0.1, weight_decay=0.1, impl=impl),
                              lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1), 5)
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}


@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_gradients_are_left_untouched(impl: str) -> None:
    params = make_params()
    opt = SGD(params, lr=0.1, momentum=0.9, nesterov=True, impl=impl)
    stream = GradientStream(params, gaps=False)
    for t in range(3):
        stream.apply(params, t)
        before = [p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, before, strict=True):
            assert torch.equal(p.grad, g)


def test_tensor_learning_rate_is_accepted_as_in_torch() -> None:
    ours, _, theirs, _ = lockstep(
        lambda ps: SGD(ps, lr=torch.tensor(0.05), momentum=0.9, impl="reference"),
        lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.05), momentum=0.9, foreach=False), 50)
    assert_params_close(ours, theirs, 1e-12)


def test_auto_picks_fused_on_cpu_float() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = SGD([p], momentum=0.9)
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "fused"


@pytest.mark.parametrize("bad", [{"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}])
def test_nesterov_requires_momentum_and_zero_dampening(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"nesterov.*momentum.*dampening"):
        SGD([torch.nn.Parameter(torch.ones(2))], nesterov=True, **bad)
    opt = SGD([torch.nn.Parameter(torch.ones(2))], momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="param group 1: nesterov"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **bad})


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
def test_negative_hyperparameter_is_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=f"invalid {name}=-0.1"):
        SGD([torch.nn.Parameter(torch.ones(2))], **{name: -0.1})


def test_constructor_matches_torch_names_and_defaults() -> None:
    torch_params = inspect.signature(torch.optim.SGD).parameters
    for name, param in inspect.signature(SGD).parameters.items():
        if name in ("impl", "state_dtype"):
            continue
        assert name in torch_params, f"SGD.{name} not in torch"
        assert param.kind == torch_params[name].kind, name
        if param.default is not inspect.Parameter.empty:
            assert param.default == torch_params[name].default, name


def test_state_dict_layout_matches_torch() -> None:
    _, opt, _, ref = lockstep(lambda ps: SGD(ps, momentum=0.9),
                              lambda ps: torch.optim.SGD(ps, momentum=0.9), 3)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for pid in theirs["state"]:
        assert ours["state"][pid].keys() == theirs["state"][pid].keys() == {"momentum_buffer"}
    torch_only = {"foreach", "fused", "differentiable"}
    assert set(theirs["param_groups"][0]) - torch_only == set(ours["param_groups"][0]) - {
        "impl", "state_dtype"}


@pytest.mark.parametrize("direction", ["torch->gradguard", "gradguard->torch"])
def test_state_dict_round_trip_with_torch(direction: str) -> None:
    config = {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}

    def torch_sgd(ps):
        return torch.optim.SGD(two_groups(ps, GROUPS), foreach=False, **config)

    def ours_sgd(ps):
        return SGD(two_groups(ps, GROUPS), impl="reference", **config)

    first, second = (torch_sgd, ours_sgd) if direction == "torch->gradguard" else (
        ours_sgd, torch_sgd)
    assert_round_trip_continues(first, second)


def test_torch_impl_flags_map_to_impl_on_load() -> None:
    ref = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], fused=True)
    opt = SGD([torch.nn.Parameter(torch.ones(2))])
    opt.load_state_dict(ref.state_dict())
    group = opt.param_groups[0]
    assert group["impl"] == "fused"
    assert not {"foreach", "fused", "differentiable"} & set(group)


def test_bfloat16_params_keep_float32_momentum() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = SGD(params, lr=1e-2, momentum=0.9)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16
    assert opt.resolve_impl(opt.param_groups[0], params) == "foreach"
