"""gradguard quickstart: the optimizer family as drop-ins for torch.optim.

Trains the same small MLP on a synthetic two-spirals problem with several
gradguard optimizers (built by name from the registry), prints loss and
accuracy per optimizer, then shows that a gradguard state dict loads into
torch.optim and back. Runs in a few seconds on a CPU: ``make demo``.
"""

from __future__ import annotations

import math
import time

import torch

import gradguard
import gradguard.optim as go


def two_spirals(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=gen)
    sign = label * 2 - 1
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 10
    return x + 0.02 * torch.randn(n, 2, generator=gen), label


def train(name: str, hparams: dict[str, float], steps: int = 600) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    opt = go.create(name, model.parameters(), **hparams)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x, y = two_spirals(2048)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return loss.item(), accuracy, time.perf_counter() - start


def main() -> None:
    print(f"gradguard {gradguard.__version__}: optimizers {', '.join(go.available())}\n")
    runs = {
        "sgd": {"lr": 0.3, "momentum": 0.9},
        "adagrad": {"lr": 0.05},
        "rmsprop": {"lr": 3e-3},
        "adam": {"lr": 1e-2},
        "adamw": {"lr": 1e-2, "weight_decay": 1e-4},
        "lion": {"lr": 1e-3},
    }
    print(f"{'optimizer':<10} {'final loss':>10} {'accuracy':>9} {'seconds':>8}")
    for name, hparams in runs.items():
        if name not in go.available():
            continue
        loss, accuracy, seconds = train(name, hparams)
        print(f"{name:<10} {loss:10.4f} {accuracy:9.1%} {seconds:8.2f}")

    # Switching is free both ways: a gradguard state dict loads into torch.optim.
    model = torch.nn.Linear(2, 2)
    ours = go.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2)).sum().backward()
    ours.step()
    theirs = torch.optim.Adam(model.parameters(), lr=1e-3)
    theirs.load_state_dict(ours.state_dict())
    step = next(iter(theirs.state.values()))["step"]
    print(f"\ngradguard.optim.Adam state dict -> torch.optim.Adam: step={step.item():.0f}, "
          f"state keys {sorted(next(iter(theirs.state.values())))}")


if __name__ == "__main__":
    main()
