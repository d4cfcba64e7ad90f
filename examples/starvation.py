"""Adagrad's learning-rate starvation (failure mode F1), detected and repaired by the guard.

A long, dense least-squares problem: 64 features mixed by a random rotation, half
of the directions 20x flatter than the others, and a start far from the
solution. The first gradients are ~100x the later ones; Adagrad's sums keep them
forever, so its effective learning rate ``lr / sqrt(sum)`` freezes ~40x below
``lr`` and the flat directions crawl: the loss plateaus early.

Two runs from the same start, each with a flight recorder:

* **unguarded**: ``optimizer.step()``;
* **guarded**: ``guard.step(loss)`` with the starvation detector set to
  ``reset_accumulators``. It measures the relative update size ``||dw|| / ||w||``
  every 10 steps on a sample of coordinates; when every update of its window
  (200 steps) is below ``max_update_ratio`` and the loss improved by less than
  ``min_improvement`` over the window, Adagrad's sums go back to their initial
  value and the loss keeps falling.

Printed: the loss and the recorder's median effective learning rate of both
runs, and the guard's audit record. Runs in a few seconds on a CPU:
``.venv/bin/python examples/starvation.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import gradguard.optim as go
from gradguard.guard import Guard
from gradguard.watch import JsonlSink, Recorder, read_jsonl

STEPS = 3000
LR = 0.5
POLICY = {"detectors": {"starvation": {
    "window": 200, "every": 10, "max_update_ratio": 3e-4, "min_improvement": 0.05,
    "action": "reset_accumulators"}}}


def problem(d: int = 64, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    scales = torch.cat([torch.ones(d // 2), torch.full((d // 2,), 0.05)])
    x = (torch.randn(n, d, generator=gen) * scales) @ rotation.T
    return x, x @ (10 * torch.randn(d, generator=gen))


def train(guarded: bool, workdir: Path) -> tuple[list[float], list[dict], Guard | None]:
    x, y = problem()
    w = torch.nn.Parameter(torch.zeros(x.shape[1]))
    optimizer = go.Adagrad([w], lr=LR)
    path = workdir / ("guarded.jsonl" if guarded else "unguarded.jsonl")
    recorder = Recorder(optimizer, [JsonlSink(path)], every=10, full_every=None)
    guard = Guard(optimizer, POLICY, recorder=recorder,
                  audit=workdir / "guard.jsonl") if guarded else None
    losses = []
    for _ in range(STEPS):
        loss = (x @ w - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            optimizer.step()
        losses.append(loss.item())
    recorder.close()
    return losses, read_jsonl(path), guard


def effective_lr(records: list[dict], step: int) -> float:
    return next(r["metrics"]["effective_lr"]["p50"] for r in records
                if r["step"] == step and "effective_lr" in r["metrics"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        plain, plain_records, _ = train(False, workdir)
        guarded, records, guard = train(True, workdir)
    assert guard is not None
    print(f"Adagrad(lr={LR}) on a dense least-squares problem, {STEPS} steps\n")
    print(f"{'step':>6} | {'unguarded loss':>14} {'effective lr':>12} | "
          f"{'guarded loss':>14} {'effective lr':>12}")
    for step in (10, 250, 500, 750, 1000, 1500, 2000, 2500, 3000):
        print(f"{step:>6} | {plain[step - 1]:>14.4g} {effective_lr(plain_records, step):>12.3g} | "
              f"{guarded[step - 1]:>14.4g} {effective_lr(records, step):>12.3g}")
    print()
    for record in guard.audit.records:
        evidence = record["evidence"]
        print(f"guard, step {record['step']}: {record['detector']} -> {record['action']} "
              f"({record['outcome']})\n  {record['message']}\n"
              f"  effective lr (||dw||/||g||) {evidence['effective_lr_first']:.3g} -> "
              f"{evidence['effective_lr_last']:.3g}; reset keys: {evidence['keys']}")
    print(f"\nfinal loss: unguarded {plain[-1]:.4g}, guarded {guarded[-1]:.4g} "
          f"({plain[-1] / guarded[-1]:.0f}x lower)")


if __name__ == "__main__":
    main()
