"""The callbacks under fp16 loss scaling on CUDA (skipped without a CUDA device).

fp16 AMP needs CUDA: Lightning's ``precision="16-mixed"`` and the Trainer's
``fp16=True`` put a GradScaler between the backward pass and the optimizer. The
guard must judge the *unscaled* gradients and the true loss, and a NaN it finds
must not be applied; accelerate swaps the optimizer's ``step`` during each
scaled step, which the Trainer callback must survive.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (fp16 loss scaling)", allow_module_level=True)

pytest.importorskip("lightning")
pytest.importorskip("transformers")

import lightning as L

import gradguard.optim as go
from gradguard.guard import Guard
from gradguard.integrations.lightning import GradguardCallback
from gradguard.watch import JsonlSink, Recorder, read_jsonl

from . import test_lightning as tl
from . import test_transformers as tt


def test_lightning_16_mixed(tmp_path: Path) -> None:
    module = tl.Regression(poisoned=(6,))
    cb = GradguardCallback(
        recorder=lambda opt, m: Recorder(opt, [JsonlSink(tmp_path / "w.jsonl")], every=4),
        guard=lambda opt, m: Guard(opt, audit=tmp_path / "guard.jsonl"))
    trainer = L.Trainer(max_epochs=2, accelerator="gpu", devices=1, precision="16-mixed",
                        callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, tl.data())
    assert module.unchanged == [True]
    assert cb.guard is not None
    records = cb.guard.audit.records
    assert [(r["step"], r["detector"], r["action"]) for r in records] == [
        (7, "nonfinite", "skip")]
    rows = [r["metrics"] for r in read_jsonl(tmp_path / "w.jsonl") if r["group"] == "all"]
    norms = [m["grad_norm"] for m in rows if "grad_norm" in m]
    assert len(norms) == 2 * tl.BATCHES
    # unscaled gradients: a scaled norm would be ~65536 times larger
    assert all(n < 100 for i, n in enumerate(norms) if i != 6)
    losses = [m["loss"] for m in rows if "loss" in m]
    assert losses == pytest.approx(module.losses, rel=1e-3)


def test_trainer_fp16(tmp_path: Path) -> None:
    model = tt.tiny_gpt2().cuda()
    optimizer = go.AdamW(model.parameters(), lr=1e-3)
    recorder = Recorder(optimizer, every=None, full_every=None)
    guard = Guard(optimizer, recorder=recorder)
    injector = tt.Poison((4,))
    args = tt.arguments(tmp_path, max_steps=12, use_cpu=False, fp16=True, max_grad_norm=1.0,
                        save_steps=100)
    from transformers import Trainer

    from gradguard.integrations.transformers import GradguardTrainerCallback

    cb = GradguardTrainerCallback(recorder=recorder, guard=guard)
    trainer = Trainer(model=model, args=args, train_dataset=tt.Tokens(),
                      optimizers=(optimizer, None), callbacks=[injector, cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert injector.unchanged == [True]
    assert guard.counts.get("skip") == 1
    # the scaler may skip overflowing steps itself; every other step reached the guard
    assert 0 < guard.step_count <= trainer.state.global_step
    history = [h for h in trainer.state.log_history if "gradguard/grad_norm" in h]
    assert history and all(math.isnan(h["gradguard/grad_norm"])
                           or h["gradguard/grad_norm"] < 1e3 for h in history)
    assert "step" not in optimizer.__dict__
