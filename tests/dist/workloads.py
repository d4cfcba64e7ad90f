"""Workloads for the data-parallel tests: digits with faults injected on one rank.

Named in configs as ``tests.dist.workloads:digits`` / ``:sparse_ids``. Faults
come from environment variables (so a faulty run and its clean reference have
the same config), read when the workload is built:

* ``GG_TEST_NAN_LOSS="RANK:CALL"`` (or ``RANK:FIRST-LAST``): that rank's CALL-th
  training loss (1-based) is NaN while its gradients stay finite (a NaN on one
  rank's loss only);
* ``GG_TEST_PERTURB="RANK:CALL"``: before that rank's CALL-th loss, one
  parameter is moved outside the optimizer (replica drift);
* ``GG_TEST_KILL="RANK:CALL:MARKER"``: that rank SIGKILLs itself at its
  CALL-th loss, once (it creates MARKER first; a restart finds it and goes on);
* ``GG_TEST_SIGINT="RANK:CALL"``: that rank sends itself SIGINT (Ctrl-C) at its
  CALL-th loss.

Every model a process builds is kept in :data:`MODELS` (newest last), so a
test worker can read its replica's parameters after ``train()``.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch
from torch import nn

from gradguard.run.workload import Batch, Target, TensorData, Workload
from gradguard.run.workloads import seeded
from gradguard.run.workloads.digits import digits as builtin_digits

MODELS: list[nn.Module] = []


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fault(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if not value:
        return None
    parts = value.split(":")
    return parts if int(parts[0]) == _rank() else None


def digits(*, seed: int = 0, hidden: list[int] | None = None) -> Workload:
    """scikit-learn's digits (the built-in workload) with the faults above."""
    workload = builtin_digits(seed=seed, hidden=tuple(hidden) if hidden is not None else (128,))
    MODELS.append(workload.model)
    nan_loss, perturb, kill, interrupt = (
        _fault(n) for n in ("GG_TEST_NAN_LOSS", "GG_TEST_PERTURB", "GG_TEST_KILL",
                            "GG_TEST_SIGINT"))
    calls = [0]
    base = workload.loss

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        calls[0] += 1
        if kill is not None and calls[0] == int(kill[1]) and not Path(kill[2]).exists():
            Path(kill[2]).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if interrupt is not None and calls[0] == int(interrupt[1]):
            os.kill(os.getpid(), signal.SIGINT)
        if perturb is not None and calls[0] == int(perturb[1]):
            with torch.no_grad():
                next(iter(model.parameters())).add_(1e-3)
        value = base(model, batch)
        first, _, last = nan_loss[1].partition("-") if nan_loss is not None else ("0", "", "")
        if nan_loss is not None and int(first) <= calls[0] <= int(last or first):
            value = value + math.nan  # the loss only: the gradients stay finite
        return value

    workload.loss = loss
    return workload


class _Ids(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim, sparse=True)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(1)).squeeze(1)


def sparse_ids(*, seed: int = 0, rows: int = 200, dim: int = 8, n: int = 1024) -> Workload:
    """Regression on bags of ids through an ``nn.Embedding(sparse=True)``: sparse gradients."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (n, 4), generator=g)
    truth = torch.randn(rows, generator=g)
    y = truth[ids].mean(1)
    with seeded(seed):
        model = _Ids(rows, dim)
    MODELS.append(model)

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        x, t = batch
        return torch.nn.functional.mse_loss(m(x), t)

    def evaluate(m: nn.Module, batch: Batch) -> dict[str, float]:
        return {"mse": float(loss(m, batch))}

    split = n * 3 // 4
    return Workload(name="sparse_ids", model=model, train=TensorData((ids[:split], y[:split])),
                    eval=TensorData((ids[split:], y[split:])), loss=loss, evaluate=evaluate,
                    primary_metric="mse", mode="min", target=Target("mse", 0.0, "min"),
                    embeddings=["embedding.weight"])


__all__ = ["MODELS", "digits", "sparse_ids"]
