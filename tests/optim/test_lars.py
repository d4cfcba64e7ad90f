"""LARS follows You, Gitman & Ginsburg's layer-wise trust ratio, in every implementation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from gradguard.optim.lars import LARS
from tests.optim.harness import (
    GradientStream,
    assert_params_close,
    assert_states_close,
    config_ids,
    lockstep,
    make_params,
    two_groups,
)

STEPS = 500
IMPLS = ["reference", "foreach"]


class PaperLARS(torch.optim.Optimizer):
    """The update rule of the LARS docstring, one tensor at a time, in Python floats."""

    def __init__(self, params: Any, lr: float = 0.1, momentum: float = 0.9,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 trust_coefficient: float = 0.001, eps: float = 1e-8,
                 maximize: bool = False) -> None:
        super().__init__(params, {
            "lr": lr, "momentum": momentum, "dampening": dampening,
            "weight_decay": weight_decay, "nesterov": nesterov,
            "trust_coefficient": trust_coefficient, "eps": eps, "maximize": maximize})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            mu, wd = group["momentum"], group["weight_decay"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = -w.grad if group["maximize"] else w.grad
                w_norm, g_norm = w.norm().item(), g.norm().item()
                if w_norm > 0 and g_norm > 0:
                    local_lr = (group["trust_coefficient"] * w_norm
                                / (g_norm + wd * w_norm + group["eps"]))
                else:
                    local_lr = 1.0
                d = local_lr * (g + wd * w)
                if mu != 0:
                    state = self.state[w]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d
                    else:
                        state["momentum_buffer"] = (mu * state["momentum_buffer"]
                                                    + (1 - group["dampening"]) * d)
                    buf = state["momentum_buffer"]
                    update = d + mu * buf if group["nesterov"] else buf
                else:
                    update = d
                w.sub_(group["lr"] * update)


# lr * trust_coefficient sets the relative step ||dw|| / ||w|| per step; kept small
# enough that 500 steps neither settle into chaos around the optimum nor, with
# maximize, overflow.
LARS_GRID: list[dict[str, Any]] = [
    {},
    {"lr": 1.0, "trust_coefficient": 0.01},
    {"lr": 1.0, "trust_coefficient": 0.01, "momentum": 0.0},
    {"lr": 1.0, "trust_coefficient": 0.01, "weight_decay": 0.1},
    {"lr": 1.0, "trust_coefficient": 0.01, "momentum": 0.0, "weight_decay": 0.1},
    {"lr": 0.5, "trust_coefficient": 0.01, "momentum": 0.7, "dampening": 0.3},
    {"lr": 1.0, "trust_coefficient": 0.005, "nesterov": True, "weight_decay": 0.05},
    {"lr": 0.2, "trust_coefficient": 0.01, "weight_decay": 0.01, "maximize": True},
    {"momentum": 0.0, "maximize": True, "eps": 1e-3},
    {"lr": 0.3, "trust_coefficient": 0.01, "nesterov": True, "maximize": True},
]

GROUPS = {"lr": 2.0, "trust_coefficient": 0.002, "weight_decay": 0.01, "momentum": 0.5}


# every configuration beside a second group with other hyperparameters; a few alone
RULE_CASES = [(cfg, True) for cfg in LARS_GRID] + [(LARS_GRID[i], False) for i in (0, 6, 9)]


@pytest.mark.parametrize("config,split", RULE_CASES, ids=[
    f"{config_ids([cfg])[0]}-{'two-groups' if split else 'one-group'}"
    for cfg, split in RULE_CASES])
def test_reference_follows_the_update_rule(config: dict[str, Any], split: bool) -> None:
    def groups(ps):
        return two_groups(ps, GROUPS) if split else ps

    ours, opt, theirs, paper = lockstep(
        lambda ps: LARS(groups(ps), impl="reference", **config),
        lambda ps: PaperLARS(groups(ps), **config), STEPS)
    assert_params_close(ours, theirs, 1e-12)
    assert_states_close(opt, paper, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", LARS_GRID[1:], ids=config_ids(LARS_GRID[1:]))
def test_foreach_equals_reference(config: dict[str, Any], dtype: torch.dtype,
                                  tol: float) -> None:
    ours, opt, ref, ref_opt = lockstep(
        lambda ps: LARS(two_groups(ps, GROUPS), impl="foreach", **config),
        lambda ps: LARS(two_groups(ps, GROUPS), impl="reference", **config),
        STEPS, dtype=dtype)
    assert_params_close(ours, ref, tol)
    assert_states_close(opt, ref_opt, tol)


def _one_step(impl: str, weight: torch.Tensor, grad: torch.Tensor,
              **config: Any) -> torch.Tensor:
    """The new value of ``weight`` after one step, next to a non-trivial tensor."""
    params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(torch.full((4,), 2.0))]
    params[0].grad = grad.clone()
    params[1].grad = torch.full((4,), 0.5)
    LARS(params, impl=impl, **config).step()
    return params[0].detach()


@pytest.mark.parametrize("impl", IMPLS)
def test_step_is_lr_times_trust_ratio_times_gradient(impl: str) -> None:
    w, g = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])  # ||w|| = 5, ||g|| = 0.5
    lr, tc, wd, eps = 0.1, 0.02, 0.1, 1e-8
    new = _one_step(impl, w, g, lr=lr, trust_coefficient=tc, weight_decay=wd, eps=eps)
    rho = tc * 5.0 / (0.5 + wd * 5.0 + eps)
    torch.testing.assert_close(new, w - lr * rho * (g + wd * w), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_weight_takes_trust_ratio_one(impl: str) -> None:
    g = torch.tensor([1.0, -2.0, 3.0])
    new = _one_step(impl, torch.zeros(3), g, lr=0.1, weight_decay=0.1)
    torch.testing.assert_close(new, -0.1 * g, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gradient_takes_trust_ratio_one(impl: str) -> None:
    w = torch.tensor([1.0, -2.0, 3.0])
    new = _one_step(impl, w, torch.zeros(3), lr=0.1, weight_decay=0.2)
    torch.testing.assert_close(new, w - 0.1 * 0.2 * w, rtol=1e-7, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_does_not_depend_on_gradient_scale(impl: str) -> None:
    w, g = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    small = _one_step(impl, w, g * 1e-3, lr=1.0, eps=1e-300)
    large = _one_step(impl, w, g * 1e3, lr=1.0, eps=1e-300)
    torch.testing.assert_close(small, large, rtol=1e-13, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_relative_step_is_lr_times_trust_coefficient(impl: str) -> None:
    w = torch.randn(100, dtype=torch.float64)
    new = _one_step(impl, w, torch.randn(100, dtype=torch.float64), lr=0.5,
                    trust_coefficient=0.01, eps=1e-300)
    assert math.isclose((new - w).norm() / w.norm(), 0.5 * 0.01, rel_tol=1e-12)


def test_parameter_joining_later_starts_its_buffer_from_its_update() -> None:
    config = {"lr": 1.0, "trust_coefficient": 0.01, "momentum": 0.8, "dampening": 0.2,
              "weight_decay": 0.1}
    runs = []
    for impl in ["foreach", "paper"]:
        params = make_params()
        opt = PaperLARS(params, **config) if impl == "paper" else LARS(params, impl=impl,
                                                                       **config)
        stream = GradientStream(params, gaps=False)
        for t in range(20):
            stream.apply(params, t)
            if t < 3:
                params[2].grad = None
            opt.step()
        runs.append((params, opt))
    assert_params_close(runs[0][0], runs[1][0], 1e-12)
    assert_states_close(runs[0][1], runs[1][1], 1e-12)


def test_foreach_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    params = make_params()
    opt = LARS(params, lr=torch.tensor(0.5), weight_decay=0.1, nesterov=True,
               maximize=True, impl="foreach")
    opt.param_groups[0]["lr"] = 0.5  # a tensor lr is read once per step, by design
    stream = GradientStream(params, gaps=False)
    for t in range(3):
        stream.apply(params, t)

        def refuse(*args: Any) -> Any:
            raise AssertionError("host sync in the foreach path")

        with monkeypatch.context() as patch:
            for method in ("item", "__bool__", "__float__", "tolist"):
                patch.setattr(torch.Tensor, method, refuse)
            opt.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_without_momentum_no_state_is_kept(impl: str) -> None:
    _, opt, _, _ = lockstep(lambda ps: LARS(ps, momentum=0.0, impl=impl),
                            lambda ps: LARS(ps, momentum=0.0, impl=impl), 3)
    assert opt.state_dict()["state"] == {}


def test_state_is_the_momentum_buffer() -> None:
    _, opt, _, _ = lockstep(LARS, LARS, 3)
    for state in opt.state_dict()["state"].values():
        assert state.keys() == {"momentum_buffer"}


def test_state_dict_round_trip_continues_identically() -> None:
    config = {"lr": 1.0, "trust_coefficient": 0.01, "weight_decay": 0.01}
    params, opt, _, _ = lockstep(lambda ps: LARS(ps, **config),
                                 lambda ps: LARS(ps, **config), 20)
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = LARS(moved, **config)
    restored.load_state_dict(opt.state_dict())
    stream = GradientStream(params, seed=5)
    for t in range(30):
        stream.apply(params, t)
        stream.apply(moved, t)
        opt.step()
        restored.step()
    assert_params_close(moved, params, 0)
    assert_states_close(restored, opt, 0)


@pytest.mark.parametrize("bad", [{"momentum": 0.0}, {"dampening": 0.1}])
def test_nesterov_requires_momentum_and_zero_dampening(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"nesterov.*momentum.*dampening"):
        LARS([torch.nn.Parameter(torch.ones(2))], nesterov=True, **bad)


@pytest.mark.parametrize("name,value", [("eps", 0.0), ("trust_coefficient", 0.0),
                                        ("lr", -0.1), ("weight_decay", -0.1),
                                        ("momentum", -0.1), ("dampening", 1.5)])
def test_out_of_range_hyperparameter_is_refused_by_name(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"invalid {name}={value}"):
        LARS([torch.nn.Parameter(torch.ones(2))], **{name: value})


def test_auto_is_foreach() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = LARS([p])
    assert opt.resolve_impl(opt.param_groups[0], [p]) == "foreach"


def test_bfloat16_params_keep_float32_momentum() -> None:
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = LARS(params)
    params[0].grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16
