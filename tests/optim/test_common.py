"""Behaviour every registered optimizer shares: the torch.optim contract and validation.

Parametrised over the registry, so an optimizer added to it is held to all of
this without further work. The valid ranges below are written from the papers
and torch's documentation, not read from the code under test.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradguard.optim as go
from tests.optim.harness import GradientStream, lockstep, make_params

NAMES = go.available()

EXPECTED = {"adadelta", "adagrad", "adam", "adamax", "adamw", "ftrl", "lars", "lion", "nadam",
            "rmsprop", "rowwise_adagrad", "sgd"}

unit = st.floats(0.0, 0.999)
small = st.floats(0.0, 0.1)
positive_eps = st.floats(1e-10, 1e-2)
lr = st.floats(0.0, 1.0)

# name -> (strategy of valid hyperparameters, list of (name, invalid value))
SPECS: dict[str, tuple[Any, list[tuple[str, Any]]]] = {
    "sgd": (st.fixed_dictionaries({"lr": lr, "momentum": unit, "dampening": unit,
                                   "weight_decay": small, "maximize": st.booleans()}),
            [("lr", -0.1), ("lr", math.nan), ("momentum", -0.5), ("weight_decay", -1.0),
             ("dampening", math.inf)]),
    "adagrad": (st.fixed_dictionaries({"lr": lr, "lr_decay": small, "weight_decay": small,
                                       "initial_accumulator_value": small, "eps": positive_eps,
                                       "maximize": st.booleans()}),
                [("lr", -1.0), ("lr_decay", -0.1), ("eps", 0.0), ("eps", -1e-8),
                 ("initial_accumulator_value", -0.1), ("weight_decay", math.nan)]),
    "rowwise_adagrad": (st.fixed_dictionaries({"lr": lr, "eps": positive_eps,
                                               "weight_decay": small,
                                               "weight_decay_mode": st.sampled_from(
                                                   ["none", "l2", "decoupled"]),
                                               "initial_accumulator_value": small,
                                               "maximize": st.booleans()}),
                        [("lr", -1.0), ("eps", 0.0), ("weight_decay", -0.1),
                         ("weight_decay_mode", "L2"), ("initial_accumulator_value", -1.0)]),
    "rmsprop": (st.fixed_dictionaries({"lr": lr, "alpha": unit, "eps": positive_eps,
                                       "weight_decay": small, "momentum": unit,
                                       "centered": st.booleans(), "maximize": st.booleans()}),
                [("lr", -0.01), ("alpha", -0.1), ("eps", 0.0), ("momentum", -0.1),
                 ("weight_decay", -0.1)]),
    "adadelta": (st.fixed_dictionaries({"lr": lr, "rho": unit, "eps": positive_eps,
                                        "weight_decay": small, "maximize": st.booleans()}),
                 [("lr", -1.0), ("rho", 1.5), ("rho", -0.1), ("eps", 0.0),
                  ("weight_decay", -1.0)]),
    "adam": (st.fixed_dictionaries({"lr": lr, "betas": st.tuples(unit, unit),
                                    "eps": positive_eps, "weight_decay": small,
                                    "amsgrad": st.booleans(), "maximize": st.booleans(),
                                    "decoupled_weight_decay": st.booleans()}),
             [("lr", -1e-3), ("betas", (1.0, 0.9)), ("betas", (0.9, -0.1)), ("eps", 0.0),
              ("weight_decay", -0.1), ("lr", math.inf)]),
    "adamw": (st.fixed_dictionaries({"lr": lr, "betas": st.tuples(unit, unit),
                                     "eps": positive_eps, "weight_decay": small,
                                     "amsgrad": st.booleans(), "maximize": st.booleans()}),
              [("lr", -1e-3), ("betas", (0.9, 1.0)), ("eps", -1.0), ("weight_decay", -0.1)]),
    "adamax": (st.fixed_dictionaries({"lr": lr, "betas": st.tuples(unit, unit),
                                      "eps": positive_eps, "weight_decay": small,
                                      "maximize": st.booleans()}),
               [("lr", -1.0), ("betas", (1.2, 0.9)), ("eps", 0.0), ("weight_decay", -0.1)]),
    "nadam": (st.fixed_dictionaries({"lr": lr, "betas": st.tuples(unit, unit),
                                     "eps": positive_eps, "weight_decay": small,
                                     "momentum_decay": small,
                                     "decoupled_weight_decay": st.booleans(),
                                     "maximize": st.booleans()}),
              [("lr", -1.0), ("betas", (0.9, 1.0)), ("eps", 0.0), ("momentum_decay", -0.1),
               ("weight_decay", -0.1)]),
    "lion": (st.fixed_dictionaries({"lr": lr, "betas": st.tuples(unit, unit),
                                    "weight_decay": small, "maximize": st.booleans()}),
             [("lr", -1e-4), ("betas", (1.0, 0.99)), ("betas", (0.9, -0.1)),
              ("weight_decay", -0.1)]),
    "lars": (st.fixed_dictionaries({"lr": lr, "momentum": unit, "weight_decay": small,
                                    "trust_coefficient": st.floats(1e-4, 1.0),
                                    "eps": positive_eps, "maximize": st.booleans()}),
             [("lr", -0.1), ("momentum", -0.9), ("weight_decay", -1.0),
              ("trust_coefficient", -0.001)]),
    "ftrl": (st.fixed_dictionaries({"lr": st.floats(1e-3, 1.0), "beta": st.floats(0.1, 2.0),
                                    "l1": small, "l2": small,
                                    "initial_accumulator_value": small,
                                    "maximize": st.booleans()}),
             [("lr", 0.0), ("lr", -0.1), ("l1", -0.1), ("l2", -1.0), ("beta", -1.0)]),
}


def test_registry_has_the_whole_family() -> None:
    assert set(NAMES) >= EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_optimizer_has_a_test_spec(name: str) -> None:
    assert name in SPECS, f"add {name!r} to SPECS in {__file__}"


@pytest.mark.parametrize("name", NAMES)
def test_every_impl_equals_reference(name: str) -> None:
    cls = go.registry.get(name)
    for impl in cls.supported_impls:
        ours, _, ref, _ = lockstep(lambda ps, impl=impl: go.create(name, ps, impl=impl),
                                   lambda ps: go.create(name, ps, impl="reference"), 50)
        for a, b in zip(ours, ref, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (name, impl)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_starts_with_a_one_line_summary(name: str) -> None:
    summary = go.registry.summary(name)
    assert summary and ":math:" not in summary and len(summary) < 100


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_hyperparameters_on_finite_inputs_give_finite_outputs(name: str,
                                                                     data: st.DataObject) -> None:
    hparams = data.draw(SPECS[name][0], label="hyperparameters")
    if name == "sgd" and data.draw(st.booleans(), label="nesterov") and hparams["momentum"] > 0:
        hparams.update(nesterov=True, dampening=0.0)
    params = [torch.nn.Parameter(torch.tensor(data.draw(st.lists(
        st.floats(-100, 100), min_size=1, max_size=6), label="param"), dtype=torch.float64))]
    opt = go.create(name, params, **hparams)
    for _ in range(4):
        grad = data.draw(st.lists(st.floats(-1e3, 1e3), min_size=len(params[0]),
                                  max_size=len(params[0])), label="grad")
        params[0].grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
    assert torch.isfinite(params[0]).all(), (hparams, params[0])
    for value in opt.state[params[0]].values():
        if torch.is_tensor(value):
            assert torch.isfinite(value).all(), (hparams, opt.state[params[0]])


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters_raise_value_error_naming_them(name: str) -> None:
    for key, value in SPECS[name][1]:
        with pytest.raises(ValueError, match=key):
            go.create(name, make_params(), **{key: value})


@pytest.mark.parametrize("name", NAMES)
def test_invalid_group_is_refused_and_not_added(name: str) -> None:
    params = make_params()
    opt = go.create(name, params[:2])
    key, value = SPECS[name][1][0]
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": params[2:], key: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_unknown_impl_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="impl"):
        go.create(name, make_params(), impl="turbo")


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_gradients_are_left_alone(name: str) -> None:
    params = make_params()
    opt = go.create(name, params)
    frozen = params[0].detach().clone()
    initial_state = {k: v.clone() for k, v in opt.state.get(params[0], {}).items()}
    for t in range(3):
        GradientStream(params, gaps=False).apply(params, t)
        params[0].grad = None
        opt.step()
    assert torch.equal(params[0], frozen)
    # no state, or (Adagrad, like torch, creates it eagerly) the state it started with
    state = opt.state.get(params[0], {})
    assert state.keys() == initial_state.keys()
    assert all(torch.equal(state[k], v) for k, v in initial_state.items())


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned(name: str) -> None:
    params = make_params()
    opt = go.create(name, params)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire(name: str) -> None:
    params = make_params()
    opt = go.create(name, params)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    GradientStream(params).apply(params, 0)
    opt.step()
    assert calls == ["pre", "post"]


SCHEDULERS = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("ExponentialLR", {"gamma": 0.9}),
    ("CosineAnnealingLR", {"T_max": 10}),
    ("LinearLR", {"start_factor": 0.1, "total_iters": 5}),
    ("LambdaLR", {"lr_lambda": lambda epoch: 1.0 / (epoch + 1)}),
    ("OneCycleLR", {"max_lr": 0.05, "total_steps": 12, "cycle_momentum": False}),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 3,
                  "cycle_momentum": False}),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scheduler,kwargs", SCHEDULERS, ids=[s for s, _ in SCHEDULERS])
def test_lr_schedulers_drive_every_group_as_on_torch_sgd(name: str, scheduler: str,
                                                         kwargs: dict[str, Any]) -> None:
    params = make_params()
    ours = go.create(name, [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}],
                     lr=0.01)
    theirs = torch.optim.SGD([{"params": make_params()[:2]},
                              {"params": make_params()[2:], "lr": 0.02}], lr=0.01)
    sched_ours = getattr(torch.optim.lr_scheduler, scheduler)(ours, **kwargs)
    sched_theirs = getattr(torch.optim.lr_scheduler, scheduler)(theirs, **kwargs)
    stream = GradientStream(params)
    for t in range(10):
        stream.apply(params, t)
        ours.step()
        theirs.step()
        sched_ours.step()
        sched_theirs.step()
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]


@pytest.mark.parametrize("name", NAMES)
def test_reduce_lr_on_plateau_cuts_the_learning_rate(name: str) -> None:
    opt = go.create(name, make_params(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    for _ in range(4):
        plateau.step(1.0)
    assert opt.param_groups[0]["lr"] < 0.1


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_unscales_and_skips_steps_with_inf(name: str) -> None:
    model = torch.nn.Linear(4, 1)
    opt = go.create(name, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    model.weight.grad[0, 0] = math.inf  # type: ignore[index]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() < 2.0**8

    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_parameters_keep_float32_state(name: str) -> None:
    params = [torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16)) for _ in range(2)]
    opt = go.create(name, params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(16, dtype=torch.bfloat16)
        opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype in (torch.float32, torch.float64), (key, value.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_then_identical_steps(name: str) -> None:
    params, opt, _, _ = lockstep(lambda ps: go.create(name, ps),
                                 lambda ps: go.create(name, ps), 10)
    copy_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = go.create(name, copy_params)
    restored.load_state_dict(opt.state_dict())
    stream = GradientStream(params, seed=3)
    for t in range(10):
        stream.apply(params, t)
        stream.apply(copy_params, t)
        opt.step()
        restored.step()
    assert all(torch.equal(a, b) for a, b in zip(params, copy_params, strict=True))


def test_unknown_optimizer_name_suggests_the_nearest() -> None:
    with pytest.raises(ValueError, match=r"did you mean .*'adam'"):
        go.create("adma", make_params())


def test_unknown_hyperparameter_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"no hyperparameter 'betas1'.*allowed: lr"):
        go.create("adam", make_params(), betas1=0.9)


def test_names_are_case_insensitive() -> None:
    assert isinstance(go.create("AdamW", make_params()), go.AdamW)
