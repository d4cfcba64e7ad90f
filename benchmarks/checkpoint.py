"""Checkpoint save cost, against a bare ``safetensors.torch.save_file`` of the same tensors.

For ~200 MB of model + optimizer state (an MLP and AdamW's two moments) it measures,
in interleaved repetitions (order rotated each repetition), medians of:

* peer: ``safetensors.torch.save_file`` of the same tensors, then fsync of the file
  and its directory (the durable equivalent); its time before the fsync is
  reported too;
* ``Checkpointer.save``: the whole synchronous save (state dicts, sha256 of every
  file, fsync of every file, manifest, atomic rename, fsync of the parent);
* ``Checkpointer.save_async``: the blocking part only (the snapshot to host memory);
  the background write is waited for outside the timed region.

Deleting old outputs is outside the timed regions for both sides (retention off).
A diagnostic row repeats the synchronous save with sha256 stubbed out, to show
how much of the gap to the peer is the hash (which needs a free core to overlap
the write); CPU seconds of each are printed too.

    python benchmarks/checkpoint.py [--mb 200] [--reps 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import safetensors.torch
import torch

import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.ckpt import format as ckpt_format


class _NoHash:
    def __init__(self, buffers: object, total: int) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def build(megabytes: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP whose parameters + AdamW state (3 copies) total ``megabytes``."""
    width = 2048
    layers = max(1, round(megabytes * 1e6 / 3 / 4 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = go.create("adamw", model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def flat_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ) -> dict[str, torch.Tensor]:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer/{index}/{key}"] = value
    return tensors


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="state size in MB (default 200)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    load_before = f"{os.getloadavg()[0]:.1f}"
    model, optimizer = build(args.mb)
    tensors = flat_tensors(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    workdir = tempfile.mkdtemp(prefix="gradguard-bench-", dir=args.dir)
    times: dict[str, list[float]] = {"bare": [], "bare_nofsync": [], "sync": [], "async": [],
                                     "async_total": [], "bare_cpu": [], "sync_cpu": [],
                                     "async_cpu": [], "nohash": []}
    counter = iter(range(1, 10**9))

    def bare() -> None:
        path = os.path.join(workdir, "bare.safetensors")
        cpu, start = time.process_time(), time.perf_counter()
        safetensors.torch.save_file(tensors, path)
        written = time.perf_counter()
        fsync_path(path)
        fsync_path(workdir)
        end = time.perf_counter()
        times["bare_cpu"].append(time.process_time() - cpu)
        times["bare"].append(end - start)
        times["bare_nofsync"].append(written - start)
        os.remove(path)

    def sync() -> None:
        root = os.path.join(workdir, "sync")
        ckpt = Checkpointer(root, keep_last=None, audit=False)
        cpu, start = time.process_time(), time.perf_counter()
        ckpt.save(next(counter), model=model, optimizer=optimizer)
        times["sync"].append(time.perf_counter() - start)
        times["sync_cpu"].append(time.process_time() - cpu)
        shutil.rmtree(root)

    def without_sha256() -> None:
        """Diagnostic only: the same save with hashing stubbed out, to split the cost."""
        real = ckpt_format._Hasher
        ckpt_format._Hasher = _NoHash
        try:
            root = os.path.join(workdir, "nohash")
            ckpt = Checkpointer(root, keep_last=None, audit=False)
            start = time.perf_counter()
            ckpt.save(next(counter), model=model, optimizer=optimizer)
            times["nohash"].append(time.perf_counter() - start)
            shutil.rmtree(root)
        finally:
            ckpt_format._Hasher = real

    ckpt_async = Checkpointer(os.path.join(workdir, "async"), keep_last=None, audit=False)

    def asynchronous() -> None:
        cpu, start = time.process_time(), time.perf_counter()
        ckpt_async.save_async(next(counter), model=model, optimizer=optimizer)
        blocked = time.perf_counter()
        times["async_cpu"].append(time.process_time() - cpu)
        ckpt_async.wait()
        times["async"].append(blocked - start)
        times["async_total"].append(time.perf_counter() - start)
        shutil.rmtree(os.path.join(workdir, "async"))

    runs: list[Callable[[], None]] = [bare, sync, asynchronous, without_sha256]
    try:
        # Warm-up (untimed): page cache, allocator, the async snapshot buffers.
        start = time.perf_counter()
        ckpt_async.save_async(0, model=model, optimizer=optimizer)
        first_async = time.perf_counter() - start
        ckpt_async.wait()
        shutil.rmtree(os.path.join(workdir, "async"))
        bare()
        sync()
        for key in times:
            times[key].clear()
        for rep in range(args.reps):
            for run in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                run()
    finally:
        ckpt_async.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = nbytes / 1e6
    cpu = time.process_time()
    digest = hashlib.sha256()
    for tensor in tensors.values():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    sha_cpu = time.process_time() - cpu
    print(f"checkpoint save: {mb:.1f} MB of model + AdamW state, {len(tensors)} tensors, "
          f"{args.reps} interleaved repetitions, medians; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load_before} -> {os.getloadavg()[0]:.1f}")
    print(f"  peer  safetensors.torch.save_file + fsync     {med['bare']:7.3f} s  "
          f"{mb / med['bare']:7.0f} MB/s   (before fsync: {med['bare_nofsync']:.3f} s)")
    print(f"  gradguard save (sha256, fsync, rename)     {med['sync']:7.3f} s  "
          f"{mb / med['sync']:7.0f} MB/s")
    print(f"  gradguard save_async, blocking part        {med['async']:7.3f} s  "
          f"(whole async save {med['async_total']:.3f} s; first call, allocating its "
          f"buffers: {first_async:.3f} s)")
    print(f"async save blocking time / sync save:              {med['async'] / med['sync']:.3f}x"
          "  (goal <= 0.15x)")
    print(f"sync save throughput / save_file, both fsynced:    {med['bare'] / med['sync']:.3f}x"
          "  (goal >= 0.8x)")
    print(f"sync save throughput / save_file without fsync:    "
          f"{med['bare_nofsync'] / med['sync']:.3f}x  (the peer not durable; for reference)")
    print(f"diagnostic: the same sync save with sha256 stubbed out takes {med['nohash']:.3f} s "
          f"({med['bare'] / med['nohash']:.3f}x the peer's throughput): the rest of the cost is "
          "the hash")
    print(f"CPU seconds (all threads): peer {med['bare_cpu']:.3f}, sync save "
          f"{med['sync_cpu']:.3f}, async blocking part {med['async_cpu']:.3f}; sha256 of the "
          f"state alone {sha_cpu:.3f} (a wall-clock ratio needs a free core to overlap it)")


if __name__ == "__main__":
    main()
