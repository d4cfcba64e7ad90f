"""Small training problems shared by the guard tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

import gradguard.optim as go

HPARAMS: dict[str, dict[str, object]] = {"sgd": {"momentum": 0.9, "lr": 0.01},
                                         "lars": {"lr": 0.1}}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 1)).to(dtype)


def batches(steps: int, seed: int = 1, dtype: torch.dtype = torch.float32,
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        out.append((x.to(dtype), x.sum(1, keepdim=True).sin().to(dtype)))
    return out


def loss_of(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def optimizer(name: str, model: torch.nn.Module, **overrides: object) -> torch.optim.Optimizer:
    return go.create(name, model.parameters(), **{**HPARAMS.get(name, {}), **overrides})


def all_finite(model: torch.nn.Module, opt: torch.optim.Optimizer) -> bool:
    tensors: list[torch.Tensor] = list(model.parameters())
    tensors += [v for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def state_equal(a: dict, b: dict) -> bool:
    """Optimizer state dicts equal bit for bit (tensors by torch.equal)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not isinstance(y, dict) or not state_equal(x, y):
                return False
        elif isinstance(x, float) and math.isnan(x):
            if not (isinstance(y, float) and math.isnan(y)):
                return False
        elif x != y:
            return False
    return True


def train(steps: Iterable[int], model: torch.nn.Module, opt: torch.optim.Optimizer,
          data: list[tuple[torch.Tensor, torch.Tensor]],
          step: Callable[[torch.Tensor], object]) -> None:
    for t in steps:
        opt.zero_grad()
        loss = loss_of(model, data[t])
        loss.backward()
        step(loss)
