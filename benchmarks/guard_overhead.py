"""Cost of ``guard.step(loss)`` against what a careful loop does without a guard.

For Adam and Adagrad at 25M float32 parameters (50 tensors) on the CPU, steps are
timed in interleaved repetitions (the order alternating) on identical gradients,
restored from a master copy before every timed call (outside the timing):

* **with clipping** (``clip_norm=1.0``, the gradients' norm is ~50 so every step
  clips): ``guard.step(loss)`` with gradguard's optimizer (``impl="auto"``, fused)
  against ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim`` fused ``step()``.
  Goal: <= 0.92x.
* **without clipping**: ``guard.step(loss)`` against the non-finite check torch's
  ``GradScaler`` makes (``torch._amp_foreach_non_finite_check_and_unscale_``) +
  the fused ``step()`` taking its ``found_inf`` (GradScaler's path for fused
  optimizers). Goal: <= 1.02x.

The guard runs its default policy (non-finite, loss- and gradient-norm spike
detectors every step; divergence, starvation and accumulator checks on their
cadences), after enough warm-up steps that every detector is live. Printed: the
median step time of each side and their ratio (lower is better for the guard).

Run: ``.venv/bin/python benchmarks/guard_overhead.py [--params 25e6] [--tensors 50] [--reps 30]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import gradguard.optim as go
from gradguard.guard import Guard

MAX_NORM = 1.0
WARMUP = 30
GOALS = {"clip": 0.92, "noclip": 1.02}
PEERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}
OURS = {"adam": go.Adam, "adagrad": go.Adagrad}


def make_params(total: int, tensors: int, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    size = total // tensors
    return [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(tensors)]


class Side:
    """One side of a comparison: its parameters, optimizer and the step being timed."""

    def __init__(self, params: list[torch.nn.Parameter], step: Callable[[torch.Tensor], None],
                 ) -> None:
        self.params = params
        self.step = step
        self.times: list[float] = []

    def load(self, master: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, master, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def timed(self, loss: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.step(loss)
        self.times.append(time.perf_counter() - t0)


def peer_side(name: str, params: list[torch.nn.Parameter], clip: bool) -> Side:
    opt = PEERS[name](params, fused=True)
    found_inf = torch.zeros(())
    inv_scale = torch.ones(())

    def clipped(loss: torch.Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()

    def checked(loss: torch.Tensor) -> None:  # what GradScaler does for a fused optimizer
        found_inf.zero_()
        grads = [p.grad for p in params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        opt.grad_scale, opt.found_inf = None, found_inf
        opt.step()
        del opt.grad_scale, opt.found_inf

    return Side(params, clipped if clip else checked)


def guard_side(name: str, params: list[torch.nn.Parameter], clip: bool) -> Side:
    opt = OURS[name](params)
    guard = Guard(opt, policy={"clip_norm": MAX_NORM} if clip else None)

    def step(loss: torch.Tensor) -> None:
        guard.step(loss)

    side = Side(params, step)
    side.guard = guard  # type: ignore[attr-defined]
    return side


def compare(name: str, clip: bool, total: int, tensors: int, reps: int) -> float:
    master = [p.detach().clone() * 1e-2 for p in make_params(total, tensors, seed=1)]
    peer = peer_side(name, make_params(total, tensors, seed=0), clip)
    ours = guard_side(name, make_params(total, tensors, seed=0), clip)
    gen = torch.Generator().manual_seed(2)
    for i in range(WARMUP + reps):
        loss = 2.0 + 0.01 * torch.randn((), generator=gen)
        pair = (peer, ours) if i % 2 == 0 else (ours, peer)
        for side in pair:
            side.load(master)
            side.timed(loss)
    peer_t = statistics.median(peer.times[WARMUP:])
    ours_t = statistics.median(ours.times[WARMUP:])
    guard: Guard = ours.guard  # type: ignore[attr-defined]
    ratio = ours_t / peer_t
    what = ("guard.step vs clip_grad_norm_ + fused step" if clip else
            "guard.step vs _amp_foreach_non_finite_check_and_unscale_ + fused step")
    goal = GOALS["clip" if clip else "noclip"]
    print(f"{name:8s} {'clip' if clip else 'no clip':8s} {what:70s} "
          f"{1e3 * ours_t:8.2f} ms / {1e3 * peer_t:8.2f} ms = {ratio:5.3f}x "
          f"(goal <= {goal}: {'met' if ratio <= goal else 'NOT met'}; "
          f"guard actions: {guard.counts or 'none'})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--optimizers", nargs="*", default=list(PEERS), choices=list(PEERS))
    args = parser.parse_args()
    total = int(args.params)
    print(f"{total / 1e6:.1f}M float32 parameters in {args.tensors} tensors, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.reps} interleaved repetitions after {WARMUP} warm-up steps")
    for name in args.optimizers:
        for clip in (True, False):
            compare(name, clip, total, args.tensors, args.reps)


if __name__ == "__main__":
    main()
