"""The crash-safety harness: SIGKILL a process that saves in a loop, at random moments.

``python -m tests.ckpt.crash_worker ROOT TRIALS SEED REPORT``

The harness (this process) makes one good checkpoint, then for each trial forks
a writer that restores the newest checkpoint and saves in a loop (alternating
synchronous and async saves, retention deleting old ones) until the harness
kills it with SIGKILL after a random delay. After each kill a fresh
Checkpointer in the harness (another process than the killed writer) looks at
the root: the report records what ``latest()`` returned, whether that
checkpoint verifies, and what the writer left behind. Forking avoids paying
torch's import for every trial.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradguard.optim as go
from gradguard.ckpt import Checkpointer, CheckpointError, verify
from gradguard.ckpt.commit import TEMP_PREFIXES


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # ~1.5 MB of state: a save takes long enough to be killed in the middle.
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.Tanh(),
                                torch.nn.Linear(384, 64))
    optimizer = go.create("adam", model.parameters(), lr=1e-3)
    return model, optimizer


def writer(root: str, seed: int) -> None:
    """Restore the newest checkpoint, then save forever (until killed)."""
    rng = random.Random(seed)
    model, optimizer = make()
    ckpt = Checkpointer(root, keep_last=2, cleanup=False)
    info = ckpt.restore(model=model, optimizer=optimizer)
    step = info.step
    while True:
        step += 1
        optimizer.zero_grad()
        model(torch.randn(8, 256)).square().mean().backward()
        optimizer.step()
        if rng.random() < 0.5:
            ckpt.save(step, model=model, optimizer=optimizer, extra={"writer_seed": seed})
        else:
            ckpt.save_async(step, model=model, optimizer=optimizer, extra={"writer_seed": seed})


def check(root: str) -> dict[str, Any]:
    leftovers = sorted(n for n in os.listdir(root) if n.startswith(TEMP_PREFIXES))
    result: dict[str, Any] = {"leftovers": leftovers}
    info = Checkpointer(root, keep_last=2).latest()  # cleans up, then finds the newest good one
    if info is None:
        return {**result, "step": None}
    result.update(step=info.step, path=info.path,
                  name=os.path.basename(info.path),
                  leftovers_after_cleanup=sorted(n for n in os.listdir(root)
                                                 if n.startswith(TEMP_PREFIXES)))
    try:
        verify(info.path)
        result["verifies"] = True
    except CheckpointError as err:
        result.update(verifies=False, error=str(err))
    return result


def main(argv: list[str]) -> int:
    root, trials, seed, report = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    torch.set_num_threads(1)
    rng = random.Random(seed)
    model, optimizer = make()
    Checkpointer(root, keep_last=2).save(0, model=model, optimizer=optimizer)
    results = []
    for trial in range(trials):
        pid = os.fork()
        if pid == 0:  # the writer
            try:
                writer(root, seed * 1000 + trial)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        result = check(root)
        result.update(trial=trial, killed=os.WIFSIGNALED(status)
                      and os.WTERMSIG(status) == signal.SIGKILL)
        results.append(result)
    report.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
