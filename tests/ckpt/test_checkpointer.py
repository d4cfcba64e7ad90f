"""Checkpointer: what a save captures, what restore checks and loads, latest(), the audit log."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import gradguard.optim as go
from gradguard.ckpt import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointInfo,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWarning,
    OptimizerConfigMismatchError,
)
from gradguard.ckpt.audit import read_audit
from tests.ckpt.helpers import flip_byte, same_state, state_copy, tiny_model, trained


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()


def test_restore_loads_model_optimizer_scheduler_and_returns_the_info(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = trained(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        _step(model, optimizer)
        scheduler.step()
    ckpt = Checkpointer(tmp_path)
    saved = ckpt.save(7, model=model, optimizer=optimizer, scheduler=scheduler,
                      extra={"note": "warmup done", "ids": (1, 2)}, metrics={"loss": 0.25},
                      data_position={"epoch": 2, "batch": 5}, config={"model": "tiny"})

    model2 = tiny_model(seed=1)
    optimizer2 = go.create("adamw", model2.parameters(), lr=0.01)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=2, gamma=0.5)
    info = ckpt.restore(model=model2, optimizer=optimizer2, scheduler=scheduler2)

    assert info == saved
    assert (info.step, info.extra, info.metrics) == (7, {"note": "warmup done", "ids": (1, 2)},
                                                     {"loss": 0.25})
    assert info.data_position == {"epoch": 2, "batch": 5} and info.config == {"model": "tiny"}
    assert info.path == str(tmp_path / "step-000000000007")
    assert same_state(model.state_dict(), model2.state_dict())
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            assert value.dtype == optimizer2.state[p2][key].dtype
            assert torch.equal(value, optimizer2.state[p2][key])


def test_step_counters_keep_their_dtype_and_full_precision(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = trained(model)
    first = next(iter(model.parameters()))
    optimizer.state[first]["step"] = torch.tensor(2.0**53 - 1, dtype=torch.float64)
    Checkpointer(tmp_path).save(1, model=model, optimizer=optimizer)
    model2 = tiny_model()
    optimizer2 = go.create("adamw", model2.parameters(), lr=0.01)
    Checkpointer(tmp_path).restore(model=model2, optimizer=optimizer2)
    steps = [optimizer2.state[p]["step"] for p in model2.parameters()]
    assert steps[0].dtype == torch.float64 and steps[0].item() == 2.0**53 - 1
    assert all(s.dtype == torch.float32 and s.item() == 3.0 for s in steps[1:])


def test_torch_optimizers_with_none_state_and_buffers_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(6, 3)).sum().backward()
    optimizer.step()
    Checkpointer(tmp_path).save(1, model=model, optimizer=optimizer)
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    Checkpointer(tmp_path).restore(model=model2, optimizer=optimizer2)
    assert same_state(model.state_dict(), model2.state_dict())
    assert model2[1].num_batches_tracked.dtype == torch.int64
    assert str(optimizer2.state_dict()) == str(optimizer.state_dict())


def test_rng_states_are_restored(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=tiny_model())
    expected = (random.random(), np.random.standard_normal(), torch.rand(1))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.restore(model=tiny_model())
    got = (random.random(), np.random.standard_normal(), torch.rand(1))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_rng_false_leaves_the_generators_alone(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=tiny_model())
    model = tiny_model()
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    ckpt.restore(model=model, rng=False)
    assert torch.equal(torch.rand(1), expected)


def test_grad_scaler_state_round_trips(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    scaler.step(optimizer)
    scaler.update(512.0)
    Checkpointer(tmp_path).save(1, model=model, scaler=scaler)
    scaler2 = torch.amp.GradScaler("cpu")
    Checkpointer(tmp_path).restore(model=tiny_model(), scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict()


def test_latest_is_none_for_an_empty_or_missing_root(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "nothing-yet").latest() is None
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        Checkpointer(tmp_path / "nothing-yet").restore(model=tiny_model())


def test_latest_is_the_newest_step_not_the_newest_write(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=None)
    for step in (10, 30, 20):
        ckpt.save(step, model=tiny_model(), metrics={"step": step})
    latest = ckpt.latest()
    assert isinstance(latest, CheckpointInfo) and latest.step == 30 and latest.metrics == {
        "step": 30}
    assert ckpt.steps() == [10, 20, 30]


def test_a_corrupt_newest_checkpoint_is_skipped_by_latest_with_a_warning(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=tiny_model())
    newest = ckpt.save(2, model=tiny_model())
    flip_byte(Path(newest.path) / "model.safetensors")
    with pytest.warns(CheckpointWarning, match="refusing checkpoint .*step-000000000002"):
        latest = ckpt.latest()
    assert latest is not None and latest.step == 1
    refused = [r for r in read_audit(tmp_path / "audit.jsonl") if r["event"] == "refused"]
    assert refused and "sha256" in refused[0]["problems"][0]


def test_restore_without_a_path_falls_back_to_the_previous_good_checkpoint(
        tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    good_model = tiny_model(seed=1)
    ckpt.save(1, model=good_model)
    bad = ckpt.save(2, model=tiny_model(seed=2))
    (Path(bad.path) / "model.safetensors").write_bytes(b"")
    model = tiny_model(seed=3)
    with pytest.warns(CheckpointWarning):
        info = ckpt.restore(model=model)
    assert info.step == 1 and same_state(model.state_dict(), good_model.state_dict())


def test_restoring_a_corrupt_checkpoint_by_path_offers_the_previous_good_one(
        tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=tiny_model())
    bad = ckpt.save(2, model=tiny_model())
    flip_byte(Path(bad.path) / "model.safetensors", offset=200)
    with pytest.raises(CheckpointCorruptError,
                       match=r"older checkpoint that verifies.*step 1") as err:
        ckpt.restore(model=tiny_model(), path=bad.path)
    assert err.value.fallback is not None and err.value.fallback.step == 1


def test_a_structure_mismatch_lists_every_difference_and_loads_nothing(tmp_path: Path) -> None:
    Checkpointer(tmp_path).save(1, model=tiny_model(outputs=3))
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5),
                                torch.nn.Linear(5, 2)).double()
    before = state_copy(other)
    with pytest.raises(CheckpointMismatchError) as err:
        Checkpointer(tmp_path).restore(model=other)
    text = str(err.value)
    assert "'3.weight' is in the model but not in the checkpoint" in text
    assert "'2.weight' has shape (3, 8) in the checkpoint, (5, 8) in the model" in text
    assert "'0.weight' has dtype float32 in the checkpoint, float64 in the model" in text
    assert len(err.value.differences) == 4 + 2 + 2  # dtype x4, shape x2, extra x2
    assert same_state(before, other.state_dict())


def test_a_checkpoint_key_missing_from_the_model_is_listed(tmp_path: Path) -> None:
    Checkpointer(tmp_path).save(1, model=torch.nn.Sequential(torch.nn.Linear(4, 8),
                                                            torch.nn.Linear(8, 2)))
    with pytest.raises(CheckpointMismatchError, match=r"'1\.bias' is in the checkpoint but not"):
        Checkpointer(tmp_path).restore(model=torch.nn.Sequential(torch.nn.Linear(4, 8)))


def test_optimizer_parameter_mismatch_is_listed(tmp_path: Path) -> None:
    model = tiny_model()
    Checkpointer(tmp_path).save(1, model=model, optimizer=trained(model))
    model2 = tiny_model()
    optimizer2 = go.create("adamw", list(model2.parameters())[:2], lr=0.01)
    with pytest.raises(CheckpointMismatchError, match=r"parameters per group are \[4\] in the "
                                                      r"checkpoint, \[2\] now"):
        Checkpointer(tmp_path).restore(model=model2, optimizer=optimizer2)


def test_a_changed_optimizer_config_is_refused_naming_the_hyperparameter(tmp_path: Path) -> None:
    model = tiny_model()
    Checkpointer(tmp_path).save(1, model=model, optimizer=trained(model, weight_decay=0.01))
    model2 = tiny_model(seed=4)
    optimizer2 = go.create("adamw", model2.parameters(), lr=0.01, weight_decay=0.1)
    before = state_copy(model2)
    with pytest.raises(OptimizerConfigMismatchError,
                       match=r"weight_decay: checkpoint 0\.01, now 0\.1") as err:
        Checkpointer(tmp_path).restore(model=model2, optimizer=optimizer2)
    assert "allow_config_change=True" in str(err.value)
    assert same_state(before, model2.state_dict()) and not optimizer2.state


def test_allow_config_change_restores_state_keeps_the_new_values_and_audits(
        tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = trained(model, weight_decay=0.01)
    Checkpointer(tmp_path).save(1, model=model, optimizer=optimizer)
    model2 = tiny_model(seed=4)
    optimizer2 = go.create("adamw", model2.parameters(), lr=0.01, weight_decay=0.1)
    Checkpointer(tmp_path).restore(model=model2, optimizer=optimizer2, allow_config_change=True)
    assert optimizer2.param_groups[0]["weight_decay"] == 0.1
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    changes = [r for r in read_audit(tmp_path / "audit.jsonl") if r["event"] == "config_change"]
    assert changes and "weight_decay" in changes[0]["changes"][0]


def test_another_optimizer_class_is_a_config_change(tmp_path: Path) -> None:
    model = tiny_model()
    Checkpointer(tmp_path).save(1, model=model, optimizer=trained(model))
    with pytest.raises(OptimizerConfigMismatchError, match="optimizer class"):
        Checkpointer(tmp_path).restore(model=model,
                                       optimizer=torch.optim.AdamW(model.parameters()))


def test_scheduler_owned_values_are_not_config_changes(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for _ in range(4):
        _step(model, optimizer)
        scheduler.step()
    Checkpointer(tmp_path).save(4, model=model, optimizer=optimizer, scheduler=scheduler)
    model2 = tiny_model()
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    scheduler2 = torch.optim.lr_scheduler.OneCycleLR(optimizer2, max_lr=0.1, total_steps=10)
    assert optimizer2.param_groups[0]["betas"] != optimizer.param_groups[0]["betas"]
    Checkpointer(tmp_path).restore(model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert optimizer2.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, model=tiny_model(seed=1), extra="first")
    ckpt.save(5, model=tiny_model(seed=2), extra="second")
    latest = ckpt.latest()
    assert latest is not None and latest.extra == "second"
    assert sorted(os.listdir(tmp_path)) == ["audit.jsonl", "step-000000000005"]


def test_leftovers_of_interrupted_saves_are_invisible_and_cleaned_up(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=tiny_model())
    leftover = tmp_path / ".tmp-step-000000000002-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    info = ckpt.latest()
    assert info is not None and info.step == 1
    Checkpointer(tmp_path)
    assert not leftover.exists()
    assert [r["event"] for r in read_audit(tmp_path / "audit.jsonl")][-1] == "cleanup"


def test_every_save_restore_and_refusal_is_in_the_audit_log(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, model=tiny_model())
    info = ckpt.save(2, model=tiny_model())
    ckpt.restore(model=tiny_model())
    flip_byte(Path(info.path) / "model.safetensors")
    with pytest.raises(CheckpointCorruptError):
        ckpt.restore(model=tiny_model(), path=info.path)
    records = read_audit(tmp_path / "audit.jsonl")
    assert [r["event"] for r in records] == ["save", "save", "delete", "restore", "refused"]
    assert records[0]["step"] == 1 and records[0]["bytes"] > 0 and "pid" in records[0]
    assert records[2]["reason"] == "retention" and records[2]["step"] == 1


def test_invalid_arguments_are_refused_with_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last=0"):
        Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="mode='best'"):
        Checkpointer(tmp_path, keep_best=("loss", "best"))
    with pytest.raises(ValueError, match="step=-1"):
        Checkpointer(tmp_path).save(-1, model=tiny_model())
