"""Build a real run directory without `gradguard train`: a small model trained with
gradguard's optimizer, recorder, guard and checkpointer, and the files the run-directory
layout (``gradguard.run.rundir``) describes, written the way the training loop writes them.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import gradguard
import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.guard import Guard
from gradguard.watch import JsonlSink, Recorder

TARGET = 0.85
"""The target of the primary metric (accuracy), reached after a few evaluations."""

CONFIG_TOML = """\
# the run's configuration, as validated
name = "report-test"
seed = {seed}
steps = {steps}

[workload]
name = "blobs"
primary_metric = "accuracy"
mode = "max"
target = {target}

[optimizer]
name = "{optimizer}"
lr = 0.1

[watch]
every = 5
full_every = 20

[checkpoint]
every = 50
"""


def _now() -> tuple[str, float]:
    wall = time.time()
    iso = datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds")
    return iso.replace("+00:00", "Z"), wall


class _Events:
    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def __call__(self, step: int, event: str, **fields: Any) -> None:
        iso, wall = _now()
        record = {"time": iso, "wall_time": wall, "step": step, "event": event, **fields}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 10, generator=gen) * 0.6
    y = torch.randint(0, 3, (n,), generator=gen)
    x = centers[y] + torch.randn(n, 10, generator=gen)
    return x, y


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    first, second = model[0], model[2]  # type: ignore[index]
    groups = [{"params": list(first.parameters()), "name": "hidden"},
              {"params": list(second.parameters()), "name": "head", "lr": 0.05}]
    if name == "sgd":
        return go.SGD(groups, lr=0.1, momentum=0.9)
    return go.Adagrad(groups, lr=0.1)


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return {"accuracy": accuracy, "loss": loss}


def make_run(run_dir: str | Path, *, steps: int = 200, optimizer: str = "adagrad",
             nan_step: int | None = 77, seed: int = 0, eval_every: int = 20,
             checkpoint_every: int = 50, finish: bool = True) -> Path:
    """Train a 3-class classifier for ``steps`` steps into ``run_dir``; return its path.

    The gradient of step ``nan_step`` is made NaN, so the guard skips it. With
    ``finish=False`` the run stops like a crashed process: no ``finished`` event and
    no summary.json.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    (run / "config.toml").write_text(CONFIG_TOML.format(seed=seed, steps=steps,
                                                        optimizer=optimizer, target=TARGET))
    (run / "env.json").write_text(json.dumps({
        "gradguard": gradguard.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": "cpu", "threads": torch.get_num_threads(),
        "start_time": _now()[0]}, indent=2))
    events = _Events(run / "events.jsonl")
    events(0, "start", workload="blobs", optimizer=optimizer, steps=steps, resumed_from=None)

    model = _model(seed)
    opt = _optimizer(optimizer, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x_train, y_train = _data(seed, 2048)
    x_eval, y_eval = _data(seed, 512)
    batch_size = 32
    gen = torch.Generator().manual_seed(seed + 1)
    ckpt = Checkpointer(run / "checkpoints", keep_last=2)
    sink = JsonlSink(run / "metrics.jsonl")
    best = -1.0
    best_step = 0
    reached: int | None = None
    metrics: dict[str, float] = {}
    with Recorder(opt, [sink], every=5, full_every=20, batch_size=batch_size) as recorder:
        guard = Guard(opt, recorder=recorder, checkpointer=ckpt, model=model,
                      audit=run / "guard.jsonl")
        for step in range(1, steps + 1):
            index = torch.randint(0, len(x_train), (batch_size,), generator=gen)
            x, y = x_train[index], y_train[index]
            if step == nan_step:
                x = x.clone()
                x[0, 0] = float("nan")
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            result = guard.step(loss)
            if result.applied:
                scheduler.step()
            recorder.log(step, loss=loss.item())
            if step % eval_every == 0 or step == steps:
                t0 = time.perf_counter()
                metrics = _evaluate(model, x_eval, y_eval)
                events(step, "eval", metrics=metrics, seconds=time.perf_counter() - t0)
                recorder.log(step, **{f"eval_{k}": v for k, v in metrics.items()})
                if metrics["accuracy"] > best:
                    best, best_step = metrics["accuracy"], step
                if reached is None and metrics["accuracy"] >= TARGET:
                    reached = step
                    events(step, "target_reached", metric="accuracy", value=metrics["accuracy"],
                           target=TARGET, seconds=time.time() - started)
            if step % checkpoint_every == 0:
                info = ckpt.save(step, model=model, optimizer=opt, scheduler=scheduler,
                                 metrics=metrics)
                events(step, "checkpoint", path=str(Path(info.path).relative_to(run)),
                       metrics=metrics)
        guard.close()
    ckpt.close()

    if finish:
        if ckpt.steps() and ckpt.steps()[-1] == steps:
            # restore fidelity: evaluate a fresh model restored from the last checkpoint
            restored = _model(seed + 100)
            ckpt.restore(model=restored, rng=False)
            after = _evaluate(restored, x_eval, y_eval)["accuracy"]
            events(steps, "restore_fidelity", metric="accuracy", before=metrics["accuracy"],
                   after=after, delta=after - metrics["accuracy"])
        seconds = time.time() - started
        events(steps, "finished", status="finished", steps=steps, seconds=seconds)
        # the keys gradguard.run's loop writes
        (run / "summary.json").write_text(json.dumps({
            "status": "finished", "steps": steps, "total_steps": steps, "seconds": seconds,
            "samples": steps * batch_size, "workload": "blobs", "optimizer": optimizer,
            "primary_metric": "accuracy", "mode": "max", "final": metrics, "final_step": steps,
            "best": {"value": best, "step": best_step},
            "target": {"metric": "accuracy", "value": TARGET, "mode": "max",
                       "reached_step": reached},
            "guard": {"counts": guard.counts, "detections": guard.detections},
            "halted": None, "info": {"classes": 3, "features": 10, "n_train": 2048}},
            indent=1))
    events.close()
    return run
