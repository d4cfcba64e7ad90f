"""Statistics over seeds: intervals, tests and the verdicts in words."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from gradguard.compare import stats


def test_describe_gives_the_student_t_interval() -> None:
    values = [0.91, 0.93, 0.95, 0.90]
    d = stats.describe(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                               scale=sps.sem(values))
    assert d["n"] == 4 and d["mean"] == pytest.approx(np.mean(values))
    assert d["std"] == pytest.approx(np.std(values, ddof=1))
    assert (d["low"], d["high"]) == (pytest.approx(low), pytest.approx(high))


def test_describe_counts_nonfinite_values_apart_and_needs_two_for_an_interval() -> None:
    d = stats.describe([0.5, math.nan, None])
    assert d["n"] == 1 and d["n_nonfinite"] == 2 and d["mean"] == 0.5
    assert d["low"] is None and d["high"] is None


def test_holm_adjusts_step_down_and_keeps_order() -> None:
    adjusted = stats.holm([0.01, 0.04, 0.03, None])
    # sorted: 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06, 0.04)=0.06
    assert adjusted == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]


def test_welch_paired_and_mann_whitney_are_scipy_s() -> None:
    a, b = [1.0, 1.2, 0.9, 1.1], [0.7, 0.8, 0.75, 0.9]
    assert stats.welch(a, b)[1] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert stats.paired(a, b)[1] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert stats.mann_whitney(a, b)[1] == pytest.approx(
        sps.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def test_constant_sides_give_a_decision_instead_of_nan() -> None:
    assert stats.welch([1.0, 1.0], [1.0, 1.0])[1] == 1.0
    assert stats.welch([1.0, 1.0], [2.0, 2.0])[1] == 0.0
    assert stats.paired([1.0, 2.0], [0.5, 1.5])[1] == 0.0
    assert stats.hedges_g([1.0, 1.0], [2.0, 2.0]) is None


def test_hedges_g_has_the_small_sample_correction() -> None:
    a, b = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    assert stats.hedges_g(a, b) == pytest.approx(-1.0 * (1 - 3 / (4 * 6 - 9)))


def test_verdict_names_the_better_side_in_the_metric_direction() -> None:
    tests = stats.compare_all({"good": [0.10, 0.11, 0.12], "bad": [0.50, 0.52, 0.49]},
                              metric="final loss", mode="min",
                              seeds={"good": [0, 1, 2], "bad": [0, 1, 2]})
    (test,) = tests
    assert test["better"] == "good" and test["significant"] and test["test"] == "paired"
    assert test["verdict"].startswith("good is better than bad on final loss")
    assert "paired t-test over 3 seeds p =" in test["verdict"]
    assert "Hedges' g" in test["verdict"]


def test_verdict_says_no_significant_difference_when_the_seeds_overlap() -> None:
    (test,) = stats.compare_all({"a": [0.90, 0.95, 0.86], "b": [0.91, 0.86, 0.93]},
                                metric="final accuracy", mode="max")
    assert not test["significant"] and test["test"] == "welch"
    assert test["verdict"].startswith("no significant difference between a and b")


def test_verdict_refuses_to_test_one_seed() -> None:
    (test,) = stats.compare_all({"a": [0.9], "b": [0.8]}, metric="m", mode="max")
    assert "too few seeds" in test["verdict"] and not test["significant"]


def test_holm_is_applied_over_the_family_of_pairs() -> None:
    tests = stats.compare_all({"a": [1.0, 1.1, 1.2], "b": [1.5, 1.6, 1.55],
                               "c": [1.0, 1.05, 1.21]}, metric="m", mode="min")
    assert len(tests) == 3
    raw = [t["welch_p"] for t in tests]
    assert [t["welch_p_holm"] for t in tests] == [pytest.approx(p) for p in stats.holm(raw)]
    assert all("after Holm's adjustment over 3 comparisons" in t["verdict"] for t in tests)
