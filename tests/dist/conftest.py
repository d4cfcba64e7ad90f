"""One 2-process gloo job runs every data-parallel scenario; the tests read what it left.

Starting a process group costs seconds on a loaded machine (each process
imports torch and scikit-learn), so the scenarios share one job: each rank
runs ``train()`` once per scenario, in the same process group, and saves its
replica's final parameters next to the run directory (see
:func:`run_scenarios`). Single-process reference runs happen in the test
process, in the tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.dist import harness

SEED = 3
STEPS = 200
PER_RANK_BATCH = 32
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.003},
    "adagrad": {"name": "adagrad", "lr": 0.05},
}


def digits_config(out: Path, *, optimizer: str = "adam", steps: int = STEPS,
                  batch_size: int = PER_RANK_BATCH, **sections: Any) -> dict[str, Any]:
    """A digits run (the fault-injecting copy of the built-in workload), one thread."""
    cfg: dict[str, Any] = {
        "run": {"output": str(out), "seed": SEED, "threads": 1},
        "workload": {"name": "tests.dist.workloads:digits"},
        "optimizer": dict(OPTIMIZERS[optimizer]),
        "train": {"steps": steps, "batch_size": batch_size, "eval_every": min(100, steps)},
        "recorder": {"every": 50, "full_every": 100},
        "dist": {"check_every": 50, "spread_every": 10},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def reference_config(out: Path, optimizer: str = "adam", steps: int = STEPS, **dist: Any
                     ) -> dict[str, Any]:
    """The equivalence runs; with adam also the reference of the ZeRO and kill/resume runs.

    An evaluation and a checkpoint every 20 steps (all kept), replica checks every 50.
    """
    return digits_config(out, optimizer=optimizer, steps=steps, train={"eval_every": 20},
                         checkpoint={"every": 20, "keep_every": 20}, dist=dist)


def rollback_config(out: Path, batch_size: int = PER_RANK_BATCH) -> dict[str, Any]:
    """Three non-finite steps in a row (45-47) escalate to a rollback to step 40's checkpoint."""
    return digits_config(out, steps=80, batch_size=batch_size, train={"eval_every": 20},
                         checkpoint={"every": 20})


def local_sgd_config(out: Path) -> dict[str, Any]:
    # averagings after steps 12, 16, ..., 60 (warm-up 11 steps, period 4)
    return digits_config(out, steps=60, optimizer="sgd", train={"eval_every": 30},
                         dist={"check_every": 20, "spread_every": 10,
                               "local_sgd": {"period": 4, "warmup_steps": 11,
                                             "subgroup_size": 1}})


def sparse_config(out: Path, batch_size: int = 32) -> dict[str, Any]:
    return {
        "run": {"output": str(out), "seed": SEED, "threads": 1},
        "workload": {"name": "tests.dist.workloads:sparse_ids"},
        "optimizer": {"groups": {
            "embeddings": {"name": "rowwise_adagrad", "params": "embeddings", "lr": 0.5},
            "dense": {"name": "adamw", "params": "dense", "lr": 0.01}}},
        "train": {"steps": 60, "batch_size": batch_size, "eval_every": 30,
                  "grad_accumulation": 2},
        "recorder": {"every": 20, "full_every": 60},
        "dist": {"check_every": 20},
    }


SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
"""name -> (config minus run.output, fault environment); filled by :func:`_scenarios`."""


def _scenarios(base: Path) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    out = []
    for name in OPTIMIZERS:
        out.append((f"equal-{name}", reference_config(base / f"equal-{name}", name), {}))
    out.append(("nan", digits_config(base / "nan", steps=80), {"GG_TEST_NAN_LOSS": "1:37"}))
    out.append(("drift", digits_config(base / "drift", steps=80, dist={"check_every": 10}),
                {"GG_TEST_PERTURB": "1:50"}))
    out.append(("drift-stop", digits_config(base / "drift-stop", steps=60,
                                            dist={"check_every": 10, "on_mismatch": "stop"}),
                {"GG_TEST_PERTURB": "1:50"}))
    out.append(("interrupt", digits_config(base / "interrupt", steps=60,
                                           checkpoint={"every": 50}),
                {"GG_TEST_SIGINT": "1:30"}))
    out.append(("rollback", rollback_config(base / "rollback"), {"GG_TEST_NAN_LOSS": "1:45-47"}))
    out.append(("zero", reference_config(base / "zero", steps=60, zero=True), {}))
    out.append(("local-sgd", local_sgd_config(base / "local-sgd"), {}))
    out.append(("sparse", sparse_config(base / "sparse"), {}))
    return out


def run_scenarios(rank: int, world_size: int, base: str) -> None:
    """The worker: every scenario's ``train()`` on this rank, then save this replica."""
    from gradguard.run import config, train
    from tests.dist import workloads

    results: dict[str, Any] = {}
    for name, cfg, faults in _scenarios(Path(base)):
        os.environ.update(faults)
        started = time.perf_counter()
        try:
            result = train(config.parse(cfg), progress=False)
        finally:
            for key in faults:
                del os.environ[key]
        harness.save_replica(Path(base) / f"{name}-replicas", rank, workloads.MODELS[-1])
        results[name] = {"status": result.status, "steps": result.steps,
                         "exit_code": result.exit_code, "report": result.report is not None,
                         "seconds": time.perf_counter() - started}
    import json

    (Path(base) / f"results-rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory where the 2-process job left every scenario's run and replicas."""
    base = tmp_path_factory.mktemp("ddp")
    from gradguard.run import config

    for _, cfg, _ in _scenarios(base):  # a bad config fails here, not in two processes
        config.parse(cfg)
    harness.spawn(run_scenarios, str(base), world_size=2, timeout=300)
    return base
