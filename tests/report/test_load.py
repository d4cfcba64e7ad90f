"""load_run: the parsed pieces of a run directory, tolerance, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradguard.report import ReportError, build_report, load_run

from .helpers import append_line


def test_load_run_reads_every_file_of_a_trained_run(trained_run: Path) -> None:
    run = load_run(trained_run)
    assert run.missing == [] and run.notes == []
    assert run.status == "finished"
    assert run.workload == "blobs" and run.optimizer == "adagrad"
    assert run.steps == 200 and run.planned_steps == 200
    assert run.primary_metric == "accuracy" and run.mode == "max" and run.target == 0.85
    assert [r["detector"] for r in run.guard] == ["nonfinite"]
    assert [e["step"] for e in run.events_of("checkpoint")] == [50, 100, 150, 200]
    assert [c["step"] for c in run.checkpoints] == [150, 200]  # keep_last=2
    assert [r["event"] for r in run.checkpoint_audit].count("save") == 4
    assert run.config is not None and run.config["workload"]["name"] == "blobs"
    assert run.env is not None and "torch" in run.env
    assert set(run.metrics.groups) == {"all", "hidden", "head"}
    assert run.metrics.groups_of("effective_lr") == ["hidden", "head"]
    final, best, best_step = run.final_and_best()
    assert final is not None and best is not None and best >= final
    assert best_step is not None and best_step % 20 == 0


def test_a_nonfinite_value_is_kept_apart_from_the_series(trained_run: Path) -> None:
    loss = load_run(trained_run).metrics.series("loss")
    assert loss is not None
    assert list(loss.nonfinite_steps) == [77]
    assert np.isfinite(loss.values).all() and 77 not in loss.steps
    assert np.all(np.diff(loss.steps) > 0)


def test_distributions_have_every_quantile(trained_run: Path) -> None:
    dist = load_run(trained_run).metrics.distribution("effective_lr", "hidden")
    assert dist is not None and len(dist) >= 39  # every 5 steps, one skipped step
    q = dist.quantiles
    assert np.all(q["p01"] <= q["p50"]) and np.all(q["p50"] <= q["p99"])


def test_a_step_recorded_twice_keeps_the_last_value(tmp_path: Path) -> None:
    """Steps replayed after a rollback: the trajectory that survived is shown."""
    for step, loss in [(1, 5.0), (2, 4.0), (3, 9.0), (2, 3.0), (3, 2.0), (4, 1.0)]:
        append_line(tmp_path / "metrics.jsonl", {"schema": 1, "step": step, "wall_time": 1.0,
                                                 "group": "all", "tiers": ["log"],
                                                 "metrics": {"loss": loss}})
    series = load_run(tmp_path).metrics.series("loss")
    assert series is not None
    assert list(series.steps) == [1, 2, 3, 4] and list(series.values) == [5.0, 3.0, 2.0, 1.0]


def test_a_truncated_last_line_is_skipped_with_a_note(run_copy: Path) -> None:
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().count("\n")
    append_line(metrics, '{"schema":1,"step":201,"wall_time":17', newline=False)
    append_line(run_copy / "events.jsonl", '{"time": "2025-', newline=False)
    run = load_run(run_copy)
    assert run.metrics.records == lines
    assert any(f"metrics.jsonl: the last line (line {lines + 1}) is incomplete" in n
               for n in run.notes)
    assert any(n.startswith("events.jsonl: the last line") for n in run.notes)
    html = build_report(run_copy).read_text()
    assert f"the last line (line {lines + 1}) is incomplete" in html


def test_a_crashed_run_without_optional_files_loads(run_copy: Path) -> None:
    for name in ("summary.json", "events.jsonl", "guard.jsonl", "env.json", "config.toml"):
        (run_copy / name).unlink()
    shutil.rmtree(run_copy / "checkpoints")
    run = load_run(run_copy)
    assert run.summary is None and run.events == [] and run.guard == []
    assert run.checkpoints == [] and run.config is None and run.env is None
    assert set(run.missing) == {"summary.json", "events.jsonl", "guard.jsonl", "env.json",
                                "config.toml", "checkpoints"}
    assert run.status == "running"
    assert run.steps == run.metrics.max_step
    assert any("still in progress" in n for n in run.notes)
    # evaluations come from the eval_* values the loop logs to metrics.jsonl
    assert set(run.evaluations()) == {"accuracy", "loss"}


def test_a_missing_metrics_file_is_a_clear_error(run_copy: Path) -> None:
    (run_copy / "metrics.jsonl").unlink()
    with pytest.raises(ReportError, match=r"metrics\.jsonl: not found"):
        load_run(run_copy)
    with pytest.raises(ReportError, match="no such run directory"):
        load_run(run_copy / "nowhere")


def test_a_malformed_middle_line_names_the_file_and_line(run_copy: Path) -> None:
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines.insert(9, '{"schema": 1, "step": oops}\n')
    metrics.write_text("".join(lines))
    with pytest.raises(ReportError, match=r"metrics\.jsonl:10: malformed line, not JSON"):
        load_run(run_copy)


def test_a_record_without_its_fields_names_the_file_and_line(run_copy: Path) -> None:
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines.insert(2, json.dumps({"schema": 1, "step": 3, "group": "all"}) + "\n")
    lines.insert(5, json.dumps({"schema": 1, "step": 3, "group": "all",
                                "metrics": {"loss": "fast"}}) + "\n")
    metrics.write_text("".join(lines))
    with pytest.raises(ReportError, match=r"metrics\.jsonl:3: malformed record, .*'metrics'"):
        load_run(run_copy)
    del lines[2]
    metrics.write_text("".join(lines))
    with pytest.raises(ReportError, match=r"metrics\.jsonl:5: .*'loss'.*'fast'"):
        load_run(run_copy)


def test_malformed_lines_of_the_other_logs_are_errors_too(run_copy: Path) -> None:
    guard = run_copy / "guard.jsonl"
    guard.write_text("[1, 2]\n" + guard.read_text())
    with pytest.raises(ReportError, match=r"guard\.jsonl:1: malformed line, expected a JSON "
                                          r"object"):
        load_run(run_copy)
    guard.write_text("{}\n")
    (run_copy / "summary.json").write_text('{"status": "finished",\n "steps": }\n')
    with pytest.raises(ReportError, match=r"summary\.json:2: not valid JSON"):
        load_run(run_copy)


def test_the_status_comes_from_the_end_events_without_a_summary(run_copy: Path) -> None:
    (run_copy / "summary.json").unlink()
    events = run_copy / "events.jsonl"
    kept = [line for line in events.read_text().splitlines(keepends=True)
            if '"finished"' not in line]
    events.write_text("".join(kept))
    assert load_run(run_copy).status == "running"
    append_line(events, {"time": "t", "wall_time": 1.0, "step": 200, "event": "halted",
                         "diagnosis": "Training halted by the gradguard guard at step 200."})
    assert load_run(run_copy).status == "halted"
    html = build_report(run_copy).read_text()
    assert 'class="diagnosis">Training halted by the gradguard guard at step 200.' in html


def test_importing_and_building_a_report_needs_neither_torch_nor_pyplot(trained_run: Path,
                                                                      tmp_path: Path) -> None:
    """The report reads files only: no torch, no training loop, no global plotting state."""
    code = (
        "import sys\n"
        "from gradguard.report import build_report\n"
        f"build_report({str(trained_run)!r}, {str(tmp_path / 'r.html')!r})\n"
        "names = {'gradguard.run', 'gradguard.run.rundir'}  # the run-directory file names\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith("
        "('gradguard.run', 'gradguard.watch', 'gradguard.guard', 'gradguard.ckpt', "
        "'matplotlib.pyplot')) and m not in names)\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
