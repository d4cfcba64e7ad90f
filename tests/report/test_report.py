"""build_report: the page's sections, plots, tables, escaping, self-containment and size."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from gradguard.report import SECTIONS, build_report

from .helpers import append_line, external_references, sections, table
from .make_run import make_run

SECTION_IDS = [sid for sid, _ in SECTIONS]
PLOTTED = [sid for sid in SECTION_IDS if sid != "config"]


def test_the_report_is_written_into_the_run_directory_by_default(run_copy: Path) -> None:
    path = build_report(run_copy)
    assert path == run_copy / "report.html" and path.is_file()
    assert not list(run_copy.glob(".report-*"))  # the temporary file was renamed


def test_every_section_is_present_with_a_heading_and_its_plots(trained_report: Path) -> None:
    html = trained_report.read_text()
    found = sections(html)
    assert list(found) == SECTION_IDS
    for sid in PLOTTED:
        body = found[sid]
        assert "<h2>" in body, sid
        assert body.count("<figure>") >= 1 and "<figcaption>" in body, sid
        assert "<svg" in body and body.count("<path") >= 5, sid
        assert 'class="empty"' not in body, sid
    assert found["loss"].count("<svg") == 2          # training loss, evaluation panels
    assert found["accumulator"].count("<svg") == 2   # exact mean/max, distribution bands


def test_the_header_tells_the_outcome(trained_report: Path) -> None:
    html = trained_report.read_text()
    header = html[html.index('<header class="run">'):html.index("</header>")]
    assert '<span class="status status-ok" id="status">finished</span>' in header
    for fact in ("blobs", "adagrad", "<dd>200</dd>", "<dd>6,400</dd>", "accuracy (final)",
                 "accuracy (best, higher is better)", "accuracy ≥ 0.85: reached at step",
                 "1 × skip", "4 saved, 2 kept", "Wall time"):
        assert fact in header, fact


def test_the_skip_is_in_the_timeline_table(trained_report: Path) -> None:
    html = trained_report.read_text()
    rows = table(html, "guard-events")
    assert rows == [["77", "nonfinite", "skip", "skipped",
                     "non-finite loss and gradient norm (loss=nan, grad_norm=nan)"]]
    checkpoints = table(html, "checkpoints")
    assert [r[0] for r in checkpoints] == ["50", "100", "150", "200"]
    assert [r[1] for r in checkpoints] == [f"checkpoints/step-{s:012d}"
                                           for s in (50, 100, 150, 200)]
    assert [r[4] for r in checkpoints] == ["no", "no", "yes", "yes"]
    assert all("accuracy=" in r[2] for r in checkpoints)
    resume = table(html, "resume")
    assert resume[0][1] == "restore fidelity" and "delta 0" in resume[0][2]


def test_the_workload_facts_and_configuration_are_shown(trained_report: Path) -> None:
    html = trained_report.read_text()
    assert table(html, "workload-info") == [["classes", "3"], ["features", "10"],
                                            ["n_train", "2048"]]
    assert '<pre class="config"># the run&#x27;s configuration, as validated' in html
    env = dict(map(tuple, table(html, "env")))  # type: ignore[arg-type]
    assert env["device"] == "cpu" and "torch" in env


def test_the_report_references_nothing_outside_itself(trained_report: Path) -> None:
    html = trained_report.read_text()
    assert external_references(html) == []
    assert not re.search(r"<script|<link|<iframe|<object|<embed|<img", html, re.I)
    assert "http://" not in html and "https://" not in html


def test_the_report_of_a_short_run_is_small(trained_report: Path) -> None:
    assert trained_report.stat().st_size < 600_000


def test_text_from_the_run_directory_is_escaped(run_copy: Path) -> None:
    config = run_copy / "config.toml"
    config.write_text(config.read_text() + '\n[notes]\ntext = "<script>alert(1)</script>"\n')
    append_line(run_copy / "guard.jsonl", {
        "schema": 1, "time": "t", "step": 150, "detector": "loss_spike", "evidence": {},
        "action": "alert", "outcome": "alerted", "message": "<img src=x onerror=alert(2)>"})
    html = build_report(run_copy).read_text()
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert external_references(html) == []


def test_an_sgd_run_says_why_it_has_no_accumulator(tmp_path: Path) -> None:
    run = make_run(tmp_path / "sgd", steps=40, optimizer="sgd", nan_step=None,
                   checkpoint_every=1000)
    html = build_report(run).read_text()
    found = sections(html)
    assert "<svg" not in found["accumulator"]
    assert '<p class="empty">SGD keeps no accumulator' in found["accumulator"]
    assert "<svg" in found["effective-lr"]  # SGD's effective lr is its lr
    assert "No guard events: the guard took no action" in found["timeline"]
    assert "No checkpoint was committed" in found["timeline"]
    for sid in SECTION_IDS:
        assert "<svg" in found[sid] or 'class="empty"' in found[sid] or sid == "config", sid


def _minimal_run(run: Path, steps: int = 10) -> Path:
    run.mkdir()
    for step in range(1, steps + 1):
        append_line(run / "metrics.jsonl", {"schema": 1, "step": step, "wall_time": 100.0 + step,
                                            "group": "all", "tiers": ["log"],
                                            "metrics": {"loss": 1.0 / step}})
    return run


def test_a_section_without_data_explains_itself_instead_of_a_blank_plot(tmp_path: Path) -> None:
    """A run killed early: a few losses, nothing else. Never an empty plot."""
    html = build_report(_minimal_run(tmp_path / "early")).read_text()
    found = sections(html)
    assert list(found) == SECTION_IDS
    assert "<svg" in found["loss"]
    for sid in ("effective-lr", "accumulator", "grad-norm", "update-ratio", "throughput"):
        assert "<svg" not in found[sid], sid
        assert re.search(r'<p class="empty">\w', found[sid]), sid
    assert '<p class="empty">No guard events: guard.jsonl is absent' in found["timeline"]
    assert "config.toml is absent" in found["config"]
    assert '<span class="status status-info" id="status">running</span>' in html
    assert "Not in the run directory: events.jsonl, guard.jsonl, checkpoints" in html


def test_a_hybrid_optimizer_without_schema_gets_its_lr_plotted_and_a_reason(
        tmp_path: Path) -> None:
    run = _minimal_run(tmp_path / "hybrid")
    for step in range(1, 11):
        for group in ("embeddings", "dense"):
            append_line(run / "metrics.jsonl", {"schema": 1, "step": step, "wall_time": 1.0,
                                                "group": group, "tiers": ["step", "sampled"],
                                                "metrics": {"lr": 0.1, "update_ratio": 1e-3}})
    append_line(run / "events.jsonl", {"time": "t", "wall_time": 1.0, "step": 0,
                                       "event": "start", "workload": "ctr",
                                       "optimizer": {"name": "hybrid",
                                                     "embeddings": {"name": "rowwise_adagrad"},
                                                     "dense": {"name": "adamw"}}})
    html = build_report(run).read_text()
    found = sections(html)
    assert "hybrid (embeddings: rowwise_adagrad, dense: adamw)" in html
    assert "Hybrid optimizer, which has no state schema" in found["effective-lr"]
    assert "<svg" in found["effective-lr"]  # the scheduled lr
    assert "<svg" in found["update-ratio"]


def _long_run(run: Path, steps: int, groups: int) -> Path:
    """A synthetic long run with the recorder's cadences: every step, every 10, every 100."""
    run.mkdir()
    lines = []
    for step in range(1, steps + 1):
        metrics = {"loss": 2.0 / math.log(step + 2) + (step * 7919 % 101) / 1000,
                   "grad_norm": 1.0 / math.sqrt(step), "step_time": 0.01 + step % 7 / 1000}
        lines.append(json.dumps({"schema": 1, "step": step, "wall_time": step / 100,
                                 "group": "all", "tiers": ["step"], "metrics": metrics}))
        if step % 10 == 0:
            for g in range(groups):
                x = 0.1 / math.sqrt(step) * (g + 1)
                dist = dict(zip(("min", "p01", "p10", "p50", "p90", "p99", "max"),
                                (x / 9, x / 5, x / 2, x, 2 * x, 5 * x, 9 * x), strict=True))
                m = {"lr": 0.1, "effective_lr": dist, "accumulator": dist,
                     "update_ratio": 1e-3 / math.sqrt(step) * (1 + step % 13 / 13),
                     "grad_norm_estimate": 1.0 / math.sqrt(step)}
                if step % 100 == 0:
                    m.update(accumulator_mean=step * 1e-3, accumulator_max=step * 5e-3,
                             grad_norm=1.1 / math.sqrt(step))
                lines.append(json.dumps({"schema": 1, "step": step, "wall_time": step / 100,
                                         "group": f"group{g}", "tiers": ["step", "sampled"],
                                         "metrics": m}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    guard = [json.dumps({"schema": 1, "time": "t", "step": s, "detector": "loss_spike",
                         "evidence": {}, "action": "skip", "outcome": "skipped",
                         "message": "spike"}) for s in range(500, steps, 997)]
    (run / "guard.jsonl").write_text("\n".join(guard) + "\n")
    return run


def test_a_100k_step_run_is_downsampled_to_a_few_megabytes(tmp_path: Path) -> None:
    run = _long_run(tmp_path / "long", steps=100_000, groups=10)
    started = time.perf_counter()
    html = build_report(run).read_text()
    seconds = time.perf_counter() - started
    assert len(html) < 3_000_000, len(html)
    found = sections(html)
    for sid in PLOTTED:
        assert "<svg" in found[sid], sid
    # thinned: no path of the page has more than a few thousand vertices
    longest = max(len(re.findall(r"[LM] ", d)) for d in re.findall(r' d="([^"]*)"', html))
    assert longest <= 2 * 1000 + 10, longest
    assert len(table(html, "guard-events")) == 100
    print(f"100k steps x 10 groups: {len(html) / 1e6:.2f} MB in {seconds:.1f} s")


@pytest.mark.parametrize("groups", [1, 10])
def test_per_group_plots_have_one_panel_or_line_per_group(tmp_path: Path, groups: int) -> None:
    html = build_report(_long_run(tmp_path / "g", steps=400, groups=groups)).read_text()
    found = sections(html)
    for g in range(groups):
        label = f">group{g}<"
        assert label in found["effective-lr"] and label in found["update-ratio"], g
