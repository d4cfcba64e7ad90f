"""The detectors are pure functions of recent history: each behaviour on its own."""

from __future__ import annotations

import math
import statistics

import pytest

from gradguard.guard import detectors as det


def test_upper_bound_is_mean_plus_k_sigma_of_the_finite_values() -> None:
    history = [1.0, 2.0, 3.0, math.nan, 4.0, math.inf, 5.0]
    threshold, evidence = det.upper_bound(history, sigmas=2.0, warmup=3)
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert threshold == pytest.approx(3.0 + 2.0 * statistics.pstdev(values))
    assert evidence["window"] == 5 and evidence["method"] == "meanstd"


def test_upper_bound_mad_ignores_earlier_outliers() -> None:
    history = [1.0] * 10 + [1.1] * 10 + [1000.0]
    mad_threshold, _ = det.upper_bound(history, sigmas=6.0, warmup=5,
                                       method="mad")
    mean_threshold, _ = det.upper_bound(history, sigmas=6.0, warmup=5)
    assert mad_threshold < 2.0 < mean_threshold


def test_upper_bound_waits_for_warmup_and_refuses_unknown_methods() -> None:
    assert det.upper_bound([1.0, 2.0, math.nan], sigmas=1.0, warmup=3) is None
    with pytest.raises(ValueError, match="allowed are meanstd, mad"):
        det.upper_bound([1.0, 2.0, 3.0], sigmas=1.0, warmup=1, method="max")


def test_loss_spike_fires_above_the_bound_only_after_warmup() -> None:
    history = [2.0 + 0.01 * math.sin(i) for i in range(30)]
    assert det.loss_spike(2.01, history) is None
    spike = det.loss_spike(3.0, history)
    assert spike is not None and spike.detector == "loss_spike"
    assert spike.evidence["loss"] == 3.0 and spike.evidence["threshold"] < 3.0
    assert det.loss_spike(3.0, history[:5]) is None  # still warming up
    assert det.loss_spike(math.nan, history) is None  # non-finite is another detector's job


def test_grad_spike_looks_at_the_gradient_norm() -> None:
    history = [1.0 + 0.1 * (i % 3) for i in range(40)]
    found = det.grad_spike(5.0, history, sigmas=6.0)
    assert found is not None and found.evidence["grad_norm"] == 5.0


def test_nonfinite_names_what_is_not_finite() -> None:
    assert det.nonfinite(1.0, 2.0) is None
    found = det.nonfinite(1.0, math.inf, nonfinite_gradients=3)
    assert found is not None and "gradient norm" in found.message
    assert found.evidence["nonfinite_gradients"] == 3
    loss_only = det.nonfinite(math.nan, 1.0)
    assert loss_only is not None and loss_only.message.startswith("non-finite loss ")
    assert det.nonfinite(None, None) is None


def test_divergence_compares_window_medians() -> None:
    falling = [10.0 / (1 + i) for i in range(200)]
    assert det.divergence(falling, window=50) is None
    rising = falling + [0.5 + 0.02 * i for i in range(50)]
    found = det.divergence(rising, window=50, rise=1.0)
    assert found is not None and found.evidence["median_loss"] > 2 * found.evidence[
        "best_median_loss"]
    assert det.divergence(rising[-60:], window=50) is None  # one window: nothing to compare


def test_divergence_near_zero_must_give_back_part_of_the_progress() -> None:
    """From 2.3 to 0.011, then 0.025: more than doubled, yet 0.6% of the progress: noise."""
    losses = [2.3] * 50 + [0.011] * 50 + [0.025] * 50
    assert det.divergence(losses, window=50, rise=1.0) is not None  # doubling alone would fire
    assert det.divergence(losses, window=50, rise=1.0, start=2.3, regress=0.1) is None
    back = [2.3] * 50 + [0.011] * 50 + [0.5] * 50                   # gave back 21%: diverging
    found = det.divergence(back, window=50, rise=1.0, start=2.3, regress=0.1)
    assert found is not None and found.evidence["start_median_loss"] == 2.3


def test_divergence_ignores_isolated_spikes() -> None:
    losses = [1.0] * 100
    losses[-10] = 1e6
    assert det.divergence(losses, window=50) is None


def test_plateau_fires_when_no_recent_value_beats_the_best() -> None:
    assert det.plateau([5, 4, 3, 2, 1, 0.5], patience=3) is None
    found = det.plateau([5, 4, 3, 3, 3.1, 3.05], patience=3)
    assert found is not None and found.evidence["best"] == 3
    assert det.plateau([0.1, 0.2, 0.3, 0.4], patience=2, mode="max") is None
    assert det.plateau([0.4, 0.3, 0.2, 0.35], patience=2, mode="max") is not None


def test_relative_improvement_uses_quarter_medians() -> None:
    assert det.relative_improvement([4.0, 4.0, 2.0, 2.0]) == pytest.approx(0.5)
    assert det.relative_improvement([1.0, 2.0]) is None


def test_starvation_needs_tiny_updates_and_a_stalled_loss() -> None:
    tiny, stalled = [1e-6] * 10, [1.0] * 40
    found = det.starvation(tiny, stalled, max_update_ratio=1e-5, min_improvement=0.01,
                           effective_lrs=[0.1, 0.01])
    assert found is not None and found.evidence["effective_lr_last"] == 0.01
    assert det.starvation([1e-6] * 9 + [1e-4], stalled, max_update_ratio=1e-5) is None
    falling = [1.0 - 0.02 * i for i in range(40)]
    assert det.starvation(tiny, falling, max_update_ratio=1e-5, min_improvement=0.01) is None
    assert det.starvation(tiny, falling, max_update_ratio=1e-5, min_improvement=None)
    assert det.starvation([], stalled) is None
    assert det.starvation([math.nan] * 3, stalled) is None


def test_accumulator_risk_flags_overflow_and_underflow() -> None:
    safe = det.AccumulatorStats("group0.exp_avg_sq", "float16", 100.0, 0.0)
    assert det.accumulator_risk([safe]) is None
    near_max = det.AccumulatorStats("group0.sum", "float16", 30000.0, 0.0)
    found = det.accumulator_risk([near_max], overflow_fraction=0.1)
    assert found is not None and "group0.sum (float16) reaches 3e+04" in found.message
    flushed = det.AccumulatorStats("group0.exp_avg_sq", "bfloat16", 1.0, 0.2)
    found = det.accumulator_risk([flushed])
    assert found is not None and found.evidence["group0.exp_avg_sq.tiny_fraction"] == 0.2
    assert det.accumulator_risk([det.AccumulatorStats("s", "float16", math.inf, 0.0)])


def test_overfitting_needs_eval_worsening_while_training_improves() -> None:
    evals, train = [1.0, 0.9, 0.95, 1.0, 1.1], [2.0, 1.8, 1.6, 1.4, 1.2]
    found = det.overfitting(evals, train, patience=3)
    assert found is not None and found.evidence["eval_now"] == 1.1
    assert det.overfitting(evals, [2.0, 1.8, 1.9, 2.0, 2.1], patience=3) is None
    assert det.overfitting([1.0, 0.9, 0.8, 0.7], [2, 1.8, 1.6, 1.4], patience=3) is None
