"""Reading a run directory: the evaluations that survived, and the seconds of kept work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gradguard.compare import eval_timeline, read_run


def event(kind: str, step: int, wall: float, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "step": step, "wall_time": wall, **fields}


def ev(step: int, wall: float, value: float) -> dict[str, Any]:
    return event("eval", step, wall, metrics={"accuracy": value})


def test_one_process_counts_seconds_from_its_start() -> None:
    points, total = eval_timeline([event("start", 0, 100.0), ev(10, 101.0, 0.5),
                                   ev(20, 102.5, 0.7), event("finished", 20, 103.0)])
    assert [(p.step, p.seconds) for p in points] == [(10, 1.0), (20, 2.5)]
    assert total == 3.0


def test_a_resume_drops_the_redone_evaluations_and_the_lost_time() -> None:
    events = [event("start", 0, 100.0), ev(10, 101.0, 0.5), event("checkpoint", 10, 101.2),
              ev(20, 102.0, 0.6),                       # lost: the kill came before a save
              event("start", 10, 500.0), event("resume", 10, 500.0),
              ev(10, 500.1, 0.5), ev(20, 501.0, 0.65), event("finished", 20, 501.5)]
    points, total = eval_timeline(events)
    assert [p.step for p in points] == [10, 20]
    assert points[1].metrics["accuracy"] == 0.65          # the redone evaluation counts
    assert points[1].seconds == pytest.approx(1.2 + 1.0)  # 1.2 s kept before, 1.0 s after
    assert total == pytest.approx(1.2 + 1.5)


def test_non_finite_values_survive_as_floats() -> None:
    points, _ = eval_timeline([event("start", 0, 0.0),
                               event("eval", 5, 1.0, metrics={"loss": "NaN"})])
    assert points[0].metrics["loss"] != points[0].metrics["loss"]


def write_run(run: Path, events: list[dict[str, Any]], summary: dict[str, Any] | None) -> Path:
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "group": "all", "metrics": {"loss": v}}) + "\n"
        for s, v in [(10, 1.0), (20, 0.8), (30, 0.5)]))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_read_run_finds_time_to_target_best_final_and_cost(tmp_path: Path) -> None:
    events = [event("start", 0, 0.0, primary_metric="accuracy", mode="max",
                    target={"metric": "accuracy", "value": 0.6, "mode": "max"}),
              ev(10, 1.0, 0.5), ev(20, 2.0, 0.7), ev(30, 4.0, 0.65),
              event("finished", 30, 4.5)]
    summary = {"status": "finished", "steps": 30, "seconds": 4.2, "primary_metric": "accuracy",
               "mode": "max", "guard": {"counts": {"skip": 2, "rollback": 1}}}
    out = read_run(write_run(tmp_path / "run", events, summary))
    assert (out.final, out.final_step, out.best, out.best_step) == (0.65, 30, 0.7, 20)
    assert (out.target_step, out.target_seconds) == (20, 2.0)
    assert (out.skipped_steps, out.rollbacks, out.compute_seconds) == (2, 1, 4.5)
    assert out.improvement == pytest.approx(0.15)
    assert out.seconds_per_unit == pytest.approx((4.0 - 1.0) / 0.15)
    assert out.train_loss == 0.5  # the last 10% of three records: the last one
    assert out.complete


def test_a_run_that_never_reaches_its_target_is_reported_so(tmp_path: Path) -> None:
    events = [event("start", 0, 0.0, primary_metric="loss", mode="min"),
              ev(10, 1.0, 0.5), event("finished", 10, 1.5)]
    out = read_run(write_run(tmp_path / "run", events, {"status": "finished"}),
                   primary="accuracy", mode="max", target=0.9)
    assert out.target_step is None and out.target_seconds is None
    assert out.to_dict()["time_to_target"] is None and not out.to_dict()["target_reached"]


def test_a_killed_run_without_summary_is_not_complete(tmp_path: Path) -> None:
    out = read_run(write_run(tmp_path / "run", [event("start", 0, 0.0), ev(10, 1.0, 0.5)],
                             None), primary="accuracy", mode="max")
    assert out.status == "running" and not out.complete
