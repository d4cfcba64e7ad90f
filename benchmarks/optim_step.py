"""Optimizer step time against torch.optim's fastest implementation, and against memory bandwidth.

For 25M float32 parameters in 50 tensors on the CPU (or ``--device cuda``), each
gradguard optimizer
(``impl="auto"``) and its torch.optim peer (fused where torch has a fused
kernel, else the faster of torch's foreach and for-loop paths, measured here)
step in interleaved repetitions on identical inputs. Printed per optimizer:
median step times, the ratio gradguard/torch (lower is faster; goal <= 1/0.95
for Adam, AdamW, SGD and Adagrad, <= 1.0 for the rest), and the achieved
bytes/s as a fraction of the machine's memory-bandwidth ceiling, measured in the
same run with in-place streaming kernels of the same working-set size.

On CUDA torch's Adagrad has no fused kernel (its fused path is CPU-only), so its
peer there is the faster of foreach and for-loop; every step is timed between
two ``torch.cuda.synchronize()`` calls.

Run: ``.venv/bin/python benchmarks/optim_step.py [--params 25e6] [--tensors 50] [--reps 15]
[--device cuda] [--impl reference|foreach|fused]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import gradguard.optim as go

# Bytes moved per parameter element per step, in units of the element size:
# reads + writes of param, grad and each state tensor (norm passes included).
TRAFFIC = {
    "sgd": 5, "adagrad": 5, "rmsprop": 5, "adadelta": 7, "adam": 7, "adamw": 7,
    "adamax": 7, "nadam": 7, "lion": 5, "lars": 7, "ftrl": 7,
    "rowwise_adagrad": 3,  # param read + write, grad read; the per-row sums are 1/D of that
}
# torch.optim peers: (class, [candidate keyword sets]); the fastest candidate is the peer.
PEERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], list[dict[str, object]]]] = {
    "sgd": (torch.optim.SGD, [{"fused": True}]),
    "adagrad": (torch.optim.Adagrad, [{"fused": True}]),
    "adam": (torch.optim.Adam, [{"fused": True}]),
    "adamw": (torch.optim.AdamW, [{"fused": True}]),
    "rmsprop": (torch.optim.RMSprop, [{"foreach": True}, {"foreach": False}]),
    "adadelta": (torch.optim.Adadelta, [{"foreach": True}, {"foreach": False}]),
    "adamax": (torch.optim.Adamax, [{"foreach": True}, {"foreach": False}]),
    "nadam": (torch.optim.NAdam, [{"foreach": True}, {"foreach": False}]),
}
CUDA_PEERS = {**PEERS, "adagrad": (torch.optim.Adagrad, [{"foreach": True}, {"foreach": False}])}
"""On CUDA: torch.optim.Adagrad(fused=True) runs on the CPU only."""
HPARAMS: dict[str, dict[str, object]] = {"sgd": {"lr": 0.01, "momentum": 0.9}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_ceiling(numel: int, device: torch.device, reps: int = 9) -> float:
    """Best bytes/s of in-place streaming kernels whose working set is at least an optimizer's.

    Read-modify-write kernels like an optimizer's, axpy (2 streams) and addcmul
    (3 streams), over arrays of ``2 * numel`` float32, so they touch at least the
    4 x ``numel`` elements of a parameter, gradient and two state tensors: the
    caches (this machine's L3 holds a good part of a 25M-parameter working set)
    help the ceiling no more than they help the optimizer. Out-of-place kernels
    would also read their destination (write-allocate) and understate it.
    """
    a, b, c = (torch.rand(2 * numel, device=device) for _ in range(3))
    kernels = [(lambda: a.add_(b, alpha=1e-3), 3), (lambda: a.addcmul_(b, c, value=1e-3), 4)]
    best = 0.0
    for _ in range(reps):
        for kernel, streams in kernels:
            synchronize(device)
            t0 = time.perf_counter()
            kernel()
            synchronize(device)
            best = max(best, streams * 4 * 2 * numel / (time.perf_counter() - t0))
    return best


def make_problem(total: int, tensors: int, seed: int,
                 device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    size = total // tensors
    params = [torch.nn.Parameter(torch.randn(size, generator=gen).to(device))
              for _ in range(tensors)]
    for p in params:
        p.grad = (torch.randn(size, generator=gen) * 1e-2).to(device)
    return params


def time_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    opt.step()
    synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--impl", default="auto",
                        help="gradguard impl where the optimizer has it (default auto)")
    args = parser.parse_args()
    total, reps, device = int(args.params), args.reps, torch.device(args.device)
    peer_table = CUDA_PEERS if device.type == "cuda" else PEERS
    names = [n for n in go.available() if not args.only or n in args.only.split(",")]

    ceiling = bandwidth_ceiling(total, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; "
          f"{total / 1e6:.0f}M float32 params in {args.tensors} tensors, {reps} interleaved reps")
    print(f"memory-bandwidth ceiling (best in-place axpy/addcmul over "
          f"{2 * total / 1e6:.0f}M-element arrays): {ceiling / 1e9:.1f} GB/s\n")
    header = (f"{'optimizer':<15} {'gradguard impl':<15} {'ms':>7} {'torch peer':<22} {'ms':>7} "
              f"{'ratio':>6} {'GB/s':>6} {'of ceiling':>10}")
    print(header)
    print("-" * len(header))
    for name in names:
        ours_params = make_problem(total, args.tensors, 0, device)
        ours = go.create(name, ours_params, **HPARAMS.get(name, {}))  # type: ignore[arg-type]
        if args.impl != "auto" and args.impl in ours.supported_impls:
            ours = go.create(name, ours_params, impl=args.impl,  # type: ignore[arg-type]
                             **HPARAMS.get(name, {}))
        impl = ours.resolve_impl(ours.param_groups[0], ours_params)
        # every torch candidate runs in the same interleaved loop; the fastest median is the peer
        peers: dict[str, torch.optim.Optimizer] = {}
        if name in peer_table:
            cls, candidates = peer_table[name]
            for kwargs in candidates:
                flags = ", ".join(f"{k}={v}" for k, v in kwargs.items())
                peers[f"{cls.__name__}({flags})"] = cls(
                    make_problem(total, args.tensors, 0, device), **HPARAMS.get(name, {}),
                    **kwargs)
        for _ in range(2):
            time_step(ours, device)
            for candidate in peers.values():
                time_step(candidate, device)
        ours_times: list[float] = []
        peer_times: dict[str, list[float]] = {label: [] for label in peers}
        for rep in range(reps):
            # alternate who goes first: the first in a round measurably pays for the
            # previous round's data in cache (a 1-5% bias against it here)
            if rep % 2 == 0:
                ours_times.append(time_step(ours, device))
            for label, candidate in peers.items():
                peer_times[label].append(time_step(candidate, device))
            if rep % 2 == 1:
                ours_times.append(time_step(ours, device))
        ours_ms = statistics.median(ours_times) * 1e3
        moved = TRAFFIC[name] * 4 * total / (ours_ms / 1e3)
        if peers:
            peer_label, peer_ms = min(((label, statistics.median(t) * 1e3)
                                       for label, t in peer_times.items()), key=lambda x: x[1])
            ratio = f"{ours_ms / peer_ms:6.3f}"
            peer_col = f"{peer_ms:7.1f}"
        else:
            peer_label, ratio, peer_col = "none (no torch.optim peer)", "   n/a", "      -"
        print(f"{name:<15} {impl:<15} {ours_ms:7.1f} {peer_label:<22} {peer_col} {ratio} "
              f"{moved / 1e9:6.1f} {moved / ceiling:9.0%}")
        del ours, peers, ours_params
    print("\nratio = gradguard median step time / torch peer median step time (<= 1.0 is as "
          "fast or faster).")


if __name__ == "__main__":
    main()
