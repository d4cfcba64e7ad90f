"""Where this process stands in a data-parallel job: rank, world size, device, process group.

``torchrun`` (and the other torch.distributed launchers) describe the job in
environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. :func:`setup` reads
them, initialises the default process group (``gloo`` on the CPU, ``nccl`` on
CUDA) unless the caller already did, and says which device this rank uses
(``cuda:LOCAL_RANK`` on GPUs). A job of one process is not distributed:
:func:`setup` returns None and nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The variables every torch.distributed launcher sets (``env://`` initialisation reads them)."""


class DistributedSetupError(RuntimeError):
    """The job's environment or settings cannot give a working process group."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    """The device this rank trains on (``cuda:LOCAL_RANK`` on GPUs)."""
    owns_group: bool
    """True when :func:`setup` initialised the process group (and :func:`teardown` ends it)."""

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors handed to collectives must live (NCCL: the GPU; gloo: the CPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> dict[str, object]:
        """Facts for env.json and the run's events."""
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "local_world_size": self.local_world_size, "backend": self.backend,
                "device": str(self.device), "master_addr": os.environ.get("MASTER_ADDR"),
                "master_port": os.environ.get("MASTER_PORT")}


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a torch.distributed launcher (``torchrun``) started this process."""
    environ = os.environ if environ is None else environ
    return all(environ.get(name) for name in TORCHRUN_VARIABLES)


def choose_backend(device: str, backend: str = "auto") -> str:
    """``"nccl"`` for CUDA and ``"gloo"`` for the CPU (``backend="auto"``), or the one asked for."""
    on_cuda = device.startswith("cuda")
    if backend == "auto":
        return "nccl" if on_cuda else "gloo"
    if backend == "nccl" and not on_cuda:
        raise DistributedSetupError('dist.backend = "nccl" needs run.device = "cuda"; on the CPU '
                                    'use "gloo" (or "auto")')
    return backend


def setup(device: str = "cpu", backend: str = "auto", timeout: float = 1800.0) -> DistEnv | None:
    """Join the job this process belongs to; None when it runs alone.

    Uses the default process group when the caller initialised one already;
    otherwise, when launched by ``torchrun`` with ``WORLD_SIZE`` > 1,
    initialises it from the environment (``env://``). ``device`` is the
    configured ``run.device``: on CUDA every rank takes ``cuda:LOCAL_RANK``.
    ``timeout`` bounds how long any collective waits for the other ranks.
    """
    owns = False
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return None
        rank = dist.get_rank()
        chosen = str(dist.get_backend())
    else:
        if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
            return None
        if not dist.is_available():
            raise DistributedSetupError("this torch build has no torch.distributed")
        chosen = choose_backend(device, backend)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"run.device = {device!r}, but torch sees no CUDA device")
        where = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(where)
    else:
        where = torch.device("cpu")
    if not dist.is_initialized():
        store = _attempt_store(rank, world, timeout)
        options: dict[str, Any] = {"timeout": timedelta(seconds=timeout)}
        if store is not None:
            options.update(store=store, rank=rank, world_size=world)
        if chosen == "nccl":
            options["device_id"] = where
        dist.init_process_group(chosen, **options)
        owns = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank,
                   local_world_size=local_world, backend=chosen, device=where, owns_group=owns)


def _attempt_store(rank: int, world: int, timeout: float) -> Any:
    """Under torchelastic: the job's store, its keys prefixed by this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, the store the agent
    hosts still holds the previous attempt's keys, including each rank's gloo
    address; a restarted rank may read its dead peer's address before the new
    peer has written its own, and fail to connect ("Connection refused"). A
    prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps the attempts apart.
    Outside torchelastic: None (``env://`` as usual).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0,
                          timeout=timedelta(seconds=timeout), multi_tenant=not agent_hosts)
    return dist.PrefixStore(f"gradguard/attempt_{attempt}", store)


def teardown(env: DistEnv | None) -> None:
    """End the process group if :func:`setup` started it (after a last barrier)."""
    if env is None or not env.owns_group or not dist.is_initialized():
        return
    dist.destroy_process_group()
