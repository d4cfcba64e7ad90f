"""Training runs for the bit-exact resume test, run as subprocesses.

``python -m tests.ckpt.resume_worker first ROOT OUT SPEC...`` runs, for each
optimizer SPEC (``gradguard:adamw``, ``torch:SGD``…), a full run of STEPS steps
and a first half that ends in a checkpoint under ROOT/<spec>.
``python -m tests.ckpt.resume_worker second ROOT OUT SPEC...`` (a new process)
builds everything afresh with other seeds, restores, and runs the second half.
Both write the final parameters and optimizer state to OUT/<spec>-<run>.*.

Every source of randomness a real loop has is used: a shuffled DataLoader with
its own generator, dropout (torch's global RNG), and augmentation noise from
numpy's and Python's global generators; an LR scheduler (warmup then cosine).
"""

from __future__ import annotations

import json
import random
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradguard.ckpt import Checkpointer
from gradguard.optim import registry

STEPS = 20
BATCH = 4
SAMPLES = 26  # 7 batches per epoch, the last one short: the save lands mid-epoch


def make_optimizer(spec: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    source, name = spec.split(":")
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    if source == "torch":
        groups: list[dict[str, Any]] = [{"params": weights}, {"params": biases, "lr": 0.02}]
        if name == "SGD":
            return torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3)
        if name == "Adam":
            return torch.optim.Adam(groups, lr=0.01, amsgrad=True)
        if name == "Adagrad":
            return torch.optim.Adagrad(groups, lr=0.05)
        raise ValueError(spec)
    hyper = registry.hyperparameters(name)
    groups = [{"params": weights}, {"params": biases}]
    kwargs: dict[str, Any] = {}
    if "lr" in hyper:
        groups[1]["lr"] = 0.005
        kwargs["lr"] = 0.01
    if hyper.get("momentum") == 0:  # exercise the momentum state too
        kwargs["momentum"] = 0.9
    return registry.create(name, groups, **kwargs)


def build(spec: str, seed: int) -> tuple[Any, ...]:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 3))
    optimizer = make_optimizer(spec, model)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.3, total_iters=4),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)], milestones=[4])
    data = torch.Generator().manual_seed(1234)
    dataset = TensorDataset(torch.randn(SAMPLES, 6, generator=data),
                            torch.randint(0, 3, (SAMPLES,), generator=data))
    shuffle = torch.Generator().manual_seed(seed + 1)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=shuffle)
    return model, optimizer, scheduler, loader, shuffle


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
          loader: DataLoader[Any], shuffle: torch.Generator, step: int, stop: int,
          position: dict[str, Any]) -> dict[str, Any]:
    """Train from ``step`` to ``stop``; return the data position to resume from."""
    epoch, skip = position["epoch"], position["batch"]
    if position.get("generator") is not None:
        shuffle.set_state(position["generator"])
    model.train()
    while True:
        epoch_start = shuffle.get_state()  # the shuffle order is drawn from here
        for batch, (x, y) in enumerate(loader):
            if batch < skip:
                continue
            noise = torch.from_numpy(np.random.standard_normal(x.shape)).float()
            x = x + noise * (0.05 * random.random())

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> float:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return float(loss.detach())

            optimizer.step(closure)
            scheduler.step()
            step += 1
            if step == stop:
                return {"epoch": epoch, "batch": batch + 1, "generator": epoch_start}
        epoch, skip = epoch + 1, 0


def record(out: Path, tag: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any) -> None:
    tensors = {f"param/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    other: dict[str, Any] = {"param_groups": [], "state": {}, "scheduler": None}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{key}"] = value.detach().clone()
            else:
                other["state"][f"{index}/{key}"] = repr(value)
    other["param_groups"] = repr(state["param_groups"])
    other["scheduler"] = repr(scheduler.state_dict())
    other["rng"] = [repr(random.random()), repr(float(np.random.standard_normal())),
                    repr(torch.rand(2).tolist())]
    safetensors.torch.save_file(tensors, out / f"{tag}.safetensors")
    (out / f"{tag}.json").write_text(json.dumps(other, indent=1))


def first(spec: str, root: Path, out: Path) -> None:
    model, optimizer, scheduler, loader, shuffle = build(spec, seed=0)
    train(model, optimizer, scheduler, loader, shuffle, 0, STEPS, {"epoch": 0, "batch": 0})
    record(out, f"{tag_of(spec)}-full", model, optimizer, scheduler)

    model, optimizer, scheduler, loader, shuffle = build(spec, seed=0)
    position = train(model, optimizer, scheduler, loader, shuffle, 0, STEPS // 2,
                     {"epoch": 0, "batch": 0})
    Checkpointer(root / tag_of(spec)).save(STEPS // 2, model=model, optimizer=optimizer,
                                           scheduler=scheduler, data_position=position)


def second(spec: str, root: Path, out: Path) -> None:
    model, optimizer, scheduler, loader, shuffle = build(spec, seed=99)  # other seeds on purpose
    info = Checkpointer(root / tag_of(spec)).restore(model=model, optimizer=optimizer,
                                                     scheduler=scheduler)
    train(model, optimizer, scheduler, loader, shuffle, info.step, STEPS, info.data_position)
    record(out, f"{tag_of(spec)}-resumed", model, optimizer, scheduler)


def tag_of(spec: str) -> str:
    return spec.replace(":", "-")


def main(argv: list[str]) -> int:
    phase, root, out, *specs = argv
    torch.set_num_threads(1)
    for spec in specs:
        try:
            (first if phase == "first" else second)(spec, Path(root), Path(out))
        except Exception:
            (Path(out) / f"{tag_of(spec)}-{phase}.error").write_text(traceback.format_exc())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
