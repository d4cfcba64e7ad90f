"""GradguardCallback on a real Lightning Trainer (CPU, a few dozen steps).

* metrics reach gradguard's JSONL and Lightning's CSVLogger;
* a NaN gradient injected before the optimizer step is skipped for real
  (parameters unchanged) and audited, in automatic and manual optimization;
* a run interrupted after two epochs and resumed from Lightning's checkpoint
  ends with the parameters, guard history and recorder count of the run that
  never stopped, bit for bit.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import gradguard.optim as go
from gradguard.guard import Guard, TrainingHalted, read_audit
from gradguard.integrations.lightning import GradguardCallback
from gradguard.watch import JsonlSink, Recorder, read_jsonl

from .helpers import poison, same, snapshot

torch.set_num_threads(1)

BATCHES = 8  # batches per epoch
POISONED = (5, 20)  # global steps (steps done before) whose gradients get a NaN


class Regression(L.LightningModule):
    """A small MLP; poisons the gradient at the global steps in ``poisoned``."""

    def __init__(self, poisoned: tuple[int, ...] = POISONED, manual: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))
        self.poisoned = poisoned
        self.manual = manual
        self.automatic_optimization = manual is None
        self.losses: list[float] = []
        self.unchanged: list[bool] = []
        self._before: list[torch.Tensor] | None = None
        self.gradguard: GradguardCallback | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        if self.manual is None:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self._maybe_poison()
        if self.manual == "guard.step":
            assert self.gradguard is not None and self.gradguard.guard is not None
            self.gradguard.guard.step(loss)
        else:
            opt.step()
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.automatic_optimization:
            self._maybe_poison()

    def _maybe_poison(self) -> None:
        # steps done before this one (a direct guard.step is not counted by Lightning)
        step = len(self.losses) - 1 if self.manual == "guard.step" else self.global_step
        self._before = None
        if step in self.poisoned:
            self._before = snapshot(self.parameters())
            poison(self.net[0].weight)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._before is not None:
            self.unchanged.append(same(self._before, self.parameters()))
            self._before = None

    def configure_optimizers(self) -> Any:
        optimizer = go.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 8, generator=g)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(BATCHES * 8, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def callback(root: Path) -> GradguardCallback:
    return GradguardCallback(
        recorder=lambda opt, module: Recorder(opt, [JsonlSink(root / "watch.jsonl")],
                                              every=4, full_every=8),
        guard=lambda opt, module: Guard(opt, audit=root / "guard.jsonl"))


def trainer(root: Path, max_epochs: int, cb: GradguardCallback, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=[cb, *kwargs.pop(
        "callbacks", [])], logger=CSVLogger(root / "logs", name="", version=""),
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs)


@dataclass
class Run:
    root: Path
    module: Regression
    cb: GradguardCallback
    trainer: L.Trainer


def fit(root: Path, max_epochs: int, ckpt_path: str | None = None, **kwargs: Any) -> Run:
    module = Regression()
    cb = callback(root)
    tr = trainer(root, max_epochs, cb, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and small data sets
        tr.fit(module, data(), ckpt_path=ckpt_path)
    return Run(root, module, cb, tr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """One uninterrupted run of 4 epochs; one stopped after 2 epochs and resumed to 4."""
    whole = fit(tmp_path_factory.mktemp("whole"), 4)
    root = tmp_path_factory.mktemp("resumed")
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
    first = fit(root, 2, callbacks=[saver])
    ckpt = root / "ckpt" / f"epoch=1-step={2 * BATCHES}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (root / "ckpt").iterdir())
    resumed = fit(root, 4, ckpt_path=str(ckpt))
    return {"whole": whole, "first": first, "resumed": resumed}


def test_nan_gradient_is_skipped_and_audited(runs: dict[str, Run]) -> None:
    run = runs["whole"]
    assert run.module.unchanged == [True, True]  # parameters untouched at both poisoned steps
    assert run.trainer.global_step == 4 * BATCHES
    guard, recorder = run.cb.guard, run.cb.recorder
    assert guard is not None and recorder is not None
    assert guard.counts == {"skip": 2}
    assert recorder.step == 4 * BATCHES - 2  # the recorder counts applied steps
    records = read_audit(run.root / "guard.jsonl")
    assert [(r["step"], r["detector"], r["action"], r["outcome"]) for r in records] == [
        (s + 1, "nonfinite", "skip", "skipped") for s in POISONED]
    assert records[0]["evidence"]["nonfinite_gradients"] == 1
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


def test_metrics_reach_jsonl_and_lightning_logger(runs: dict[str, Run]) -> None:
    run = runs["whole"]
    records = read_jsonl(run.root / "watch.jsonl")
    run_wide = [r for r in records if r["group"] == "all"]
    norms = [r["metrics"]["grad_norm"] for r in run_wide if "grad_norm" in r["metrics"]]
    assert len(norms) == 4 * BATCHES  # every guard step, the skipped ones too
    assert sum(math.isnan(n) for n in norms) == 2
    losses = [r["metrics"]["loss"] for r in run_wide if "loss" in r["metrics"]]
    assert losses == run.module.losses  # the loss of every step, as training_step computed it
    assert any("effective_lr" in r["metrics"] for r in records if r["group"] == "default")

    with open(run.root / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in ("gradguard/grad_norm", "gradguard/loss", "gradguard/guard_skip_total",
                 "gradguard/default/lr", "gradguard/default/effective_lr/p50",
                 "gradguard/default/accumulator_mean", "train_loss"):
        assert name in columns, name
    logged = [float(r["gradguard/grad_norm"]) for r in rows if r["gradguard/grad_norm"]]
    assert len(logged) == 4 * BATCHES
    assert sum(math.isnan(v) for v in logged) == 2
    skips = [float(r["gradguard/guard_skip_total"]) for r in rows
             if r["gradguard/guard_skip_total"]]
    assert skips == [1.0, 2.0]


def test_resume_from_lightning_checkpoint_is_bit_exact(runs: dict[str, Run]) -> None:
    whole, first, resumed = runs["whole"], runs["first"], runs["resumed"]
    assert first.trainer.global_step == 2 * BATCHES
    assert resumed.trainer.global_step == 4 * BATCHES
    assert same(resumed.module.parameters(), whole.module.parameters())  # atol 0
    assert resumed.module.unchanged == [True]  # the NaN after the resume is skipped too
    assert resumed.cb.guard is not None and whole.cb.guard is not None
    assert resumed.cb.guard.state_dict() == whole.cb.guard.state_dict()
    assert resumed.cb.recorder is not None and whole.cb.recorder is not None
    assert resumed.cb.recorder.step == whole.cb.recorder.step
    # the optimizer state went through Lightning's checkpoint and back
    a = resumed.trainer.optimizers[0].state_dict()
    b = whole.trainer.optimizers[0].state_dict()
    assert isinstance(resumed.trainer.optimizers[0], go.AdamW)
    for index, state in b["state"].items():
        for key, value in state.items():
            assert torch.equal(a["state"][index][key], value), (index, key)
    # the appended audit log and JSONL tell the same story as the uninterrupted run's
    assert ([r["step"] for r in read_audit(resumed.root / "guard.jsonl")]
            == [r["step"] for r in read_audit(whole.root / "guard.jsonl")])

    def series(root: Path) -> list[tuple[int, Any]]:
        return [(r["step"], r["metrics"].get("grad_norm"), r["metrics"].get("loss"))
                for r in read_jsonl(root / "watch.jsonl") if r["group"] == "all"
                and ("grad_norm" in r["metrics"] or "loss" in r["metrics"])]

    assert series(resumed.root) == series(whole.root)


@pytest.mark.parametrize("how", ["opt.step", "guard.step"])
def test_manual_optimization(tmp_path: Path, how: str) -> None:
    """Manual optimization: ``opt.step()`` is routed through the guard; ``guard.step(loss)``
    may be called directly. Without a recorder the guard's numbers still reach the logger."""
    module = Regression(poisoned=(3,), manual=how)
    cb = GradguardCallback(guard=lambda opt, m: Guard(opt))
    module.gradguard = cb
    tr = trainer(tmp_path, 1, cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(module, data())
    assert module.unchanged == [True]
    assert cb.guard is not None and cb.guard.counts == {"skip": 1}
    assert cb.guard.step_count == BATCHES
    # Lightning counts the steps taken through its optimizer wrapper only
    assert tr.global_step == (BATCHES if how == "opt.step" else 0)
    assert cb.guard.audit.records[0]["step"] == 4
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("gradguard/guard_skip_total") == "1.0" for r in rows)
    assert sum(1 for r in rows if r.get("gradguard/grad_norm")) >= 1
    # the optimizer's own step is back after fitting
    assert "step" not in tr.optimizers[0].__dict__ or hasattr(
        tr.optimizers[0].step, "_wrapped_by_lr_sched")
    assert "step" not in cb.guard.__dict__


