"""Sparse embedding-table step time against torch.optim.Adagrad, and against memory bandwidth.

One float32 table (default 2,000,000 x 64) receives a sparse gradient of
20,000 lookups per step, as ``nn.Embedding(sparse=True)`` produces it (one row
of values per lookup, duplicates included, uncoalesced), with ids drawn
uniformly and from a Zipf distribution (exponent 1.1, hot rows scattered over
the table). Each step draws fresh ids, so no method finds another's rows in
cache. With ``--tables N`` the optimizers hold N such tables (a recommendation
model's categorical features, e.g. ``--tables 26 --rows 1e5 --dim 16 --lookups
2048``), each with its own lookups, and a step updates all of them. In
interleaved repetitions, on the same tables:

* ``torch.optim.Adagrad``, sparse path (the peer), and dense fused path
  (``fused=True`` on a dense gradient of the whole table);
* gradguard ``Adagrad`` and ``RowWiseAdagrad`` (``impl="auto"``: the compiled
  kernel when numba is installed) and ``Adagrad`` with ``impl="reference"``
  (the torch-ops path).

After each repetition's steps, the *random-row floors* (``random_row_floor.py``,
needs numba) run on fresh ids: a compiled loop on all threads that only reads
and writes the distinct rows of the tables and of a state (Adagrad's, one value
per element, or RowWiseAdagrad's, one per row), and reads the values once, in
order; no sorting, coalescing or optimizer arithmetic. Every step of that
algorithm does at least this memory work, so torch's step time over the floor's
is the largest speed-up the machine allows (as far as the floor's loop, the
fastest of the settings tried, gets the most out of the memory system).

Printed per distribution: median step times (and the median of the steps that
directly follow the dense step, whose 2.5 GB leave every cache cold); the
speed-up over torch's sparse and dense fused steps (goal, for the default
problem: >= 10x over the sparse step for Adagrad and RowWiseAdagrad on both
distributions); the bytes a step must touch (the touched rows of the tables and
state read and written, the gradients' values and ids read; the whole tables,
gradients and state for the dense step) per second, as a fraction of the
machine's memory-bandwidth ceiling measured in the same run (the better of
two measurements, before and after the steps, of the best in-place streaming
kernel over arrays of the tables' size, at least 256 MiB, all threads: a
sequential ceiling, which random rows cannot reach); each optimizer's state
bytes; the floors' times, the speed-up each allows and each gradguard step's
time over its floor. The methods run in a different order each repetition,
chosen so that over every ``4 * 5 = 20`` repetitions each method directly
follows each other one equally often (what ran before a step matters: the dense
step streams 2.5 GB through the caches).

Run: ``.venv/bin/python benchmarks/embedding_step.py [--rows 2e6] [--dim 64]
[--lookups 20000] [--tables 1] [--reps 20] [--zipf 1.1] [--threads N]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import gradguard.optim as go
from gradguard.optim import _sparse
from gradguard.optim.rowwise import RowWiseAdagrad
from random_row_floor import make_floor

GOAL = 10.0
"""Speed-up over torch.optim.Adagrad's sparse step that gradguard aims for."""

CEILING_MIN_BYTES = 256 << 20
"""Smallest arrays the bandwidth ceiling streams over."""


def bandwidth_ceiling(numel: int, reps: int = 5) -> float:
    """Best bytes/s of in-place streaming kernels (scale, axpy) over ``numel`` float32 arrays."""
    a, b = torch.rand(numel), torch.rand(numel)
    best = 0.0
    for _ in range(reps):
        for kernel, streams in ((lambda: a.mul_(0.999), 2), (lambda: a.add_(b, alpha=1e-3), 3)):
            t0 = time.perf_counter()
            kernel()
            best = max(best, streams * 4 * numel / (time.perf_counter() - t0))
    return best


