"""Acceptance: Adagrad starves on a long dense problem; the detector fires within its window
and reset_accumulators restores progress where the unguarded run stalls."""

from __future__ import annotations

from pathlib import Path

import torch

import gradguard.optim as go
from gradguard.guard import Guard
from gradguard.guard.detectors import relative_improvement
from gradguard.watch import JsonlSink, Recorder, read_jsonl

STEPS = 2000
WINDOW, EVERY, MAX_UPDATE_RATIO, MIN_IMPROVEMENT = 200, 10, 3e-4, 0.05
POLICY = {"detectors": {"starvation": {
    "window": WINDOW, "every": EVERY, "max_update_ratio": MAX_UPDATE_RATIO,
    "min_improvement": MIN_IMPROVEMENT, "action": "reset_accumulators"}}}


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares, 64 dense features mixed by a rotation: half of the directions 20x
    flatter than the others; the start is far from the solution, so the first gradients
    are ~100x the later ones and Adagrad's sums never forget them."""
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 1024
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    scales = torch.cat([torch.ones(d // 2), torch.full((d // 2,), 0.05)])
    x = (torch.randn(n, d, generator=gen) * scales) @ rotation.T
    return x, x @ (10 * torch.randn(d, generator=gen))


def train(guarded: bool, tmp_path: Path) -> tuple[list[float], list[float], Guard | None,
                                                   list[dict]]:
    x, y = problem()
    w = torch.nn.Parameter(torch.zeros(x.shape[1]))
    opt = go.Adagrad([w], lr=0.5)
    path = tmp_path / f"watch-{guarded}.jsonl"
    recorder = Recorder(opt, [JsonlSink(path, background=False)], every=EVERY, full_every=None)
    guard = Guard(opt, POLICY, recorder=recorder) if guarded else None
    losses, ratios = [], []
    for _ in range(STEPS):
        loss = (x @ w - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        before = w.detach().clone()
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
        losses.append(loss.item())
        ratios.append(float((w.detach() - before).norm() / before.norm().clamp_min(1e-30)))
    recorder.close()
    return losses, ratios, guard, read_jsonl(path)


def effective_lr_p50(records: list[dict], step: int) -> float:
    return next(r["metrics"]["effective_lr"]["p50"] for r in records
                if r["step"] == step and "effective_lr" in r["metrics"])


def test_starvation_is_detected_and_reset_accumulators_restores_progress(
        tmp_path: Path) -> None:
    plain_losses, plain_ratios, _, plain_records = train(False, tmp_path)
    losses, _, guard, records = train(True, tmp_path)
    assert guard is not None

    # the unguarded run starves: the recorder's effective lr is frozen ~40x below lr
    frozen = [effective_lr_p50(plain_records, s) for s in (500, 1000, 1500, 2000)]
    assert max(frozen) < 0.5 / 20 and max(frozen) / min(frozen) < 1.05
    assert relative_improvement(plain_losses[-WINDOW:]) < MIN_IMPROVEMENT

    # the detector fires once, within its window of the starvation's onset: the first step
    # whose trailing window (in the unguarded run) meets the detector's criteria
    onset = next(t for t in range(WINDOW, STEPS)
                 if max(plain_ratios[t - WINDOW:t]) < MAX_UPDATE_RATIO
                 and relative_improvement(plain_losses[t - WINDOW:t]) < MIN_IMPROVEMENT)
    fired = [r for r in guard.audit.records if r["detector"] == "starvation"]
    assert len(fired) == 1 and fired[0]["action"] == "reset_accumulators"
    assert fired[0]["outcome"] == "applied"
    assert onset - WINDOW <= fired[0]["step"] <= onset + WINDOW
    reset_at = fired[0]["step"]
    assert losses[:reset_at] == plain_losses[:reset_at]  # bit for bit until the reset

    # the reset restores progress: the effective lr jumps back, the loss keeps falling
    after = effective_lr_p50(records, (reset_at // EVERY + 5) * EVERY)
    assert after > 20 * effective_lr_p50(records, reset_at // EVERY * EVERY)
    assert losses[-1] < plain_losses[-1] / 100
    assert relative_improvement(losses[-WINDOW:]) > 5 * MIN_IMPROVEMENT
    assert guard.counts == {"reset_accumulators": 1}
