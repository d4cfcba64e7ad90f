"""Acceptance: non-finite values never reach parameters or state, each skip is logged,
and without injections the guarded run is the unguarded run, bit for bit."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

import gradguard.optim as go
from gradguard.guard import Guard, read_audit
from tests.guard.helpers import all_finite, batches, loss_of, make_model, optimizer, state_equal

NAMES = go.available()
STEPS = 40


def injection_plan(seed: int) -> dict[int, str]:
    """Random steps (never three in a row) and what to poison at each."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(2, STEPS), 8))
    kinds = ["grad_nan", "grad_inf", "loss_nan", "loss_inf", "batch_nan", "batch_inf"]
    plan = {}
    for s in steps:
        if s - 1 in plan and s - 2 in plan:
            continue
        plan[s] = rng.choice(kinds)
    return plan


def run(name: str, *, guarded: bool, plan: dict[int, str] | None = None, sync: bool = True,
        audit: Path | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer, Guard | None]:
    model = make_model()
    opt = optimizer(name, model)
    guard = Guard(opt, audit=audit, sync=sync) if guarded else None
    data = batches(STEPS)
    for t in range(STEPS):
        kind = (plan or {}).get(t, "")
        x, y = data[t]
        if kind.startswith("batch"):
            x = x.clone()
            x[3, 2] = math.nan if kind.endswith("nan") else math.inf
        opt.zero_grad()
        loss = loss_of(model, (x, y))
        loss.backward()
        if kind.startswith("grad"):
            p = next(iter(model.parameters()))
            assert p.grad is not None
            p.grad[0, 1] = math.nan if kind.endswith("nan") else -math.inf
        if kind.startswith("loss"):
            loss = loss.detach() * (math.nan if kind.endswith("nan") else math.inf)
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
    if guard is not None:
        guard.flush()
    return model, opt, guard


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "on-device"])
@pytest.mark.parametrize("name", NAMES)
def test_without_injection_the_guarded_run_is_the_unguarded_run(name: str, sync: bool) -> None:
    plain_model, plain_opt, _ = run(name, guarded=False)
    model, opt, guard = run(name, guarded=True, sync=sync)
    assert guard is not None
    assert guard.counts == {}, guard.audit.records
    for a, b in zip(plain_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert state_equal(plain_opt.state_dict()["state"], opt.state_dict()["state"])


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "on-device"])
@pytest.mark.parametrize("name", NAMES)
def test_injected_nan_and_inf_are_skipped_and_logged(name: str, sync: bool,
                                                     tmp_path: Path) -> None:
    plan = injection_plan(seed=sum(map(ord, name)))
    model, opt, guard = run(name, guarded=True, plan=plan, sync=sync,
                            audit=tmp_path / "guard.jsonl")
    assert guard is not None
    assert all_finite(model, opt)
    records = read_audit(tmp_path / "guard.jsonl")
    skipped = {r["step"] - 1: r for r in records if r["action"] == "skip"}  # steps are 1-based
    assert set(skipped) == set(plan), (plan, records)
    for step, record in skipped.items():
        assert record["detector"] == "nonfinite"
        assert record["outcome"].startswith("skipped")
        if plan[step].startswith("grad") or plan[step].startswith("batch"):
            assert record["evidence"]["grad_norm"] in ("NaN", "Infinity")
            if sync:  # counted on the host path only
                assert record["evidence"]["nonfinite_gradients"] >= 1
    assert guard.counts == {"skip": len(plan)}


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "on-device"])
def test_a_skipped_first_step_leaves_no_state(sync: bool) -> None:
    for name in ("sgd", "adam", "lars"):
        model = make_model()
        opt = optimizer(name, model)
        guard = Guard(opt, sync=sync)
        loss = loss_of(model, batches(1)[0])
        loss.backward()
        guard.step(loss * math.nan)
        guard.flush()
        for p in model.parameters():
            state = opt.state.get(p, {})
            assert all(v is None or not torch.is_tensor(v) or v.numel() == 1 or not v.any()
                       for v in state.values()), (name, state)
            assert all(bool(torch.isfinite(v).all()) for v in state.values()
                       if torch.is_tensor(v))
        # and the next, good step is the first step an unguarded optimizer takes
        reference_model = make_model()
        reference = optimizer(name, reference_model)
        for m, o, g in ((model, opt, guard), (reference_model, reference, None)):
            o.zero_grad()
            loss = loss_of(m, batches(1)[0])
            loss.backward()
            if g is not None:
                g.step(loss)
                g.flush()
            else:
                o.step()
        for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("fused", [True, False])
def test_torch_optimizers_are_guarded_too(fused: bool) -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), fused=fused, foreach=None if fused else True)
    for sync in (True, False):
        guard = Guard(opt, sync=sync)
        loss = loss_of(model, batches(1)[0])
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        next(iter(model.parameters())).grad[0, 0] = math.inf  # type: ignore[index]
        guard.step(loss)
        guard.flush()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert guard.counts == {"skip": 1}


def test_half_precision_parameters_stay_finite() -> None:
    model = make_model(dtype=torch.bfloat16)
    opt = go.Adam(model.parameters(), lr=1e-2)
    guard = Guard(opt)
    for t, batch in enumerate(batches(12, dtype=torch.bfloat16)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        if t % 4 == 1:
            next(iter(model.parameters())).grad.fill_(math.nan)  # type: ignore[union-attr]
        guard.step(loss)
    assert all_finite(model, opt)
    assert guard.counts == {"skip": 3}
