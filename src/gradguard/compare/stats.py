"""Statistics over seeds: t-intervals, pairwise tests and their verdicts in words.

Everything here is a function of plain lists of floats, so it can be checked
by hand and reused outside :mod:`gradguard.compare`:

* :func:`describe`: mean, sample standard deviation and the two-sided 95%
  Student-t interval ``mean ± t(0.975, n-1) · s / √n`` (``scipy.stats.t``).
* :func:`pairwise`: Welch's unequal-variance t-test
  (``scipy.stats.ttest_ind(equal_var=False)``), the Mann-Whitney U test
  (``scipy.stats.mannwhitneyu``, two-sided), the paired t-test over seeds both
  sides ran (``scipy.stats.ttest_rel``: the same seed is the same data and
  initialisation, so pairing removes that variation) and Hedges' g (Cohen's d
  with the small-sample correction ``1 - 3 / (4 (n_a + n_b) - 9)``), and a
  sentence saying which is better in the metric's direction and how sure that is.
* :func:`holm`: Holm's step-down adjustment of a family of p-values (the
  pairwise tests of k variants are k(k-1)/2 tests of one question).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

Mode = Literal["min", "max"]

ALPHA = 0.05
"""Significance level of the verdicts (two-sided, after Holm's adjustment)."""


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def describe(values: Sequence[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """``n``, ``mean``, ``std`` (ddof=1), the t-interval ``low``/``high`` and the ``values``.

    Non-finite and missing values are left out of the statistics and counted in
    ``n_nonfinite``; with fewer than two finite values the interval is None.
    """
    from scipy import stats

    finite = _finite(values)
    n = len(finite)
    out: dict[str, Any] = {"n": n, "n_nonfinite": len(values) - n, "mean": None, "std": None,
                           "low": None, "high": None, "confidence": confidence,
                           "values": [None if v is None else float(v) for v in values]}
    if n == 0:
        return out
    mean = float(np.mean(finite))
    out["mean"] = mean
    if n >= 2:
        std = float(np.std(finite, ddof=1))
        half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
        out.update(std=std, low=mean - half, high=mean + half)
    return out


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Hedges' g of ``a`` minus ``b``: the mean difference in pooled standard deviations.

    None when it is undefined (fewer than two values on a side, or both sides
    constant with different means, where the difference is infinitely many SDs).
    """
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    pooled = math.sqrt(((na - 1) * float(np.var(a, ddof=1)) + (nb - 1) * float(np.var(b, ddof=1)))
                       / (na + nb - 2))
    diff = float(np.mean(a)) - float(np.mean(b))
    if pooled == 0.0:
        return 0.0 if diff == 0.0 else None
    correction = 1.0 - 3.0 / (4.0 * (na + nb) - 9.0)
    return correction * diff / pooled


def magnitude(g: float | None) -> str:
    """Cohen's words for an effect size: negligible (<0.2), small, medium (<0.8), large."""
    if g is None:
        return "undefined"
    size = abs(g)
    if size < 0.2:
        return "negligible"
    if size < 0.5:
        return "small"
    if size < 0.8:
        return "medium"
    return "large"


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (same order; None stays None)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """Welch's t statistic and two-sided p-value; (None, None) with fewer than 2 values a side.

    Both sides constant: p is 1 when the means are equal and 0 when they differ
    (scipy returns NaN there: there is no variance to test against).
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None, None
    if float(np.var(a)) == 0.0 and float(np.var(b)) == 0.0:
        same = float(np.mean(a)) == float(np.mean(b))
        return (0.0 if same else math.copysign(math.inf, float(np.mean(a)) - float(np.mean(b))),
                1.0 if same else 0.0)
    with warnings.catch_warnings():  # near-constant samples: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """The paired t statistic and two-sided p of ``a[i] - b[i]`` (``scipy.stats.ttest_rel``).

    (None, None) with fewer than 2 pairs; constant differences give p = 1 when
    they are all zero and p = 0 otherwise (no variance to test against).
    """
    from scipy import stats

    if len(a) < 2 or len(a) != len(b):
        return None, None
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if float(np.var(diffs)) == 0.0:
        same = float(diffs[0]) == 0.0
        return (0.0 if same else math.copysign(math.inf, float(diffs[0])), 1.0 if same else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(a, b)
    return float(result.statistic), float(result.pvalue)


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """The Mann-Whitney U statistic of ``a`` and the two-sided p-value (None if a side is empty).

    With 3 seeds a side and no ties the smallest possible two-sided p is 0.1: a
    rank test cannot be significant at 0.05 with so few seeds, whatever the data.
    """
    from scipy import stats

    if not a or not b:
        return None, None
    if len(set(a) | set(b)) == 1:
        return len(a) * len(b) / 2.0, 1.0
    result = stats.mannwhitneyu(a, b, alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def pairwise(name_a: str, values_a: Sequence[float | None], name_b: str,
             values_b: Sequence[float | None], *, metric: str, mode: Mode,
             seeds_a: Sequence[int] | None = None, seeds_b: Sequence[int] | None = None
             ) -> dict[str, Any]:
    """Welch, Mann-Whitney and (with seeds) paired tests of ``a`` against ``b``; effect size.

    ``difference`` and ``hedges_g`` are ``a - b``; ``better`` names the side whose
    mean is better in ``mode``. With ``seeds_a``/``seeds_b`` (the seed of each
    value), runs of the same seed are paired (same data and initialisation in
    gradguard's workloads) and ``paired_p`` is the paired t-test over the seeds
    both sides have finite values for. The verdict is written by :func:`verdict`
    once the family's Holm-adjusted p-values are known (:func:`compare_all`).
    """
    a, b = _finite(values_a), _finite(values_b)
    t, p = welch(a, b)
    u, p_mw = mann_whitney(a, b)
    mean_a = float(np.mean(a)) if a else None
    mean_b = float(np.mean(b)) if b else None
    diff = mean_a - mean_b if mean_a is not None and mean_b is not None else None
    better = None
    if diff is not None and diff != 0.0:
        better = name_a if (diff > 0) == (mode == "max") else name_b
    pairs: list[tuple[float, float]] = []
    if seeds_a is not None and seeds_b is not None:
        by_seed = {s: v for s, v in zip(seeds_b, values_b, strict=True)
                   if v is not None and math.isfinite(v)}
        pairs = [(float(v), float(by_seed[s])) for s, v in zip(seeds_a, values_a, strict=True)
                 if v is not None and math.isfinite(v) and s in by_seed]
    t_rel, p_rel = paired([x for x, _ in pairs], [y for _, y in pairs])
    return {"a": name_a, "b": name_b, "metric": metric, "mode": mode, "n_a": len(a),
            "n_b": len(b), "mean_a": mean_a, "mean_b": mean_b, "difference": diff,
            "hedges_g": hedges_g(a, b), "welch_t": t, "welch_p": p, "mann_whitney_u": u,
            "mann_whitney_p": p_mw, "n_pairs": len(pairs),
            "paired_difference": (float(np.mean([x - y for x, y in pairs])) if pairs else None),
            "paired_t": t_rel, "paired_p": p_rel, "better": better}


def verdict(test: dict[str, Any], *, alpha: float = ALPHA, family: int = 1) -> str:
    """One sentence: which is better on the metric, by how much, and how sure that is.

    The decision uses the paired t-test when the runs pair up by seed (at least 2
    pairs), else Welch's test, Holm-adjusted over the ``family`` of comparisons.
    """
    a, b, metric = test["a"], test["b"], test["metric"]
    if test["n_a"] < 2 or test["n_b"] < 2:
        return (f"{a} vs {b} on {metric}: too few seeds to test (need at least 2 finite values "
                f"each; have {test['n_a']} and {test['n_b']}).")
    g = test["hedges_g"]
    effect = ("infinitely many standard deviations (both sides constant)" if g is None
              else f"Hedges' g = {abs(g):.2f}, a {magnitude(g)} effect")
    use_paired = test.get("paired_p") is not None
    name = f"paired t-test over {test['n_pairs']} seeds" if use_paired else "Welch t-test"
    p = test["paired_p"] if use_paired else test["welch_p"]
    p_adj = test.get("paired_p_holm" if use_paired else "welch_p_holm")
    adjusted = (f", {_p(p_adj)} after Holm's adjustment over {family} comparisons"
                if family > 1 and p_adj is not None else "")
    others = ([f"Welch p = {_p(test['welch_p'])}"] if use_paired else []) + [
        f"Mann-Whitney p = {_p(test['mann_whitney_p'])}"]
    evidence = f"{name} p = {_p(p)}{adjusted}; {', '.join(others)}"
    decisive = p_adj if p_adj is not None else p
    if test["better"] is None:
        return (f"{a} and {b} are tied on {metric}: both mean {test['mean_a']:.6g} "
                f"({evidence}).")
    worse = b if test["better"] == a else a
    best_mean = test["mean_a"] if test["better"] == a else test["mean_b"]
    worse_mean = test["mean_b"] if test["better"] == a else test["mean_a"]
    means = (f"mean {best_mean:.6g} vs {worse_mean:.6g}, difference "
             f"{abs(test['difference']):.3g} ({effect})")
    if decisive is not None and decisive < alpha:
        return (f"{test['better']} is better than {worse} on {metric}: {means}; significant at "
                f"{alpha:g} ({evidence}).")
    return (f"no significant difference between {a} and {b} on {metric}: {test['better']} is "
            f"ahead, {means}, but not significant at {alpha:g} ({evidence}); more seeds would "
            "be needed to tell them apart.")


def compare_all(values: Mapping[str, Sequence[float | None]], *, metric: str, mode: Mode,
                seeds: Mapping[str, Sequence[int]] | None = None,
                alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Every pair of ``values`` (name -> per-seed values): tests, Holm-adjusted p, verdict.

    ``seeds`` (name -> the seed of each value) enables the paired test.
    """
    names = list(values)
    tests = [pairwise(x, values[x], y, values[y], metric=metric, mode=mode,
                      seeds_a=seeds.get(x) if seeds else None,
                      seeds_b=seeds.get(y) if seeds else None)
             for i, x in enumerate(names) for y in names[i + 1:]]
    for key in ("welch_p", "paired_p"):
        for test, adjusted in zip(tests, holm([t[key] for t in tests]), strict=True):
            test[f"{key}_holm"] = adjusted
    for test in tests:
        decisive = test["paired_p_holm"] if test["paired_p"] is not None else test["welch_p_holm"]
        test["test"] = "paired" if test["paired_p"] is not None else "welch"
        test["alpha"] = alpha
        test["significant"] = decisive is not None and decisive < alpha
        test["verdict"] = verdict(test, alpha=alpha, family=len(tests))
    return tests


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1e-4:
        return f"{value:.1e}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if value < 1 else "1"