def test_guard_and_recorder_instances(tmp_path: Path) -> None:
    """Instances built on the module's optimizer work as factories do; one built on another
    optimizer is refused with the reason."""

    class Owned(Regression):
        def __init__(self) -> None:
            super().__init__(poisoned=())
            self.optimizer = go.Adagrad(self.parameters(), lr=0.05)

        def configure_optimizers(self) -> Any:
            return self.optimizer

    module = Owned()
    with Recorder(module.optimizer, [JsonlSink(tmp_path / "w.jsonl")], every=2) as recorder:
        cb = GradguardCallback(recorder=recorder, guard=Guard(module.optimizer))
        tr = trainer(tmp_path, 1, cb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.fit(module, data())
        assert cb.guard is not None and cb.guard.recorder is recorder  # linked
        assert recorder.step == BATCHES
    norms = [r for r in read_jsonl(tmp_path / "w.jsonl") if "grad_norm" in r["metrics"]]
    assert len(norms) == BATCHES

    stranger = Guard(go.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    bad = trainer(tmp_path / "bad", 1, GradguardCallback(guard=stranger))
    with pytest.raises(ValueError, match="not one of the optimizers"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad.fit(Owned(), data())


def test_stop_halts_fit_and_detaches(tmp_path: Path) -> None:
    """A guard that stops raises TrainingHalted out of trainer.fit; the optimizer's own
    step is back afterwards."""
    module = Regression(poisoned=(3,))
    cb = GradguardCallback(guard=lambda opt, m: Guard(
        opt, {"detectors": {"nonfinite": {"action": "stop"}}}))
    tr = trainer(tmp_path, 1, cb)
    with pytest.raises(TrainingHalted, match="nonfinite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(module, data())
    assert module.unchanged == []  # halted inside the step, before the batch ended
    assert cb.guard is not None and cb.guard.step_count == 4
    optimizer = tr.optimizers[0]
    module.net[0].weight.grad = torch.ones_like(module.net[0].weight)
    optimizer.step()  # not routed any more: the guard does not see it
    assert cb.guard.step_count == 4
