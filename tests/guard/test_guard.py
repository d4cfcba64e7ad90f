"""The guard loop: recorder integration, audit records, the on-device path, post-step checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import gradguard.optim as go
from gradguard.guard import Guard, gradient_sum_of_squares, read_audit
from gradguard.watch import JsonlSink, Recorder, read_jsonl
from tests.guard.helpers import batches, loss_of, make_model


def test_gradient_sum_of_squares_covers_every_kind_of_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(70_000, generator=gen), torch.randn(3, 5, generator=gen),
             torch.randn(40, 40, generator=gen).t(), torch.randn(8, generator=gen).half()]
    expected = sum(float(g.double().square().sum()) for g in grads)
    assert math.isclose(float(gradient_sum_of_squares(grads)), expected, rel_tol=1e-5)
    grads[0][5] = math.inf
    assert math.isinf(float(gradient_sum_of_squares(grads)))
    grads[2][1, 1] = math.nan
    assert math.isnan(float(gradient_sum_of_squares(grads)))


def test_the_recorder_gets_the_norm_every_step_and_counts_guard_actions(tmp_path: Path) -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-3)
    recorder = Recorder(opt, [JsonlSink(tmp_path / "watch.jsonl", background=False)],
                        every=None, full_every=None)
    guard = Guard(opt, recorder=recorder)
    for t, batch in enumerate(batches(10)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        if t == 4:
            next(iter(model.parameters())).grad[0, :3] = math.nan  # type: ignore[index]
        guard.step(loss)
    recorder.close()
    records = read_jsonl(tmp_path / "watch.jsonl")
    observed = [r for r in records if "grad_norm" in r["metrics"] and r["group"] == "all"]
    assert len(observed) == 10
    assert [r["metrics"]["nonfinite_gradients"] for r in observed] == [0] * 4 + [3] + [0] * 5
    assert math.isnan(observed[4]["metrics"]["grad_norm"])
    counted = [r["metrics"] for r in records
               if any(k.startswith("guard_") for k in r["metrics"])]
    assert counted and (counted[-1].get("guard_skip_total") == 1
                        or counted[-1].get("guard_actions_skip") == 1), counted
    assert recorder.step == 9  # the skipped step never reached the optimizer


def test_audit_records_are_strict_json_with_evidence(tmp_path: Path) -> None:
    model = make_model()
    opt = go.SGD(model.parameters(), lr=1e-2)
    guard = Guard(opt, audit=tmp_path / "audit" / "guard.jsonl")
    loss = loss_of(model, batches(1)[0])
    loss.backward()
    guard.step(loss * math.inf)
    guard.close()
    line = (tmp_path / "audit" / "guard.jsonl").read_text().splitlines()[0]
    record = json.loads(line)  # strict: no NaN/Infinity literals
    assert "Infinity" not in line.replace('"Infinity"', "")
    assert record["step"] == 1 and record["detector"] == "nonfinite"
    assert record["action"] == "skip" and record["outcome"] == "skipped"
    assert record["evidence"]["loss"] == "Infinity" and record["schema"] == 1
    assert {"time", "message", "pid", "host"} <= set(record)
    assert read_audit(tmp_path / "audit" / "guard.jsonl") == [record]


def spiky_run(sync: bool) -> tuple[Guard, list[torch.Tensor]]:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-2)
    guard = Guard(opt, {"clip_norm": 0.5, "detectors": {"loss_spike": {"warmup": 10}}},
                  sync=sync)
    for t, (x, y) in enumerate(batches(40)):
        opt.zero_grad()
        loss = loss_of(model, (x, y * (50 if t in (20, 30) else 1)))
        loss.backward()
        if t == 25:
            next(iter(model.parameters())).grad[0, 0] = math.nan  # type: ignore[index]
        guard.step(loss)
    guard.flush()
    return guard, [p.detach().clone() for p in model.parameters()]


def test_on_device_decisions_match_the_host_decisions() -> None:
    host, host_params = spiky_run(sync=True)
    device, device_params = spiky_run(sync=False)
    assert host.counts == device.counts == {"skip": 3}
    assert ([(r["step"], r["detector"]) for r in host.audit.records if r["action"] == "skip"]
            == [(r["step"], r["detector"]) for r in device.audit.records if r["action"] == "skip"])
    assert next(r["outcome"] for r in device.audit.records) == "skipped on the device"
    for a, b in zip(host_params, device_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_divergence_acts_on_a_sustained_rise() -> None:
    model = make_model()
    opt = go.SGD(model.parameters(), lr=1e-3)
    guard = Guard(opt, {"detectors": {"divergence": {"window": 10, "every": 5, "rise": 0.5,
                                                     "action": "lr_backoff"},
                                      "loss_spike": False, "grad_spike": False}})
    for t, batch in enumerate(batches(60)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss.detach() * (1 if t < 30 else 1 + 0.2 * (t - 30)))
    fired = [r for r in guard.audit.records if r["detector"] == "divergence"]
    assert len(fired) >= 1 and fired[0]["action"] == "lr_backoff"
    assert 30 < fired[0]["step"] <= 45
    assert opt.param_groups[0]["lr"] < 1e-3


def test_plateau_and_overfitting_watch_the_evaluations() -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-3)
    guard = Guard(opt, {"detectors": {"plateau": {"patience": 3},
                                      "overfitting": {"patience": 3}}})
    evals = [1.0, 0.8, 0.7, 0.72, 0.75, 0.8]
    for e, value in enumerate(evals):
        for batch in batches(10, seed=e):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            guard.step(loss)
        guard.observe_eval(value)
    detectors = [r["detector"] for r in guard.audit.records]
    assert "plateau" in detectors and "overfitting" in detectors
    assert all(r["action"] == "alert" for r in guard.audit.records)


def test_a_plateau_is_reported_once_per_patience_not_at_every_evaluation() -> None:
    opt = go.Adam(make_model().parameters(), lr=1e-3)
    guard = Guard(opt, {"detectors": {"plateau": {"patience": 3}, "overfitting": False}})
    for value in [1.0] + [2.0] * 9:          # no improvement after the first evaluation
        guard.observe_eval(value)
    fired = [r["step"] for r in guard.audit.records if r["detector"] == "plateau"]
    assert len(fired) == 3                   # evaluations 4, 7 and 10, not 4 to 10


def test_accumulator_risk_watches_half_precision_state() -> None:
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    opt = go.Adagrad([p], lr=1e-2, state_dtype=torch.float16)
    guard = Guard(opt, {"detectors": {"accumulator_risk": {"every": 5}, "grad_spike": False}})
    for _ in range(10):
        p.grad = torch.full_like(p, 30.0)  # each step adds 900 to a float16 sum
        guard.step(1.0)
    found = [r for r in guard.audit.records if r["detector"] == "accumulator_risk"]
    assert found and "group0.sum (float16) reaches" in found[0]["message"]


def test_a_step_without_a_loss_still_guards_the_gradients() -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-3)
    guard = Guard(opt)
    loss_of(model, batches(1)[0]).backward()
    next(iter(model.parameters())).grad[0, 0] = math.inf  # type: ignore[index]
    result = guard.step()
    assert not result.applied and result.loss is None and guard.counts == {"skip": 1}


def test_closure_optimizers_get_their_closure() -> None:
    model = make_model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    guard = Guard(opt)
    x, y = batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, (x, y))
        loss.backward()
        return loss

    first = closure()
    for _ in range(5):
        guard.step(closure(), closure)
    assert float(loss_of(model, (x, y)).detach()) < float(first.detach())
    next(iter(model.parameters())).grad[0, 0] = math.nan  # type: ignore[index]
    assert not guard.step(first.detach(), closure).applied
