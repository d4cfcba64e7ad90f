"""GradguardTrainerCallback on a real Hugging Face Trainer with a tiny, randomly initialised
GPT-2 (no download; CPU, a few dozen steps).

* metrics reach gradguard's JSONL and the Trainer's ``log_history``;
* a NaN gradient injected before ``optimizer.step()`` is skipped for real
  (parameters unchanged) and audited;
* a run stopped after its step-12 checkpoint and resumed with
  ``train(resume_from_checkpoint=True)`` ends where the uninterrupted run ends,
  bit for bit (the Trainer restores the data position and RNG; the callback the
  guard's history and recorder count; the gradguard optimizer's state goes
  through ``optimizer.pt``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

import gradguard.optim as go
from gradguard.guard import Guard, TrainingHalted, read_audit
from gradguard.integrations.transformers import STATE_FILE, GradguardTrainerCallback
from gradguard.watch import JsonlSink, Recorder, read_jsonl

from .helpers import poison, same, snapshot

torch.set_num_threads(1)

STEPS = 24
POISONED = (5, 17)  # global steps (steps done before) whose gradients get a NaN


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(0, 100, (n, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Poison(TrainerCallback):
    """Puts a NaN into a gradient before the optimizer step at the given global steps;
    records whether the parameters stayed as they were; stops at ``stop``."""

    def __init__(self, at: tuple[int, ...], stop: int | None = None) -> None:
        self.at, self.stop = at, stop
        self.unchanged: list[bool] = []
        self._before: list[torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step in self.at:
            self._before = snapshot(kw["model"].parameters())
            poison(next(kw["model"].parameters()))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._before is not None:
            self.unchanged.append(same(self._before, kw["model"].parameters()))
            self._before = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.stop is not None and state.global_step == self.stop:
            control.should_training_stop = True


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        max_steps=STEPS, per_device_train_batch_size=4, save_steps=12, logging_steps=1,
        report_to="none", disable_tqdm=True, use_cpu=True, max_grad_norm=0.0, seed=0,
        dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)


@dataclass
class Run:
    out: Path
    model: GPT2LMHeadModel
    guard: Guard
    recorder: Recorder
    trainer: Trainer
    poison: Poison


def train(out: Path, stop: int | None = None, resume: bool = False) -> Run:
    model = tiny_gpt2()
    optimizer = go.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, STEPS)
    recorder = Recorder(optimizer, [JsonlSink(out / "watch.jsonl")], every=4, full_every=8)
    guard = Guard(optimizer, recorder=recorder, audit=out / "guard.jsonl")
    injector = Poison(POISONED, stop)
    trainer = Trainer(model=model, args=arguments(out), train_dataset=Tokens(),
                      optimizers=(optimizer, scheduler),
                      callbacks=[injector, GradguardTrainerCallback(recorder=recorder,
                                                                    guard=guard)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=True if resume else None)
    recorder.close()
    guard.close()
    return Run(out, model, guard, recorder, trainer, injector)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    whole = train(tmp_path_factory.mktemp("whole"))
    out = tmp_path_factory.mktemp("resumed")
    first = train(out, stop=12)
    resumed = train(out, resume=True)
    return {"whole": whole, "first": first, "resumed": resumed}


def test_nan_gradient_is_skipped_and_audited(runs: dict[str, Run]) -> None:
    run = runs["whole"]
    assert run.poison.unchanged == [True, True]
    assert run.trainer.state.global_step == STEPS
    assert run.guard.counts == {"skip": 2} and run.guard.step_count == STEPS
    assert run.recorder.step == STEPS - 2
    records = read_audit(run.out / "guard.jsonl")
    assert [(r["step"], r["detector"], r["action"]) for r in records] == [
        (s + 1, "nonfinite", "skip") for s in POISONED]
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_metrics_reach_jsonl_and_log_history(runs: dict[str, Run]) -> None:
    run = runs["whole"]
    history = [h for h in run.trainer.state.log_history if "loss" in h]
    assert len(history) == STEPS
    norms = [h["gradguard/grad_norm"] for h in history]
    assert sum(math.isnan(n) for n in norms) == 2
    assert all(math.isfinite(n) for i, n in enumerate(norms) if i not in POISONED)
    assert [h.get("gradguard/guard_skip_total") for h in history if
            "gradguard/guard_skip_total" in h] == [1.0, 2.0]
    assert all("gradguard/default/lr" in h for i, h in enumerate(history) if i not in POISONED)
    assert any("gradguard/default/effective_lr/p50" in h for h in history)
    # the loss the guard judged and the recorder logged is the Trainer's loss
    for h in history:
        assert h["gradguard/loss"] == pytest.approx(h["loss"], rel=1e-6)

    records = read_jsonl(run.out / "watch.jsonl")
    grads = [r for r in records if r["group"] == "all" and "grad_norm" in r["metrics"]]
    assert len(grads) == STEPS
    assert any(r["group"] == "default" and "accumulator" in r["metrics"] for r in records)


def test_resume_from_trainer_checkpoint_is_bit_exact(runs: dict[str, Run]) -> None:
    whole, first, resumed = runs["whole"], runs["first"], runs["resumed"]
    assert first.trainer.state.global_step == 12
    state = json.loads((first.out / "checkpoint-12" / STATE_FILE).read_text())
    assert state["guard"]["step"] == 12 and state["recorder"]["step"] == 11
    assert resumed.trainer.state.global_step == STEPS
    assert same(resumed.model.parameters(), whole.model.parameters())  # atol 0
    assert resumed.poison.unchanged == [True]
    assert resumed.guard.state_dict() == whole.guard.state_dict()
    assert resumed.recorder.step == whole.recorder.step
    assert ([r["step"] for r in read_audit(resumed.out / "guard.jsonl")]
            == [r["step"] for r in read_audit(whole.out / "guard.jsonl")])

    def series(out: Path) -> list[tuple[int, Any]]:
        return [(r["step"], r["metrics"].get("grad_norm"), r["metrics"].get("loss"))
                for r in read_jsonl(out / "watch.jsonl") if r["group"] == "all"
                and ("grad_norm" in r["metrics"] or "loss" in r["metrics"])]

    assert series(resumed.out) == series(whole.out)


def test_factories_with_the_trainers_own_optimizer(tmp_path: Path) -> None:
    """Factories get the optimizer the Trainer created (unwrapped from accelerate's
    wrapper); with gradient accumulation the guard judges each optimizer step once."""
    model = tiny_gpt2()
    callback = GradguardTrainerCallback(
        recorder=lambda opt, m: Recorder(opt, [JsonlSink(tmp_path / "w.jsonl")], every=None,
                                         full_every=None),
        guard=lambda opt, m: Guard(opt, {"clip_norm": 1.0}))
    args = arguments(tmp_path, max_steps=6, gradient_accumulation_steps=2, save_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert callback.guard is not None and callback.guard.step_count == 6
    assert callback.guard.optimizer is trainer.optimizer.optimizer  # accelerate's wrapper
    assert "step" not in callback.guard.optimizer.__dict__  # put back after training
    losses = [r["metrics"]["loss"] for r in read_jsonl(tmp_path / "w.jsonl")
              if "loss" in r["metrics"]]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


def test_stop_raises_out_of_train_and_detaches(tmp_path: Path) -> None:
    """The Trainer has no exception hook: a guard that stops detaches itself as
    TrainingHalted leaves trainer.train()."""
    model = tiny_gpt2()
    optimizer = go.SGD(model.parameters(), lr=0.1)
    guard = Guard(optimizer, {"detectors": {"nonfinite": {"action": "stop"}}})
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=6, save_steps=100),
                      train_dataset=Tokens(), optimizers=(optimizer, None),
                      callbacks=[Poison((2,)), GradguardTrainerCallback(guard=guard)])
    with pytest.raises(TrainingHalted, match="nonfinite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert guard.step_count == 3
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the optimizer's own step again: the guard does not see it
    assert guard.step_count == 3
