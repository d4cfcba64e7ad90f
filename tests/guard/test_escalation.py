"""Acceptance: escalation to stop raises TrainingHalted with a readable diagnosis."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.guard import Guard, TrainingHalted
from tests.guard.helpers import all_finite, batches, loss_of, make_model


def poisoned_run(guard: Guard, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 bad_from: int, steps: int = 60,
                 ckpt: Checkpointer | None = None) -> list[int]:
    """Train; every batch from ``bad_from`` on has a NaN feature (a corrupt data shard)."""
    skipped = []
    for t, (x, y) in enumerate(batches(steps)):
        if t >= bad_from:
            x = x.clone()
            x[0, 0] = math.nan
        opt.zero_grad()
        loss = loss_of(model, (x, y))
        loss.backward()
        result = guard.step(loss)
        if not result.applied:
            skipped.append(result.step)
        if ckpt is not None:
            ckpt.maybe_save(guard.step_count, 5, model=model, optimizer=opt, blocking=True)
    return skipped


def test_repeated_skips_escalate_to_rollback_then_stop(tmp_path: Path) -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=None)
    guard = Guard(opt, checkpointer=ckpt, model=model, audit=tmp_path / "guard.jsonl")
    with pytest.raises(TrainingHalted) as caught:
        poisoned_run(guard, model, opt, bad_from=22, ckpt=ckpt)
    err = caught.value
    text = str(err)
    # three skips -> rollback, three times; the third rollback escalates to stop
    assert guard.counts["rollback"] == 3 and guard.counts["skip"] == 9
    assert guard.counts["stop"] == 1
    assert err.detector == "escalation" and err.evidence["rule_action"] == "rollback"
    assert err.evidence["last_detector"] == "nonfinite"
    assert text.startswith(f"Training halted by the gradguard guard at step {err.step}.")
    assert "3 x rollback so far (escalation rule: rollback x 3 -> stop)" in text
    assert "restored step 20" in text
    assert "What to try: look at the batches of the skipped steps" in text
    assert str(tmp_path / "guard.jsonl") in text
    assert all_finite(model, opt)
    assert guard.audit.records[-1]["action"] == "stop"
    assert guard.audit.records[-1]["diagnosis"] == text
    with pytest.raises(RuntimeError, match="halted"):
        guard.step(torch.tensor(1.0))


def test_without_a_checkpointer_rollbacks_are_unavailable_and_still_escalate() -> None:
    model = make_model()
    opt = go.Adagrad(model.parameters(), lr=1e-2)
    guard = Guard(opt)
    with pytest.raises(TrainingHalted) as caught:
        poisoned_run(guard, model, opt, bad_from=10)
    assert caught.value.step == 10 + 9  # 9 consecutive skips: 3 escalations to rollback
    outcomes = [r["outcome"] for r in guard.audit.records if r["action"] == "rollback"]
    assert outcomes == ["unavailable: no checkpointer"] * 3


def test_the_stop_action_halts_at_once() -> None:
    model = make_model()
    opt = go.SGD(model.parameters(), lr=1e-2)
    guard = Guard(opt, {"detectors": {"nonfinite": {"action": "stop"}}})
    with pytest.raises(TrainingHalted) as caught:
        poisoned_run(guard, model, opt, bad_from=3)
    assert caught.value.step == 4 and caught.value.detector == "nonfinite"
    assert "non-finite loss and gradient norm" in str(caught.value)


def test_windowed_escalation_counts_within_the_window() -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-2)
    policy = {"escalation": [{"action": "skip", "count": 2, "window": 5, "then": "lr_backoff"}],
              "actions": {"lr_backoff": {"factor": 0.1, "cooldown": 0}}}
    guard = Guard(opt, policy)
    for t, (x, y) in enumerate(batches(30)):
        if t in (3, 6, 15, 25):  # 3 and 6 are within 5 steps; the others are not
            x = x.clone()
            x[0, 0] = math.inf
        opt.zero_grad()
        loss = loss_of(model, (x, y))
        loss.backward()
        guard.step(loss)
    assert guard.counts == {"skip": 4, "lr_backoff": 1}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    record = next(r for r in guard.audit.records if r["action"] == "lr_backoff")
    assert record["step"] == 7 and record["evidence"]["lr_after"] == [pytest.approx(1e-3)]
