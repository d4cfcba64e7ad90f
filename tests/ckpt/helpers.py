"""Small models, optimizers and file surgery shared by the checkpoint tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

import gradguard.optim as go


def tiny_model(seed: int = 0, outputs: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, outputs))


def trained(model: torch.nn.Module, steps: int = 3, lr: float = 0.01,
            **hparams: object) -> torch.optim.Optimizer:
    """An AdamW over ``model`` after a few steps (so it has state)."""
    optimizer = go.create("adamw", model.parameters(), lr=lr, **hparams)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4, generator=gen)).square().mean().backward()
        optimizer.step()
    return optimizer


def snapshot_files(root: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file under ``root`` (to show nothing was overwritten)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name != "audit.jsonl":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def flip_byte(path: str | os.PathLike[str], offset: int = -1) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x01
    Path(path).write_bytes(bytes(data))
