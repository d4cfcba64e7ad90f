"""Real multi-process gloo groups for the tests: spawn, bound the time, clean up.

:func:`spawn` starts ``world_size`` processes (``torch.multiprocessing``, the
"spawn" start method) that see the environment ``torchrun`` would give them
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``
= 127.0.0.1, ``MASTER_PORT`` = a free port), initialises the gloo process group
in each, runs ``fn(rank, world_size, arg)`` and tears the group down. A worker
that raises fails the call with its traceback; a job that runs past
``timeout`` seconds is killed (every process) and fails with ``TimeoutError``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _entry(rank: int, fn: Callable[[int, int, Any], None], world_size: int, port: int,
           arg: Any, timeout: float) -> None:
    os.environ.update(torchrun_env(rank, world_size, port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        fn(rank, world_size, arg)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[[int, int, Any], None], arg: Any, *, world_size: int = 2,
          timeout: float = 120.0) -> None:
    """Run ``fn(rank, world_size, arg)`` in ``world_size`` processes of one gloo group."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), arg, timeout),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size}-process job still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def save_replica(directory: Path, rank: int, model: torch.nn.Module) -> None:
    """This rank's parameters, to ``directory/rank<r>.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()},
              str(directory / f"rank{rank}.safetensors"))


def load_replica(directory: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(directory / f"rank{rank}.safetensors"))


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the run's newest checkpoint (the one saved at the end)."""
    steps = sorted((run / "checkpoints").glob("step-*"))
    return load_file(str(steps[-1] / "model.safetensors"))


def checkpoint_parameters(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:012d}" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
