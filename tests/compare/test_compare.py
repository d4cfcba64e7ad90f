"""`gradguard compare`: each (optimizer, seed) pair is a run; the summary comes from their files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from gradguard.cli import main
from gradguard.compare import CompareError, CompareResult, parse_variants, run_compare
from gradguard.run import config

from .conftest import TARGET, digits_config, kill_cli_when, metric_series

VARIANTS = ("adagrad", "adam", "sgd")
SEEDS = (0, 1, 2)


def run_dir(result: CompareResult, variant: str, seed: int) -> Path:
    return result.output / "runs" / variant / f"seed-{seed}"


def test_every_optimizer_seed_pair_is_its_own_finished_run(comparison: CompareResult) -> None:
    assert comparison.exit_code == 0 and not comparison.failed
    assert sorted(comparison.ran) == sorted(f"{v} seed {s}" for v in VARIANTS for s in SEEDS)
    for variant in VARIANTS:
        for seed in SEEDS:
            saved = config.tomllib.loads((run_dir(comparison, variant, seed) / "config.toml")
                                         .read_text())
            assert saved["run"]["seed"] == seed
            assert saved["optimizer"]["name"] == variant
            summary = json.loads((run_dir(comparison, variant, seed) / "summary.json")
                                 .read_text())
            assert summary["status"] == "finished" and summary["steps"] == 30
    lrs = {v: config.tomllib.loads((run_dir(comparison, v, 0) / "config.toml").read_text())
           ["optimizer"].get("lr") for v in VARIANTS}
    # adam keeps the base config's lr; adagrad gets its default; sgd the --variant override
    assert lrs == {"adam": 0.01, "adagrad": None, "sgd": 0.1}
    settings = comparison.summary["variants"]["adagrad"]["optimizer_settings"]
    assert settings["lr"] == 0.01 and settings["eps"] == 1e-10


def test_summary_numbers_equal_those_recomputed_from_the_runs_metric_files(
        comparison: CompareResult) -> None:
    saved = json.loads((comparison.output / "summary.json").read_text())
    assert saved["primary_metric"] == "accuracy" and saved["mode"] == "max"
    assert saved["target"] == TARGET
    finals: dict[str, list[float]] = {}
    for variant in VARIANTS:
        result = saved["results"][variant]
        final, best, ttt_steps, ttt_seconds, skips, train_loss = [], [], [], [], 0, []
        for seed in SEEDS:
            rd = run_dir(comparison, variant, seed)
            acc = metric_series(rd, "eval_accuracy")
            final.append(acc[max(acc)])
            best.append(max(acc.values()))
            reached = [s for s in sorted(acc) if acc[s] >= TARGET]
            ttt_steps.append(reached[0] if reached else None)
            events = [json.loads(line) for line in (rd / "events.jsonl").read_text()
                      .splitlines()]
            start = next(e["wall_time"] for e in events if e["event"] == "start")
            ttt_seconds.append(next(e["wall_time"] - start for e in events
                                    if e["event"] == "eval" and e["step"] == reached[0])
                               if reached else None)
            summary = json.loads((rd / "summary.json").read_text())
            skips += summary["guard"]["counts"].get("skip", 0)
            losses = list(metric_series(rd, "loss").values())
            train_loss.append(float(np.mean(losses[-math.ceil(0.1 * len(losses)):])))
        finals[variant] = final
        for key, values in (("final", final), ("best", best), ("train_loss", train_loss)):
            low, high = sps.t.interval(0.95, 2, loc=np.mean(values), scale=sps.sem(values))
            assert result[key]["values"] == pytest.approx(values)
            assert result[key]["mean"] == pytest.approx(np.mean(values))
            assert (result[key]["low"], result[key]["high"]) == (pytest.approx(low),
                                                                 pytest.approx(high))
        ttt = result["time_to_target"]
        assert ttt["steps"]["per_run"] == ttt_steps
        assert ttt["reached"] == sum(s is not None for s in ttt_steps)  # misses kept, not dropped
        assert ttt["seconds"]["per_run"] == [None if s is None else pytest.approx(s)
                                             for s in ttt_seconds]
        assert result["stability"]["skipped_steps"]["total"] == skips
    assert any(s is None for v in VARIANTS
               for s in saved["results"][v]["time_to_target"]["steps"]["per_run"])
    for test in saved["pairwise"]["final"]:
        assert test["test"] == "paired" and test["n_pairs"] == 3
        assert test["paired_p"] == pytest.approx(
            sps.ttest_rel(finals[test["a"]], finals[test["b"]]).pvalue)
        assert test["welch_p"] == pytest.approx(
            sps.ttest_ind(finals[test["a"]], finals[test["b"]], equal_var=False).pvalue)
        assert ("is better than" in test["verdict"]) == test["significant"]


def test_report_is_one_self_contained_page_with_inline_figures(comparison: CompareResult) -> None:
    assert comparison.report == comparison.output / "report.html"
    html = comparison.report.read_text()
    assert html.count("<svg") >= 3  # eval curves, metric vs seconds, effective lr side by side
    assert "<script" not in html and "<link" not in html and " src=" not in html
    assert "adagrad: effective lr" in html and "Pairwise tests" in html
    for test in comparison.summary["pairwise"]["final"]:
        assert test["verdict"].split(":")[0].replace("'", "&#x27;") in html


def test_rerunning_a_finished_compare_redoes_nothing(comparison: CompareResult) -> None:
    summaries = sorted(comparison.output.glob("runs/*/seed-*/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    again = run_compare(digits_config(), optimizers="adagrad,adam,sgd",
                        variants=["sgd:optimizer.lr=0.1"], seeds=3, output=comparison.output,
                        workers=1, target=TARGET, log=None)
    assert again.ran == [] and len(again.reused) == 9
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert again.summary["results"] == comparison.summary["results"]


def test_an_interrupted_compare_resumes_without_redoing_finished_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "digits.toml"
    cfg.write_text(config.dumps(digits_config(steps=60)))
    out = tmp_path / "cmp"
    args = ["compare", str(cfg), "--optimizers", "adam,sgd", "--seeds", "2", "--output",
            str(out)]
    # two worker processes; the whole process group is killed once a run has finished
    kill_cli_when([*args, "--workers", "2", "-q"],
                  lambda: bool(list(out.glob("runs/*/seed-*/summary.json"))),
                  "the compare", "no run finished in time", poll=0.02)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/summary.json")}
    started = [p.parent for p in out.glob("runs/*/seed-*/events.jsonl")
               if not (p.parent / "summary.json").exists()
               and '"event": "start"' in p.read_text()]
    assert 1 <= len(finished) < 4

    assert main([*args, "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"reusing {len(finished)} finished run(s) of 4" in printed
    assert f"training {4 - len(finished)} run(s)" in printed
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in finished.items())
    assert len(list(out.glob("runs/*/seed-*/summary.json"))) == 4
    for run in started:  # an unfinished run is continued in place (--resume), not wiped
        kinds = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text()
                 .splitlines()]
        assert kinds.count("start") == 2 and kinds[-1] == "finished"


def test_variants_combine_optimizer_names_and_named_overrides() -> None:
    found = parse_variants("adam,sgd", ["sgd:optimizer.momentum=0.9", "fast:optimizer.lr=0.1"])
    assert [(v.name, v.optimizer, v.overrides) for v in found] == [
        ("adam", "adam", ()), ("sgd", "sgd", ("optimizer.momentum=0.9",)),
        ("fast", None, ("optimizer.lr=0.1",))]
    data = found[1].apply({"optimizer": {"name": "adam", "lr": 0.01}})
    assert data["optimizer"] == {"name": "sgd", "momentum": 0.9}


@pytest.mark.parametrize("args, message", [
    (["--optimizers", "adam,adamm"], "unknown optimizer 'adamm'"),
    (["--variant", "no-colon"], "write NAME:KEY.PATH=VALUE"),
    (["--optimizers", "adam", "--seeds", "0"], "at least one seed"),
    (["--optimizers", "sgd", "--variant", "sgd:optimizer.betas=[0.9, 0.99]"],
     "sgd has no hyperparameter 'betas'"),
])
def test_bad_input_is_refused_before_anything_trains(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    cfg = tmp_path / "digits.toml"
    cfg.write_text(config.dumps(digits_config()))
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg), "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_run_directory_of_another_config_is_refused(comparison: CompareResult,
                                                      tmp_path: Path) -> None:
    changed = digits_config()
    changed["train"]["batch_size"] = 32
    with pytest.raises(CompareError, match=r"different config \(differs at train.batch_size\)"):
        run_compare(changed, optimizers="adagrad,adam,sgd", variants=["sgd:optimizer.lr=0.1"],
                    seeds=3, output=comparison.output, workers=1, target=TARGET, log=None)
