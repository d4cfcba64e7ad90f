"""Each action does what it says, and is logged."""

from __future__ import annotations

import logging
import math
from typing import cast

import pytest
import torch

import gradguard.optim as go
from gradguard.guard import ActionUnavailable, Guard, lr_backoff, reset_accumulators
from tests.guard.helpers import batches, loss_of, make_model, optimizer


def trained(name: str, steps: int = 5, **hparams: object
            ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = optimizer(name, model, **hparams)
    for batch in batches(steps):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", go.available())
def test_reset_accumulators_restores_the_initial_state(name: str) -> None:
    model, opt = trained(name)
    evidence = reset_accumulators(opt)
    assert evidence["tensors"] == len(list(model.parameters()))
    for p in model.parameters():
        state = opt.state[p]
        for key, value in state.items():
            if key == "step":
                expected = 0.0 if name in ("adam", "adamw", "nadam", "adamax") else 5.0
                assert float(value) == expected, (key, value)
            elif key in ("z",):
                continue  # FTRL: recomputed from the weights (next test)
            elif key == "sum":
                assert torch.equal(value, torch.zeros_like(value))  # initial_accumulator_value
            elif key == "mu_product":
                assert float(value) == 1.0
            elif isinstance(value, torch.Tensor):
                assert not value.any(), key
            else:
                assert value is None, key  # SGD/LARS momentum buffer: cleared


def test_reset_accumulators_scales_adagrad_sums_and_keeps_the_step() -> None:
    model, opt = trained("adagrad", initial_accumulator_value=0.1)
    sums = {p: opt.state[p]["sum"].clone() for p in model.parameters()}
    reset_accumulators(opt, scale=0.25)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["sum"], sums[p] * 0.25)
        assert float(opt.state[p]["step"]) == 5
    reset_accumulators(opt)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["sum"], torch.full_like(p, 0.1))


def test_reset_accumulators_keeps_ftrl_weights() -> None:
    model, opt = trained("ftrl", l1=0.01, l2=0.1)
    reset_accumulators(opt)
    # the closed form from (z, n) reproduces the weights: a zero gradient leaves them alone
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for before, p in zip(weights, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.Adagrad, torch.optim.SGD])
def test_reset_accumulators_knows_torch_optimizers(cls: type) -> None:
    model = make_model()
    opt = cls(model.parameters(), lr=0.01, **({"momentum": 0.9} if cls is torch.optim.SGD
                                              else {}))
    for batch in batches(3):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    reset_accumulators(opt)
    state = opt.state[next(iter(model.parameters()))]
    if cls is torch.optim.SGD:
        assert state["momentum_buffer"] is None
    else:
        assert not state["exp_avg" if cls is torch.optim.Adam else "sum"].any()


def test_reset_accumulators_refuses_unknown_optimizers() -> None:
    model = make_model()
    opt = torch.optim.Rprop(model.parameters())
    with pytest.raises(ActionUnavailable, match="does not know the state of Rprop"):
        reset_accumulators(opt)


def test_lr_backoff_respects_floor_and_moves_the_scheduler() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = go.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 1e-3}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    evidence = lr_backoff(opt, 0.5, floor=8e-4, scheduler=scheduler)
    assert evidence["lr_after"] == [0.05, 8e-4]
    assert scheduler.base_lrs == [pytest.approx(0.05), pytest.approx(8e-4)]
    opt.step()  # no gradients: nothing moves, but the scheduler sees the usual order
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.05), pytest.approx(8e-4)]


def test_lr_backoff_action_cools_down() -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=0.1)
    policy = {"detectors": {"nonfinite": {"action": "skip"}},
              "escalation": [{"action": "skip", "count": 1, "then": "lr_backoff"}],
              "actions": {"lr_backoff": {"factor": 0.5, "cooldown": 5}}}
    guard = Guard(opt, policy)
    for t, batch in enumerate(batches(12)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss * math.nan if t in (1, 2, 9) else loss)
    outcomes = [r["outcome"] for r in guard.audit.records if r["action"] == "lr_backoff"]
    assert outcomes == ["applied", "cooling down (next backoff possible at step 7)", "applied"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "on-device"])
@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd", "rmsprop"])
def test_clipping_matches_clip_grad_norm(name: str, sync: bool) -> None:
    models = [make_model(), make_model()]
    opts = [optimizer(name, m) for m in models]
    guard = Guard(opts[1], {"clip_norm": 0.05}, sync=sync)
    for batch in batches(10):
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            loss = loss_of(m, batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.05)
        opts[0].step()
        result = guard.step(loss)
        assert result.applied and (result.clipped or not sync)
    guard.flush()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    grads = [p.grad for p in models[1].parameters() if p.grad is not None]
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) <= 0.05 + 1e-6


def test_a_gradient_spike_can_be_clipped_instead_of_skipped() -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-3)
    guard = Guard(opt, {"detectors": {"grad_spike": {"action": "clip", "warmup": 10}}})
    for t, batch in enumerate(batches(30)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        (loss * (1000 if t == 25 else 1)).backward()
        result = guard.step(loss)
    spikes = [r for r in guard.audit.records if r["detector"] == "grad_spike"]
    assert len(spikes) == 1 and spikes[0]["action"] == "clip"
    assert spikes[0]["outcome"].startswith("clipped (gradients divided by ")
    assert result.applied and guard.counts == {"clip": 1}


def test_alert_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-3)
    guard = Guard(opt, {"detectors": {"loss_spike": {"action": "alert", "warmup": 10},
                                      "grad_spike": False}})
    with caplog.at_level(logging.WARNING, logger="gradguard.guard"):
        for t, batch in enumerate(batches(30)):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            result = guard.step(loss * (100 if t == 20 else 1))
            if t == 20:
                assert result.applied and result.actions == ("alert",)
    assert guard.counts == {"alert": 1}
    assert "guard step 21: loss_spike: loss" in caplog.text


def test_guard_state_round_trips() -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-3)
    guard = Guard(opt)
    for t, batch in enumerate(batches(30)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss * math.nan if t == 3 else loss)
    state = guard.state_dict()
    other = Guard(opt)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.step_count == 30 and other.counts == {"skip": 1}


def test_step_scaling_in_the_optimizer_base_divides_and_skips() -> None:
    for name in go.available():
        for impl in go.registry.get(name).supported_impls:
            models = [make_model(), make_model()]
            opts = [optimizer(name, m, impl=impl) for m in models]
            for t, batch in enumerate(batches(4)):
                for k, (m, o) in enumerate(zip(models, opts, strict=True)):
                    o.zero_grad()
                    (loss_of(m, batch) * (4 if k else 1)).backward()
                skip = t in (0, 2)
                cast(go.Optimizer, opts[1]).step(grad_scale=torch.tensor(4.0),
                                                 found_inf=torch.tensor(float(skip)))
                if not skip:
                    opts[0].step()
            for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {impl}")
            steps = [[float(v["step"]) for v in o.state_dict()["state"].values() if "step" in v]
                     for o in opts]
            assert steps[0] == steps[1], (name, impl)