def zipf_sampler(rows: int, exponent: float, size: int, gen: torch.Generator,
                 permutation: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Draws of ``size`` ids with P(rank k) ~ k**-exponent, ranks mapped to rows by
    ``permutation``; the CDF is computed once (recomputing 2M-entry arrays per draw
    would allocate and free 32 MB between the timed steps)."""
    weights = torch.arange(1, rows + 1, dtype=torch.float64).pow_(-exponent)
    cdf = weights.cumsum_(0)
    cdf /= cdf[-1].item()

    def draw() -> torch.Tensor:
        ranks = torch.searchsorted(cdf, torch.rand(size, generator=gen, dtype=torch.float64))
        return permutation[ranks.clamp_(max=rows - 1)]

    return draw


def balanced_order(items: list[Any], rep: int) -> list[Any]:
    """The order of repetition ``rep``: ``items[(start + i * stride) % n]``.

    ``start`` cycles fastest, then ``stride`` over the numbers coprime with ``n``.
    With ``n`` prime (5 methods) the item after ``x`` is ``x + stride``, so over
    ``n * (n - 1)`` repetitions every item directly follows every other one equally
    often (a plain rotation keeps one cyclic order: a method would always follow
    the same one).
    """
    n = len(items)
    strides = [k for k in range(1, n) if math.gcd(k, n) == 1] or [1]
    start, stride = rep % n, strides[(rep // n) % len(strides)]
    return [items[(start + i * stride) % n] for i in range(n)]


@dataclass
class Method:
    label: str
    optimizer: torch.optim.Optimizer
    dense: bool = False
    rowwise: bool = False


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))


def touched_bytes(method: Method, lookups: int, distinct: int, rows: int, dim: int) -> int:
    """Bytes a step on one table must read and write: the ``distinct`` touched rows of table
    and state, values, ids."""
    if method.dense:
        return rows * dim * 4 * 5  # read table, gradient, sum; write table, sum
    per_row = dim * 4 * 2 + (4 * 2 if method.rowwise else dim * 4 * 2)
    return distinct * per_row + lookups * (dim * 4 + 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=2e6)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=20_000, help="per table")
    parser.add_argument("--tables", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for every method (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, dim, lookups, count = int(args.rows), args.dim, args.lookups, args.tables
    gen = torch.Generator().manual_seed(args.seed)

    tables = [torch.nn.Parameter(torch.randn(rows, dim, generator=gen) * 0.01)
              for _ in range(count)]
    values = torch.randn(lookups, dim, generator=gen) * 0.01  # every table's, with its own ids
    # each table its own dense gradient: a shared one would stay in cache between tables
    dense_grads = [torch.randn(rows, dim, generator=gen) * 0.01 for _ in tables]
    kernel = _sparse.kernels_installed()
    mib = count * rows * dim * 4 / 2**20
    # arrays of at least 256 MiB: smaller ones would partly stream from the last-level cache
    ceiling_numel = max(count * rows * dim, CEILING_MIN_BYTES // 4)
    ceiling = bandwidth_ceiling(ceiling_numel)
    shape = (f"{rows:,} x {dim} float32 table ({mib:,.0f} MiB)" if count == 1 else
             f"{count} float32 tables of {rows:,} x {dim} ({mib:,.0f} MiB in all)")
    print(f"embedding step: {shape}, {lookups:,} lookups per table and step; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; compiled kernels: "
          + ("on (numba)" if kernel else "OFF (numba not installed: gradguard runs torch ops)"))

    methods = [
        Method("torch Adagrad, sparse", torch.optim.Adagrad(tables, lr=0.01)),
        Method("torch Adagrad, dense fused", torch.optim.Adagrad(tables, lr=0.01, fused=True),
               dense=True),
        Method("gradguard Adagrad", go.Adagrad(tables, lr=0.01)),
        Method("gradguard Adagrad, torch ops", go.Adagrad(tables, lr=0.01, impl="reference")),
        Method("gradguard RowWiseAdagrad", RowWiseAdagrad(tables, lr=0.01), rowwise=True),
    ]
    if not kernel:
        methods[2].label += " (torch ops)"
        methods[4].label += " (torch ops)"
    # (label, floor, the method whose bytes it touches)
    floors = [(label, floor, method) for label, floor, method in (
        ("floor: Adagrad's rows", make_floor(tables), methods[2]),
        ("floor: RowWiseAdagrad's rows", make_floor(tables, row_wise=True), methods[4]))
        if floor is not None]
    floor_of = {method.label: label for label, _, method in floors}

    permutation = torch.randperm(rows, generator=gen)
    draws: dict[str, Callable[[], torch.Tensor]] = {
        "uniform": lambda: torch.randint(0, rows, (lookups,), generator=gen),
        f"zipf {args.zipf:g}": zipf_sampler(rows, args.zipf, lookups, gen, permutation),
    }
    speedups: dict[tuple[str, str], float] = {}
    step_times: dict[tuple[str, str], float] = {}  # medians
    results: list[tuple[str, dict[str, float], dict[str, float], dict[str, float], float]] = []
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    for distribution, draw in draws.items():
        labels = [m.label for m in methods] + [label for label, _, _ in floors]
        times: dict[str, list[float]] = {label: [] for label in labels}
        traffic: dict[str, list[int]] = {label: [] for label in labels}
        after_dense: dict[str, list[float]] = {label: [] for label in labels}
        distinct: list[int] = []
        previous: Method | None = None
        for rep in range(args.reps + 2):  # the first two warm up (kernel compilation, caches)
            for method in balanced_order(methods, rep):
                ids = [draw() for _ in tables]
                for table, table_ids, dense_grad in zip(tables, ids, dense_grads, strict=True):
                    table.grad = (dense_grad if method.dense else torch.sparse_coo_tensor(
                        table_ids.unsqueeze(0), values, (rows, dim)))
                t0 = time.perf_counter()
                method.optimizer.step()
                elapsed = time.perf_counter() - t0
                for table in tables:
                    table.grad = None
                if rep >= 2:
                    times[method.label].append(elapsed)
                    if previous is not None and previous.dense:
                        after_dense[method.label].append(elapsed)
                    touched = [int(torch.unique(i).numel()) for i in ids]
                    traffic[method.label].append(sum(touched_bytes(method, lookups, n, rows, dim)
                                                     for n in touched))
                    if method is methods[0]:
                        distinct.append(sum(touched))
                previous = method
            # the floors after the rep's steps, so that they follow each method in turn
            for label, floor, like in floors[::1 if rep % 2 else -1]:
                ids = [draw() for _ in tables]
                elapsed = floor(ids, [values] * count)
                if rep >= 2:
                    times[label].append(elapsed)
                    if previous is not None and previous.dense:
                        after_dense[label].append(elapsed)
                    traffic[label].append(sum(touched_bytes(like, lookups, int(torch.unique(
                        i).numel()), rows, dim) for i in ids))
                previous = None
        results.append((distribution,
                        {label: statistics.median(ts) for label, ts in times.items()},
                        {label: statistics.median(b) for label, b in traffic.items()},
                        {label: statistics.median(ts or [math.nan])
                         for label, ts in after_dense.items()},
                        statistics.median(distinct)))

    # the ceiling again after the steps, the better of the two: on a shared machine one
    # measurement can come out below what the dense step then reaches
    ceiling = max(ceiling, bandwidth_ceiling(ceiling_numel))
    print(f"memory-bandwidth ceiling: {ceiling / 1e9:.1f} GB/s (best in-place streaming kernel "
          f"over {ceiling_numel * 4 / 2**20:,.0f} MiB arrays, before and after the steps)\n")
    for distribution, median, moved_median, after_dense_median, distinct_median in results:
        sparse_peer, dense_peer = median[methods[0].label], median[methods[1].label]
        print(f"ids: {distribution}, {distinct_median:,.0f} distinct rows per step "
              f"(median{', all tables' if count > 1 else ''})")
        header = (f"{'optimizer':<32} {'step ms':>8} {'vs torch sparse':>16} "
                  f"{'vs dense fused':>15} {'touched MB':>11} {'GB/s':>6} {'of ceiling':>10} "
                  f"{'state MiB':>10} {'after dense ms':>15}")
        print(header)
        print("-" * len(header))
        rows_out = [(m.label, f"{state_bytes(m.optimizer) / 2**20:10.1f}") for m in methods]
        rows_out += [(label, f"{'-':>10}") for label, _, _ in floors]
        for label, state in rows_out:
            step = median[label]
            moved = moved_median[label]
            speedups[(label, distribution)] = sparse_peer / step
            step_times[(label, distribution)] = step
            after = after_dense_median[label]  # nan: never ran right after the dense step
            print(f"{label:<32} {step * 1e3:8.2f} {sparse_peer / step:15.1f}x "
                  f"{dense_peer / step:14.1f}x {moved / 1e6:11.1f} {moved / step / 1e9:6.1f} "
                  f"{moved / step / ceiling:10.1%} {state} "
                  + (f"{'-':>15}" if math.isnan(after) else f"{after * 1e3:15.2f}"))
        print()

    # the goal is set for the default problem (one 2,000,000 x 64 table, 20,000 lookups)
    goal = all(getattr(args, k) == parser.get_default(k) for k in ("rows", "dim", "lookups",
                                                                    "tables"))
    print("speed-up over torch.optim.Adagrad's sparse step"
          + (f" (goal >= {GOAL:g}x on both distributions):" if goal else ":"))
    for method in (methods[2], methods[4]):
        cells = ", ".join(f"{d} {speedups[(method.label, d)]:.1f}x" for d in draws)
        met = all(speedups[(method.label, d)] >= GOAL for d in draws)
        verdict = "met" if met else "NOT met"
        floor_label = floor_of.get(method.label)
        beyond = [d for d in draws
                  if floor_label is not None and speedups[(floor_label, d)] < GOAL]
        if not met and beyond:  # no step could reach the goal on this machine
            verdict += "; beyond this machine's random-row floor on " + ", ".join(beyond)
        print(f"  {method.label}: {cells}" + (f"  [{verdict}]" if goal else ""))
    if not floors:
        print("random-row floor: not measured (needs numba: pip install gradguard[fast])")
        return
    print("the most the random-row floor allows on this machine (torch's step / the floor's), "
          "and the step's time over the floor's (1.00 = as fast as touching its bytes):")
    for method in (methods[2], methods[4]):
        label = floor_of[method.label]
        most = ", ".join(f"{d} {speedups[(label, d)]:.1f}x" for d in draws)
        over = ", ".join(f"{d} {step_times[(method.label, d)] / step_times[(label, d)]:.2f}"
                         for d in draws)
        print(f"  {method.label}: at most {most}; step / floor {over}")


if __name__ == "__main__":
    main()
