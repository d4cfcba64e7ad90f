"""Acceptance: a loss spike rolls back to the checkpoint exactly, skips batches, cuts the lr."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.guard import Guard, read_audit
from tests.guard.helpers import batches, loss_of, make_model, state_equal

POLICY = {"detectors": {"loss_spike": {"action": "rollback"}},
          "actions": {"rollback": {"skip_batches": 5, "lr_factor": 0.5}}}


def test_loss_spike_rolls_back_to_the_checkpoint_skips_batches_and_cuts_the_lr(
        tmp_path: Path) -> None:
    model = make_model()
    opt = go.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=None)
    guard = Guard(opt, POLICY, ckpt, model=model, scheduler=scheduler,
                  audit=tmp_path / "guard.jsonl")
    data = batches(80)
    spike_at = 36  # the 36th batch is poisoned: its targets are off by 1000x
    stream = iter(range(len(data)))
    results = []
    consumed = []
    for index in guard.batches(stream):
        x, y = data[index]
        if index == spike_at - 1:
            y = y * 1000
        consumed.append(index)
        opt.zero_grad()
        loss = loss_of(model, (x, y))
        loss.backward()
        result = guard.step(loss)
        results.append(result)
        scheduler.step()
        ckpt.maybe_save(guard.step_count, 10, model=model, optimizer=opt, scheduler=scheduler)
        if result.rolled_back_to is not None:
            rolled = result
            params_after = [p.detach().clone() for p in model.parameters()]
            state_after = copy.deepcopy(opt.state_dict())
        if len(consumed) == 50:
            break

    assert [r.rolled_back_to for r in results if r.rolled_back_to is not None] == [30]
    assert not rolled.applied and rolled.step == 30
    # parameters and optimizer state equal the checkpoint's, bit for bit
    saved_model = make_model(seed=99)
    saved_opt = go.AdamW(saved_model.parameters(), lr=1e-2)
    Checkpointer(tmp_path / "ckpt").restore(model=saved_model, optimizer=saved_opt,
                                            path="step-000000000030", rng=False)
    for a, b in zip(params_after, saved_model.parameters(), strict=True):
        assert torch.equal(a, b)
    saved_state = saved_opt.state_dict()
    assert state_equal(state_after["state"], saved_state["state"])
    # the lr cut: half the lr in effect before the rollback, kept by the scheduler too
    assert state_after["param_groups"][0]["lr"] == 0.5 * 1e-2
    assert opt.param_groups[0]["lr"] == 0.5 * 1e-2 and scheduler.base_lrs == [0.5 * 1e-2]
    # the next 5 batches of the stream were dropped, and logged one by one
    assert consumed[spike_at - 1] == spike_at - 1 and consumed[spike_at] == spike_at + 5
    records = read_audit(tmp_path / "guard.jsonl")
    rollback = [r for r in records if r["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["detector"] == "loss_spike"
    assert rollback[0]["step"] == spike_at and rollback[0]["outcome"] == "restored step 30"
    evidence = rollback[0]["evidence"]
    assert evidence["restored_step"] == 30 and evidence["skip_batches"] == 5
    assert evidence["lr_before"] == [1e-2] and evidence["lr_after"] == [0.5 * 1e-2]
    assert evidence["loss"] > evidence["threshold"]
    dropped = [r for r in records if r["action"] == "skip_batch"]
    assert [r["evidence"]["remaining"] for r in dropped] == [4, 3, 2, 1, 0]
    assert guard.counts["rollback"] == 1 and guard.counts["skip_batch"] == 5
    # training goes on from the checkpoint's step
    assert results[-1].step == 30 + (50 - spike_at) and results[-1].applied


def test_rollback_skips_checkpoints_that_do_not_verify(tmp_path: Path) -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=None)
    guard = Guard(opt, POLICY, ckpt, model=model)
    for t, batch in enumerate(batches(25)):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
        ckpt.maybe_save(t + 1, 10, model=model, optimizer=opt)
    ckpt.wait()
    weights = tmp_path / "ckpt" / "step-000000000020" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"XXXX")  # corrupt the newest
    x, y = batches(1)[0]
    opt.zero_grad()
    loss = loss_of(model, (x, y * 1000))
    loss.backward()
    result = guard.step(loss)
    assert result.rolled_back_to == 10


def test_rollback_without_a_checkpoint_is_logged_as_unavailable(tmp_path: Path) -> None:
    model = make_model()
    opt = go.Adam(model.parameters(), lr=1e-2)
    guard = Guard(opt, POLICY, Checkpointer(tmp_path / "empty"), model=model)
    for batch in batches(25):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        guard.step(loss)
    x, y = batches(1)[0]
    opt.zero_grad()
    loss = loss_of(model, (x, y * 1000))
    loss.backward()
    result = guard.step(loss)
    record = next(r for r in guard.audit.records if r["action"] == "rollback")
    assert record["outcome"].startswith("unavailable: no checkpoint at or before step 25")
    assert result.rolled_back_to is None and not result.applied  # not learnt from either


def test_a_guard_that_can_roll_back_needs_the_model(tmp_path: Path) -> None:
    opt = go.Adam(make_model().parameters())
    try:
        Guard(opt, checkpointer=Checkpointer(tmp_path / "c"))
    except ValueError as err:
        assert "model=" in str(err) and "escalation[0].then" in str(err)
    else:  # pragma: no cover
        raise AssertionError("no error")
