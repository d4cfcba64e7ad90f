"""Data-parallel training on a real 2-process gloo group (see conftest.py for the job).

Equivalence with one process is within float tolerance, not bitwise: the
single process averages 64 per-sample losses in one reduction, DDP averages
two means of 32 and then all-reduces the gradients, and the roundings differ.
Measured after 200 float32 steps on digits: at most 8e-7 (absolute) on any
parameter for SGD, Adam and Adagrad; 2e-15 in float64. The tests allow 2e-5.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gradguard.guard import read_audit
from gradguard.run import config, train
from gradguard.watch import read_jsonl
from tests.dist import harness
from tests.dist.conftest import (
    OPTIMIZERS,
    PER_RANK_BATCH,
    digits_config,
    reference_config,
    rollback_config,
    sparse_config,
)

TOLERANCE = 2e-5


def _events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _metric(run: Path, name: str) -> list[tuple[int, float]]:
    return [(r["step"], r["metrics"][name]) for r in read_jsonl(run / "metrics.jsonl")
            if name in r["metrics"]]


def _skips(run: Path) -> list[int]:
    return [r["step"] for r in read_audit(run / "guard.jsonl") if r["action"] == "skip"]


def _results(suite: Path) -> list[dict[str, Any]]:
    return [json.loads((suite / f"results-rank{r}.json").read_text()) for r in (0, 1)]


def _single(out: Path, cfg: dict[str, Any], faults: dict[str, str] | None = None
            ) -> dict[str, torch.Tensor]:
    """A single-process run of ``cfg``; its final parameters."""
    from tests.dist import workloads

    torch.set_num_threads(1)
    os.environ.update(faults or {})
    try:
        train(config.parse(cfg), progress=False)
    finally:
        for key in faults or {}:
            del os.environ[key]
    return {n: p.detach().clone() for n, p in workloads.MODELS[-1].named_parameters()}


def _replicas(suite: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return (harness.load_replica(suite / f"{name}-replicas", 0),
            harness.load_replica(suite / f"{name}-replicas", 1))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_ddp_with_per_rank_batch_b_equals_one_process_with_batch_2b(
        suite: Path, tmp_path: Path, optimizer: str) -> None:
    rank0, rank1 = _replicas(suite, f"equal-{optimizer}")
    assert harness.identical(rank0, rank1)  # the replicas agree bit for bit
    cfg = reference_config(tmp_path / "single", optimizer)
    cfg["train"]["batch_size"] = 2 * PER_RANK_BATCH
    single = _single(tmp_path / "single", cfg)
    assert harness.max_difference(rank0, single) < TOLERANCE
    run = suite / f"equal-{optimizer}"
    assert harness.identical(harness.final_parameters(run), rank0)  # rank 0 saved its replica
    # the guard took the same decisions (its grad_spike skips) as in the single process
    assert _skips(run) == _skips(tmp_path / "single")
    summary = json.loads((run / "summary.json").read_text())
    alone = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["samples"] == alone["samples"]
    assert summary["last_loss"] == pytest.approx(alone["last_loss"], rel=1e-5)
    assert summary["dist"]["world_size"] == 2 and summary["dist"]["replicas_consistent"] is True
    assert summary["dist"]["replica_checks"] == 4 and summary["dist"]["replica_mismatches"] == 0
    kinds = [e["event"] for e in _events(run)]
    assert kinds.count("checkpoint") == 10 and kinds.count("eval") == 10


def test_only_rank0_writes_the_run_directory_and_the_metrics_are_the_jobs(suite: Path) -> None:
    run = suite / "equal-adam"
    kinds = [e["event"] for e in _events(run)]
    assert kinds.count("start") == 1 and kinds.count("finished") == 1  # not one per rank
    assert _events(run)[0]["world_size"] == 2
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["dist"]["backend"] == "gloo"
    spread = _metric(run, "grad_norm_rank_spread")
    assert [s for s, _ in spread] == list(range(10, 201, 10))  # every spread_every steps
    assert all(v > 0 for _, v in spread)  # two shards of a batch give two different norms
    assert _metric(run, "replica_mismatch_total") == [(50, 0.0), (100, 0.0), (150, 0.0),
                                                      (200, 0.0)]
    losses = dict(_metric(run, "loss"))
    assert len(losses) == 20 and all(0 < v < 3 for v in losses.values())
    assert len(list((run / "checkpoints").glob("step-*"))) == 10
    results = _results(suite)
    assert results[0]["equal-adam"]["report"] and not results[1]["equal-adam"]["report"]


def test_a_nan_on_one_ranks_loss_makes_every_rank_skip_that_step(
        suite: Path, tmp_path: Path) -> None:
    run = suite / "nan"
    records = read_audit(run / "guard.jsonl")
    at_37 = [(r["detector"], r["action"], r["outcome"]) for r in records if r["step"] == 37]
    assert ("nonfinite_rank", "skip", "skipped on every rank") in at_37
    assert ("nonfinite", "skip", "skipped") in at_37
    rank_record = next(r for r in records if r["detector"] == "nonfinite_rank")
    assert rank_record["evidence"]["ranks"] == [1]
    rank0, rank1 = _replicas(suite, "nan")
    assert harness.identical(rank0, rank1)  # both skipped: still one model
    assert all(torch.isfinite(t).all() for t in rank0.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 80
    # and the run is the one-process run that skipped the same step
    single = _single(tmp_path / "single", digits_config(
        tmp_path / "single", steps=80, batch_size=2 * PER_RANK_BATCH),
        {"GG_TEST_NAN_LOSS": "0:37"})
    assert harness.max_difference(rank0, single) < TOLERANCE


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(suite: Path) -> None:
    results = _results(suite)
    for rank in (0, 1):  # rank 1 got SIGINT during step 30; the step's agreement carried it
        assert (results[rank]["interrupt"]["status"], results[rank]["interrupt"]["steps"],
                results[rank]["interrupt"]["exit_code"]) == ("interrupted", 30, 130)
    run = suite / "interrupt"
    assert [e["step"] for e in _events(run) if e["event"] == "interrupted"] == [30]
    assert harness.checkpoint_parameters(run, 30)  # saved on the way out
    rank0, rank1 = _replicas(suite, "interrupt")
    assert harness.identical(rank0, rank1)


def test_a_guard_rollback_restores_rank0s_checkpoint_on_every_rank(
        suite: Path, tmp_path: Path) -> None:
    run = suite / "rollback"
    records = read_audit(run / "guard.jsonl")
    rollbacks = [r for r in records if r["action"] == "rollback"]
    # three skipped steps in a row (a grad_spike skip at 44 may start the run of three)
    assert [(r["detector"], r["outcome"]) for r in rollbacks] == [
        ("escalation", "restored step 40")]
    assert rollbacks[0]["step"] in (46, 47)
    rank0, rank1 = _replicas(suite, "rollback")
    assert harness.identical(rank0, rank1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 80
    assert summary["guard"]["counts"]["rollback"] == 1
    single = _single(tmp_path / "single", rollback_config(
        tmp_path / "single", batch_size=2 * PER_RANK_BATCH), {"GG_TEST_NAN_LOSS": "0:45-47"})
    assert harness.max_difference(rank0, single) < TOLERANCE


def test_drift_on_one_rank_is_detected_within_k_steps_and_repaired_by_resync(suite: Path) -> None:
    run = suite / "drift"
    records = [r for r in read_audit(run / "guard.jsonl") if r["detector"] == "replica_mismatch"]
    assert len(records) == 1
    record = records[0]
    # perturbed before step 50's forward on rank 1; checks every 10 steps
    assert record["step"] == 50 and record["action"] == "resync_from_rank0"
    assert record["outcome"] == "resynced from rank 0 (verified)"
    assert record["evidence"]["ranks"] == [1]
    assert record["evidence"]["tensors"]["1"] == ["model.0.weight"]
    guard_events = [e for e in _events(run) if e["event"] == "guard"]
    assert [(e["step"], e["action"]) for e in guard_events] == [(50, "resync_from_rank0")]
    assert (50, 1.0) in _metric(run, "replica_mismatch_total")
    assert _metric(run, "replica_mismatch_total")[-1] == (80, 1.0)
    rank0, rank1 = _replicas(suite, "drift")
    assert harness.identical(rank0, rank1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dist"]["replica_mismatches"] == 1
    assert summary["guard"]["detections"]["replica_mismatch"] == 1
    assert summary["guard"]["counts"]["resync_from_rank0"] == 1


def test_drift_with_on_mismatch_stop_halts_every_rank_with_a_diagnosis(suite: Path) -> None:
    results = _results(suite)
    for rank in (0, 1):
        assert results[rank]["drift-stop"]["status"] == "halted"
        assert results[rank]["drift-stop"]["exit_code"] == 3
        assert results[rank]["drift-stop"]["steps"] == 50
    run = suite / "drift-stop"
    halted = [e for e in _events(run) if e["event"] == "halted"]
    assert len(halted) == 1 and "replicas differ from rank 0" in halted[0]["diagnosis"]
    record = [r for r in read_audit(run / "guard.jsonl") if r["detector"] == "replica_mismatch"]
    assert [(r["action"], r["outcome"]) for r in record] == [("stop", "halted")]


def test_zero_sharded_state_equals_replicated_and_restores_into_one_process(
        suite: Path, tmp_path: Path) -> None:
    zero, reference = suite / "zero", suite / "equal-adam"
    # ZeRO's step is the replicated step: the same parameters and state, bit for bit
    assert harness.identical(harness.checkpoint_parameters(zero, 60),
                             harness.checkpoint_parameters(reference, 60))
    state_zero = load_file(str(zero / "checkpoints" / f"step-{60:012d}" / "optimizer.safetensors"))
    state_ref = load_file(str(reference / "checkpoints" / f"step-{60:012d}" /
                              "optimizer.safetensors"))
    assert harness.identical(state_zero, state_ref) and len(state_zero) == 3 * 4
    manifest = json.loads((zero / "checkpoints" / f"step-{60:012d}" / "manifest.json").read_text())
    assert manifest["components"]["optimizer"]["class"] == "gradguard.optim.adam.Adam"
    # resume the 2-process ZeRO run in 1 process with the same global batch, to step 120
    resumed = tmp_path / "zero-on-1"
    shutil.copytree(zero, resumed)
    cfg = reference_config(resumed, zero=True)
    cfg["train"]["batch_size"] = 2 * PER_RANK_BATCH
    result = train(config.parse(cfg), resume=True, progress=False)
    assert result.status == "finished" and result.steps == 200
    assert [e["event"] for e in _events(resumed)].count("resume") == 1
    difference = harness.max_difference(harness.final_parameters(resumed),
                                        harness.final_parameters(reference))
    assert difference < TOLERANCE


def test_post_local_sgd_measures_the_spread_between_averagings(suite: Path) -> None:
    run = suite / "local-sgd"
    spread = _metric(run, "replica_spread")
    # measured just before each averaging: steps 12, 16, ..., 60
    assert [s for s, _ in spread] == list(range(12, 61, 4))
    assert all(v > 0 for _, v in spread)  # local steps: the replicas drifted apart
    assert all(v < 0.05 for _, v in spread)
    rank0, rank1 = _replicas(suite, "local-sgd")
    assert harness.identical(rank0, rank1)  # step 60 averaged them
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["dist"]["local_sgd"] == {"period": 4, "warmup_steps": 11, "subgroup_size": 1}
    assert summary["dist"]["replicas_consistent"] is True
    assert summary["dist"]["replica_checks"] == 3  # at the averagings of steps 20, 40, 60
    assert summary["final"]["accuracy"] > 0.8


def test_sparse_embedding_gradients_are_all_reduced_by_gloo(suite: Path, tmp_path: Path) -> None:
    rank0, rank1 = _replicas(suite, "sparse")
    assert harness.identical(rank0, rank1)
    summary = json.loads((suite / "sparse" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dist"]["replicas_consistent"] is True
    single = _single(tmp_path / "single", sparse_config(tmp_path / "single", batch_size=64))
    # (two micro-batches per step: the first under no_sync, the second all-reduces)
    assert harness.max_difference(rank0, single) < TOLERANCE
