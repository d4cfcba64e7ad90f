"""State schemas: for every supported optimizer, each statistic equals an exact computation.

The optimizers run a few steps on small float64 tensors with a sample that
covers every tensor, so the recorder's sampled statistics must equal the exact
ones computed here from the optimizer's state with the documented formulas.
Cases are collected from torch.optim and from ``gradguard.optim.available()``
(so optimizers added to the registry are covered as soon as they exist).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import gradguard.optim
from gradguard.optim import registry
from gradguard.watch import GENERIC, Recorder, StateSchema, register_schema, schema_for
from gradguard.watch.schema import SCHEMAS

from .helpers import ListSink, assert_distribution_equal, exact_quantiles, make_params, set_grads

Reference = Callable[[dict[str, Any], dict[str, Any], Tensor, Tensor], Tensor]


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])


def _t(state: dict[str, Any]) -> float:
    return float(state["step"])


def ref_constant(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    return torch.full_like(w, _lr(group))


def ref_adagrad(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    clr = _lr(group) / (1 + (_t(state) - 1) * group["lr_decay"])
    return clr / (state["sum"].sqrt() + group["eps"])


def ref_rowwise_adagrad(group: dict[str, Any], state: dict[str, Any], w: Tensor,
                        g: Tensor) -> Tensor:
    per_row = state["sum"].reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)
    return _lr(group) / (per_row.sqrt() + group["eps"])


def ref_rmsprop(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    v = state["square_avg"]
    if group["centered"]:
        v = v - state["grad_avg"] ** 2
    return _lr(group) / (v.sqrt() + group["eps"])


def ref_adadelta(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    eps = group["eps"]
    return _lr(group) * torch.sqrt(state["acc_delta"] + eps) / torch.sqrt(state["square_avg"] + eps)


def ref_adam(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    beta1, beta2 = group["betas"]
    t = _t(state)
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return _lr(group) / (1 - beta1**t) / (torch.sqrt(v / (1 - beta2**t)) + group["eps"])


def ref_adamax(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    return _lr(group) / (1 - group["betas"][0] ** _t(state)) / state["exp_inf"]


def ref_lars(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    w_norm, g_norm = float(w.norm()), float(g.norm())
    ratio = 1.0
    if w_norm > 0 and g_norm > 0:
        ratio = group["trust_coefficient"] * w_norm / (
            g_norm + group["weight_decay"] * w_norm + group["eps"])
    return torch.full_like(w, _lr(group) * ratio)


def ref_ftrl(group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
    return _lr(group) / (group["beta"] + state["n"].sqrt())


# algorithm -> (effective lr reference, accumulator key, first-moment key): the specification.
SPEC: dict[str, tuple[Reference, str | None, str | None]] = {
    "SGD": (ref_constant, None, "momentum_buffer"),
    "Lion": (ref_constant, None, "exp_avg"),
    "LARS": (ref_lars, None, "momentum_buffer"),
    "Adagrad": (ref_adagrad, "sum", None),
    "RowWiseAdagrad": (ref_rowwise_adagrad, "sum", None),
    "RMSprop": (ref_rmsprop, "square_avg", "grad_avg"),
    "Adadelta": (ref_adadelta, "square_avg", None),
    "Adam": (ref_adam, "exp_avg_sq", "exp_avg"),
    "AdamW": (ref_adam, "exp_avg_sq", "exp_avg"),
    "NAdam": (ref_adam, "exp_avg_sq", "exp_avg"),
    "SparseAdam": (ref_adam, "exp_avg_sq", "exp_avg"),
    "Adamax": (ref_adamax, "exp_inf", "exp_avg"),
    "FTRL": (ref_ftrl, "n", "z"),
}

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

TORCH_CASES: dict[str, Factory] = {
    "torch-SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "torch-SGD-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "torch-Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.05,
                                                   initial_accumulator_value=0.1),
    "torch-RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "torch-RMSprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True,
                                                            momentum=0.5),
    "torch-Adadelta": lambda p: torch.optim.Adadelta(p, lr=0.5),
    "torch-Adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "torch-Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "torch-AdamW": lambda p: torch.optim.AdamW(p, lr=0.01),
    "torch-Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "torch-NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
}

# Variants worth checking wherever a gradguard optimizer has the hyperparameter.
_VARIANTS: dict[str, dict[str, Any]] = {
    "amsgrad": {"amsgrad": True},
    "centered": {"centered": True},
    "lr_decay": {"lr_decay": 0.05},
    "momentum": {"momentum": 0.9},
    "initial_accumulator_value": {"initial_accumulator_value": 0.1},
}


def _gradguard_factory(name: str, extra: dict[str, Any]) -> Factory:
    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        hparams = dict(extra)
        if "lr" in registry.hyperparameters(name):
            hparams.setdefault("lr", 0.05)
        return gradguard.optim.create(name, params, **hparams)
    return build


def _gradguard_cases() -> dict[str, Factory]:
    cases: dict[str, Factory] = {}
    for name in gradguard.optim.available():
        cases[f"gradguard-{name}"] = _gradguard_factory(name, {})
        accepted = registry.hyperparameters(name)
        for key, extra in _VARIANTS.items():
            if key in accepted:
                cases[f"gradguard-{name}-{key}"] = _gradguard_factory(name, extra)
    return cases


CASES: dict[str, Factory] = {**TORCH_CASES, **_gradguard_cases()}


def _spec_of(optimizer: torch.optim.Optimizer) -> tuple[str, tuple[Reference, str | None,
                                                                    str | None]] | None:
    for cls in type(optimizer).__mro__:
        if cls.__name__ in SPEC:
            return cls.__name__, SPEC[cls.__name__]
    return None


def _run(factory: Factory, steps: int = 3) -> tuple[torch.optim.Optimizer, list[Tensor],
                                                     list[Tensor], ListSink, Recorder]:
    """Run ``steps`` steps with a covering sample; return params before the last step."""
    params = make_params()
    optimizer = factory(params)
    sink = ListSink()
    recorder = Recorder(optimizer, [sink], every=1, full_every=1, sample_size=10_000)
    before: list[Tensor] = []
    for t in range(1, steps + 1):
        set_grads(params, t)
        before = [p.detach().clone() for p in params]
        optimizer.step()
    recorder.close()
    return optimizer, params, before, sink, recorder


@pytest.mark.parametrize("case", list(CASES))
def test_schema_statistics_equal_exact_computation(case: str) -> None:
    optimizer, params, before, sink, recorder = _run(CASES[case])
    record = sink.find(3)
    metrics = record.metrics
    group = optimizer.param_groups[0]
    states = [optimizer.state[p] for p in params]

    # exact reductions every optimizer gets
    assert metrics["param_norm"] == pytest.approx(
        math.sqrt(sum(float((p.detach() ** 2).sum()) for p in params)), rel=1e-12)
    assert metrics["grad_norm"] == pytest.approx(
        math.sqrt(sum(float((p.grad ** 2).sum()) for p in params)), rel=1e-12)
    assert metrics["nonfinite_params"] == 0
    assert metrics["nonfinite_gradients"] == 0
    assert metrics["nonfinite_state"] == 0
    assert metrics["state_bytes"] == sum(v.numel() * v.element_size() for s in states
                                         for v in s.values() if isinstance(v, Tensor))
    update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)])
    w_before = torch.cat([b.reshape(-1) for b in before])
    assert metrics["update_norm"] == pytest.approx(float(update.norm()), rel=1e-12)
    assert metrics["update_ratio"] == pytest.approx(float(update.norm() / w_before.norm()),
                                                    rel=1e-12)

    spec = _spec_of(optimizer)
    if spec is None:  # an optimizer without a schema yet: generic metrics only
        assert recorder.schema is GENERIC
        assert "effective_lr" not in metrics
        return
    name, (reference, accumulator, first_moment) = spec
    assert recorder.schema.name == name
    assert recorder.schema.accumulator == accumulator
    assert recorder.schema.first_moment == first_moment

    expected_lr = torch.cat([reference(group, s, b, p.grad).reshape(-1)
                             for s, b, p in zip(states, before, params, strict=True)])
    assert_distribution_equal(metrics["effective_lr"], exact_quantiles(expected_lr))
    np.testing.assert_allclose(np.sort(record.samples["effective_lr"].numpy()),
                               np.sort(expected_lr.numpy()), rtol=1e-12)

    if accumulator is None:
        assert "accumulator" not in metrics and "accumulator_mean" not in metrics
    else:
        acc = torch.cat([s[accumulator].reshape(-1) for s in states])
        # per coordinate: a row-wise accumulator stands for every coordinate of its row
        per_coordinate = torch.cat([
            s[accumulator].reshape(*s[accumulator].shape, *([1] * (p.dim() - s[accumulator].dim())))
            .expand_as(p).reshape(-1) for s, p in zip(states, params, strict=True)])
        assert_distribution_equal(metrics["accumulator"], exact_quantiles(per_coordinate))
        assert metrics["accumulator_mean"] == pytest.approx(float(acc.mean()), rel=1e-12)
        assert metrics["accumulator_max"] == float(acc.max())
        assert metrics["second_moment_norm"] == pytest.approx(float(acc.norm()), rel=1e-12)
    if first_moment is not None and all(first_moment in s for s in states):
        m = torch.cat([s[first_moment].reshape(-1) for s in states])
        assert metrics["first_moment_norm"] == pytest.approx(float(m.norm()), rel=1e-12)
    else:
        assert "first_moment_norm" not in metrics


def test_sparse_adam_statistics_equal_exact_computation() -> None:
    table = torch.nn.Parameter(torch.randn(10, 3, dtype=torch.float64))
    optimizer = torch.optim.SparseAdam([table], lr=0.01)
    sink = ListSink()
    recorder = Recorder(optimizer, [sink], every=1, full_every=1, sample_size=10_000)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        rows = torch.tensor([[1, 3, 3, 7]])
        values = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        table.grad = torch.sparse_coo_tensor(rows, values, (10, 3), check_invariants=True)
        optimizer.step()
    recorder.close()
    metrics = sink.find(3).metrics
    state = optimizer.state[table]
    assert recorder.schema.name == "SparseAdam"
    expected = ref_adam(optimizer.param_groups[0], state, table.detach(), table.grad)
    assert_distribution_equal(metrics["effective_lr"], exact_quantiles(expected))
    assert_distribution_equal(metrics["accumulator"], exact_quantiles(state["exp_avg_sq"]))
    dense_grad = table.grad.to_dense()
    assert metrics["grad_norm"] == pytest.approx(float(dense_grad.norm()), rel=1e-12)
    # the table received sparse gradients, so its rows are watched
    assert metrics["embedding_rows"] == 10
    assert metrics["embedding_rows_never_updated"] == 7  # rows 1, 3, 7 only


def test_every_supported_algorithm_has_a_schema() -> None:
    for name in ("SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam",
                 "SparseAdam", "Lion", "LARS", "FTRL"):
        assert SCHEMAS[name].name == name
    for cls in (torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta,
                torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                torch.optim.SparseAdam):
        assert schema_for(cls).name == cls.__name__


def test_lookup_follows_the_mro() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    assert schema_for(MyAdam).name == "Adam"
    assert schema_for(torch.optim.AdamW).name == "AdamW"  # a subclass of Adam in torch


def test_unknown_optimizer_gets_the_generic_schema() -> None:
    params = make_params()
    optimizer = torch.optim.Rprop(params)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=1, full_every=1) as recorder:
        set_grads(params, 1)
        optimizer.step()
    assert recorder.schema is GENERIC
    metrics = sink.find(1).metrics
    assert "effective_lr" not in metrics and "param_norm" in metrics and "update_ratio" in metrics


def test_registered_schema_is_used() -> None:
    class Scaled(torch.optim.SGD):
        pass

    register_schema("Scaled", StateSchema("Scaled", lambda c: 2 * float(c.group["lr"]),
                                          needs_state=False))
    try:
        params = make_params()
        optimizer = Scaled(params, lr=0.25)
        sink = ListSink()
        with Recorder(optimizer, [sink], every=1, full_every=None):
            set_grads(params, 1)
            optimizer.step()
        assert sink.find(1).metrics["effective_lr"]["p50"] == 0.5
    finally:
        del SCHEMAS["Scaled"]


def test_state_shaped_per_row_is_broadcast_to_the_row() -> None:
    """A row-wise accumulator (one value per row) maps onto every coordinate of its row."""

    class RowWise(torch.optim.Optimizer):
        def __init__(self, params: list[torch.nn.Parameter]) -> None:
            super().__init__(params, {"lr": 0.1, "eps": 1e-10, "lr_decay": 0.0})

        @torch.no_grad()
        def step(self, closure: Any = None) -> None:
            for p in self.param_groups[0]["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype)
                state["step"] += 1
                state["sum"] += p.grad.square().mean(1)

    register_schema("RowWise", StateSchema("RowWise", SCHEMAS["Adagrad"].effective_lr,
                                           accumulator="sum"))
    try:
        table = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
        optimizer = RowWise([table])
        sink = ListSink()
        with Recorder(optimizer, [sink], every=1, full_every=None):
            table.grad = torch.randn(6, 4, dtype=torch.float64)
            optimizer.step()
        row_sum = optimizer.state[table]["sum"]
        expected = (0.1 / (row_sum.sqrt() + 1e-10)).repeat_interleave(4)
        assert_distribution_equal(sink.find(1).metrics["effective_lr"], exact_quantiles(expected))
    finally:
        del SCHEMAS["RowWise"]
