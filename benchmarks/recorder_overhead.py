"""What the flight recorder costs: training with vs without it, in one interleaved run.

The workload is a CTR model on CPU, synthetic data: one embedding table shared
by all categorical fields (dense gradients, so the optimizer step over the whole
table is a visible share of the step time) and an MLP on the concatenated field
embeddings, binary cross-entropy, gradguard Adam.

Two identical models train on identical batches, one with a
``Recorder(every=10, full_every=100)`` writing JSONL (and the loss logged every
step), one without, interleaved step by step in ABBA order, so drift in the
machine's speed hits both alike. Printed: the with/without step-time ratio (goal
<= 1.02x), then the cost of one sampled emission and one full emission against
model size: the sampled one should stay flat, the full one grows with the table.

    python benchmarks/recorder_overhead.py            # default: 200k-row table
    python benchmarks/recorder_overhead.py --quick    # a smaller, shorter run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gradguard.optim import Adam
from gradguard.watch import JsonlSink, Recorder, embedding_params

FIELDS = 8
DIM = 16


class CTRModel(nn.Module):
    """Embedding (one table, all fields) + MLP -> click logit."""

    def __init__(self, rows: int, hidden: int = 256) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, DIM)
        self.mlp = nn.Sequential(
            nn.Linear(FIELDS * DIM, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(ids).reshape(ids.shape[0], -1)).squeeze(1)


def make_batches(rows: int, batch: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor,
                                                                                torch.Tensor]]:
    """Zipf-like ids per field (rare features exist) and labels from a hidden linear model."""
    gen = torch.Generator().manual_seed(seed)
    per_field = rows // FIELDS
    weight = torch.randn(rows, generator=gen)
    batches = []
    for _ in range(count):
        u = torch.rand(batch, FIELDS, generator=gen)
        local = (per_field ** u).long().clamp_(max=per_field) - 1  # log-uniform ranks
        ids = local + torch.arange(FIELDS) * per_field
        logits = weight[ids].sum(1) / FIELDS**0.5
        labels = (torch.rand(batch, generator=gen) < torch.sigmoid(logits)).float()
        batches.append((ids, labels))
    return batches


def train_step(model: CTRModel, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor],
               recorder: Recorder | None) -> tuple[float, float]:
    """Wall and CPU seconds of one training step (with the recorder's log call if any).

    CPU time (this thread's) is less disturbed by other processes on a shared
    machine; with one torch thread all the work is on this thread.
    """
    ids, labels = batch
    c0 = time.thread_time()
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.binary_cross_entropy_with_logits(model(ids), labels)
    loss.backward()
    optimizer.step()
    value = loss.item()  # both loops read the loss, as training loops do
    if recorder is not None:
        recorder.log(recorder.step, loss=value)
    return time.perf_counter() - t0, time.thread_time() - c0


def overhead(rows: int, batch: int, steps: int, every: int, full_every: int,
             out: Path) -> None:
    torch.manual_seed(0)
    plain = CTRModel(rows)
    watched = CTRModel(rows)
    watched.load_state_dict(plain.state_dict())
    opt_plain = Adam(plain.parameters(), lr=1e-3)
    opt_watched = Adam(watched.parameters(), lr=1e-3)
    batches = make_batches(rows, batch, 64)
    recorder = Recorder(opt_watched, [JsonlSink(out / "overhead.jsonl")], every=every,
                        full_every=full_every, batch_size=batch,
                        embeddings=embedding_params(watched))
    # warm-up: allocator, caches, first-step state creation
    for i in range(full_every):
        train_step(plain, opt_plain, batches[i % len(batches)], None)
        train_step(watched, opt_watched, batches[i % len(batches)], recorder)
    # Interleaved step by step, in ABBA order, so that the machine's changing speed
    # (other processes, frequency) hits both alike; the recorder's cadence runs on.
    plain_times: list[tuple[float, float]] = []
    watched_times: list[tuple[float, float]] = []
    for i in range(steps):
        batch_i = batches[i % len(batches)]
        if i % 2 == 0:
            plain_times.append(train_step(plain, opt_plain, batch_i, None))
            watched_times.append(train_step(watched, opt_watched, batch_i, recorder))
        else:
            watched_times.append(train_step(watched, opt_watched, batch_i, recorder))
            plain_times.append(train_step(plain, opt_plain, batch_i, None))
    costs = tier_costs(recorder, repeats=30)
    recorder.close()
    plain_wall, plain_cpu = (sum(t[k] for t in plain_times) for k in (0, 1))
    watched_wall, watched_cpu = (sum(t[k] for t in watched_times) for k in (0, 1))
    window = full_every  # one window holds every tier in its usual proportion
    ratios = [sum(t[0] for t in watched_times[w:w + window])
              / sum(t[0] for t in plain_times[w:w + window])
              for w in range(0, steps - window + 1, window)]
    optimizer_share = optimizer_step_share(plain, opt_plain, batches)
    params = sum(p.numel() for p in plain.parameters())
    print(f"CTR model: {rows:,} x {DIM} embedding + MLP, {params / 1e6:.1f}M params, "
          f"batch {batch}, gradguard Adam, torch threads {torch.get_num_threads()}; "
          f"optimizer step = {optimizer_share:.0%} of the step time")
    print(f"recorder: every={every}, full_every={full_every}, sample_size=1024, JSONL sink, "
          "loss logged every step")
    print(f"step time without recorder: {plain_wall / steps * 1e3:.3f} ms, "
          f"with: {watched_wall / steps * 1e3:.3f} ms ({steps} steps each, "
          "interleaved step by step)")
    print(f"with/without ratio, wall time: {watched_wall / plain_wall:.4f}x overall; "
          f"per {window}-step window: median {statistics.median(ratios):.4f}x, "
          f"quartiles {_quartiles(ratios)}  (goal <= 1.02x)")
    print(f"with/without ratio, CPU time:  {watched_cpu / plain_cpu:.4f}x overall")
    step_cpu = plain_cpu / steps
    accounted = costs["step"] + costs["sampled"] / every + costs["full"] / full_every
    print(f"per-tier CPU cost, timed alone (hot caches, so a lower bound): every step "
          f"{costs['step'] * 1e6:.0f} us, sampled {costs['sampled'] * 1e3:.2f} ms / {every} steps,"
          f" full {costs['full'] * 1e3:.1f} ms / {full_every} steps = "
          f"{accounted * 1e3:.3f} ms per step = {accounted / step_cpu:.2%} of the step")


def tier_costs(recorder: Recorder, repeats: int) -> dict[str, float]:
    """Median CPU seconds of one emission per tier (compute + sink write), on live state."""
    every, full_every, step = recorder.every, recorder.full_every, recorder.step

    def timed(run: Callable[[], None]) -> float:
        samples = []
        for _ in range(repeats):
            c0 = time.thread_time()
            run()
            samples.append(time.thread_time() - c0)
        return statistics.median(samples)

    def emit() -> None:
        now = time.perf_counter()
        recorder._emit(recorder.measure(step, now))
        recorder.log(step, loss=0.5)

    def sampled() -> None:
        recorder.snapshot()
        recorder._emit(recorder.measure(step))

    recorder.every, recorder.full_every = None, None
    costs = {"step": timed(emit)}
    recorder.every = 1
    costs["sampled"] = timed(sampled)
    recorder.every, recorder.full_every = None, 1
    costs["full"] = timed(lambda: recorder._emit(recorder.measure(step)))
    recorder.every, recorder.full_every = every, full_every
    return costs


def optimizer_step_share(model: CTRModel, optimizer: torch.optim.Optimizer,
                         batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of a training step spent in ``optimizer.step()`` (median of 20 steps)."""
    shares = []
    for i in range(20):
        ids, labels = batches[i % len(batches)]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(model(ids), labels).backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        shares.append((t2 - t1) / (t2 - t0))
    return statistics.median(shares)


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.4f}-{q3:.4f}"


def emission_cost(sizes: list[int], batch: int, repeats: int, out: Path) -> None:
    """Median seconds of one sampled and one full emission (compute + JSONL write)."""
    print("\ncost of one emission against model size (median of "
          f"{repeats}; sampled: snapshot + quantities + write)")
    print(f"{'table rows':>12} {'params':>10} {'sampled (ms)':>13} {'full (ms)':>10}")
    baseline = None
    for rows in sizes:
        torch.manual_seed(0)
        model = CTRModel(rows)
        optimizer = Adam(model.parameters(), lr=1e-3)
        batches = make_batches(rows, batch, 2)
        sink = JsonlSink(out / f"emission_{rows}.jsonl")
        recorder = Recorder(optimizer, [sink], every=None, full_every=None,
                            embeddings=embedding_params(model))
        for i in range(2):
            train_step(model, optimizer, batches[i], None)
        recorder.every, recorder.full_every = 1, None
        sampled = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            recorder.snapshot()
            sink.write(recorder.measure(recorder.step))
            sampled.append(time.perf_counter() - t0)
        recorder.every, recorder.full_every = None, 1
        full = []
        for _ in range(max(3, repeats // 10)):
            t0 = time.perf_counter()
            sink.write(recorder.measure(recorder.step))
            full.append(time.perf_counter() - t0)
        recorder.close()
        s, f = statistics.median(sampled), statistics.median(full)
        baseline = baseline or s
        params = sum(p.numel() for p in model.parameters())
        print(f"{rows:>12,} {params / 1e6:>9.2f}M {s * 1e3:>13.3f} {f * 1e3:>10.2f}"
              f"   sampled x{s / baseline:.2f} of the smallest")
        del model, optimizer, recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2000,
                        help="measured steps per variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: steadier timings on shared machines)")
    parser.add_argument("--sizes", type=str, default="10000,100000,1000000,4000000")
    parser.add_argument("--quick", action="store_true", help="small, short run (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.steps, args.sizes = 20_000, 200, "10000,100000"
    with tempfile.TemporaryDirectory() as tmp:
        overhead(args.rows, args.batch, args.steps, every=10, full_every=100, out=Path(tmp))
        emission_cost([int(s) for s in args.sizes.split(",")], args.batch, repeats=50,
                      out=Path(tmp))


if __name__ == "__main__":
    main()
