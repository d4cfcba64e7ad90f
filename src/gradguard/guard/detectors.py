"""Detectors: pure functions of recent history that say whether a failure mode shows.

Each detector takes the value(s) of now and a window of past values as plain
floats and returns a :class:`Detection` (its name, the evidence as numbers, a
sentence for people) or ``None``. They keep no state and touch no tensor: the
:class:`~gradguard.guard.Guard` keeps the history, measures what they need and
decides what to do (``gradguard.guard.policy``). Non-finite values in a history
are ignored: one NaN must not blind a detector for a whole window.

=====================  ==============================================================
detector               fires when
=====================  ==============================================================
``nonfinite``          the loss or the gradient norm is NaN or infinite (F2)
``loss_spike``         the loss is above the robust upper bound of the window (F8)
``grad_spike``         the gradient norm is above the robust upper bound (F2, F8)
``divergence``         the median loss of the last window is far above the best (F8)
``plateau``            no evaluation improved on the best for ``patience`` (F5, F7)
``starvation``         updates are tiny relative to the weights and the loss stalls (F1)
``accumulator_risk``   low-precision optimizer state is near overflow or underflows
``overfitting``        the evaluation metric worsens while the training loss improves (F4)
=====================  ==============================================================

Upper bounds (``method``):

* ``"meanstd"``: mean + k standard deviations of the window, as OLMo-core's
  ``SkipStepOptimizer`` (k = 6 over 128 steps there);
* ``"mad"``: median + k * 1.4826 * MAD (median absolute deviation), which a few
  earlier outliers in the window cannot inflate.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Evidence = dict[str, float | int | str | None]

METHODS: tuple[str, ...] = ("meanstd", "mad")
"""The ways a spike threshold can be computed."""

MAD_TO_SIGMA = 1.4826
"""MAD times this estimates the standard deviation of normally distributed values."""


@dataclass(frozen=True)
class Detection:
    """What a detector found: its name, the numbers behind it, and a sentence."""

    detector: str
    message: str
    evidence: Evidence = field(default_factory=dict)


def finite(values: Sequence[float]) -> list[float]:
    """The finite values of ``values``, in order."""
    return [v for v in values if math.isfinite(v)]


def upper_bound(history: Sequence[float], *, sigmas: float, warmup: int,
                method: str = "meanstd") -> tuple[float, Evidence] | None:
    """The outlier threshold of ``history`` (its finite values), or None during warm-up.

    ``meanstd``: mean + ``sigmas`` * standard deviation (population); ``mad``:
    median + ``sigmas`` * 1.4826 * median absolute deviation. None while fewer
    than ``warmup`` finite values are known.
    """
    values = finite(history)
    if len(values) < max(warmup, 2):
        return None
    if method == "meanstd":
        center = math.fsum(values) / len(values)
        spread = math.sqrt(math.fsum((v - center) ** 2 for v in values) / len(values))
        evidence: Evidence = {"mean": center, "std": spread}
    elif method == "mad":
        center = statistics.median(values)
        spread = MAD_TO_SIGMA * statistics.median(abs(v - center) for v in values)
        evidence = {"median": center, "mad_sigma": spread}
    else:
        raise ValueError(f"invalid method={method!r}: allowed are {', '.join(METHODS)}")
    threshold = center + sigmas * spread
    evidence.update({"threshold": threshold, "sigmas": sigmas, "window": len(values),
                     "method": method})
    return threshold, evidence


def nonfinite(loss: float | None, grad_norm: float | None,
              nonfinite_gradients: int | None = None) -> Detection | None:
    """The loss or the global gradient norm is NaN or infinite.

    A norm that overflows (elements beyond ~1.8e19 in float32) counts as
    non-finite: such a gradient cannot be clipped or applied safely either.
    """
    bad_loss = loss is not None and not math.isfinite(loss)
    bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
    if not (bad_loss or bad_grad):
        return None
    what = " and ".join(name for name, bad in (("loss", bad_loss), ("gradient norm", bad_grad))
                        if bad)
    evidence: Evidence = {"loss": loss, "grad_norm": grad_norm}
    if nonfinite_gradients is not None:
        evidence["nonfinite_gradients"] = nonfinite_gradients
    return Detection("nonfinite", f"non-finite {what} (loss={loss}, grad_norm={grad_norm})",
                     evidence)


def _spike(detector: str, what: str, value: float, history: Sequence[float], *,
           sigmas: float, warmup: int, method: str) -> Detection | None:
    bound = upper_bound(history, sigmas=sigmas, warmup=warmup, method=method)
    if bound is None or not math.isfinite(value):
        return None
    threshold, evidence = bound
    if value <= threshold:
        return None
    evidence = {what: value, **evidence}
    return Detection(detector, f"{what} {value:.6g} above the {method} bound {threshold:.6g} "
                               f"({sigmas:g} sigma over {evidence['window']} steps)", evidence)


def loss_spike(loss: float, history: Sequence[float], *, sigmas: float = 6.0,
               warmup: int = 20, method: str = "meanstd") -> Detection | None:
    """``loss`` is above the upper bound of the recent finite losses (see :func:`upper_bound`)."""
    return _spike("loss_spike", "loss", loss, history, sigmas=sigmas, warmup=warmup,
                  method=method)


def grad_spike(grad_norm: float, history: Sequence[float], *, sigmas: float = 6.0,
               warmup: int = 20, method: str = "meanstd") -> Detection | None:
    """``grad_norm`` is above the upper bound of the recent finite gradient norms."""
    return _spike("grad_spike", "grad_norm", grad_norm, history, sigmas=sigmas, warmup=warmup,
                  method=method)


def _medians(values: Sequence[float], window: int) -> list[float]:
    """Medians of consecutive blocks of ``window`` values, aligned to end with the last."""
    start = len(values) % window
    return [statistics.median(values[i:i + window]) for i in range(start, len(values), window)]


def divergence(losses: Sequence[float], *, window: int = 50, rise: float = 1.0,
               start: float | None = None, regress: float = 0.1) -> Detection | None:
    """A sustained rise: the median of the last ``window`` losses exceeds the best earlier.

    The losses are cut into blocks of ``window`` (the last block ends now); fires
    when the last block's median is above the lowest earlier block median by more
    than ``rise`` times its magnitude (``rise=1``: it doubled) and, when ``start``
    (the median loss of the run's first window) is given and above the best, by at
    least ``regress`` times the progress made (``start - best``): a loss that went
    from 2.3 to 0.011 and wobbles to 0.025 has doubled but given back 0.6% of its
    progress, which is noise near zero, not divergence. Medians ignore isolated
    spikes; that is what ``loss_spike`` is for.
    """
    values = finite(losses)
    medians = _medians(values, window)
    if len(medians) < 2:
        return None
    best, now = min(medians[:-1]), medians[-1]
    if now - best <= rise * max(abs(best), 1e-12):
        return None
    if start is not None and start > best and now - best < regress * (start - best):
        return None
    return Detection("divergence",
                     f"median loss of the last {window} steps {now:.6g} is "
                     f"{now / best if best > 0 else math.inf:.3g}x the best window's {best:.6g}",
                     {"median_loss": now, "best_median_loss": best, "window": window,
                      "rise": rise, "windows": len(medians), "start_median_loss": start,
                      "regress": regress})


def plateau(values: Sequence[float], *, patience: int = 10, min_delta: float = 1e-3,
            mode: str = "min") -> Detection | None:
    """No value of the last ``patience`` improved on the best before them.

    Improvement means better by more than ``min_delta`` times the best's magnitude
    (relative, like ``ReduceLROnPlateau(threshold_mode="rel")``); ``mode`` is
    ``"min"`` (a loss) or ``"max"`` (an accuracy).
    """
    values = finite(values)
    if len(values) <= patience:
        return None
    sign = 1.0 if mode == "min" else -1.0
    best_before = min(sign * v for v in values[:-patience])
    best_recent = min(sign * v for v in values[-patience:])
    if best_recent < best_before - min_delta * abs(best_before):
        return None
    return Detection("plateau",
                     f"no improvement on {sign * best_before:.6g} in the last {patience} "
                     f"evaluations (best of them {sign * best_recent:.6g})",
                     {"best": sign * best_before, "best_recent": sign * best_recent,
                      "patience": patience, "min_delta": min_delta, "mode": mode})


def relative_improvement(losses: Sequence[float]) -> float | None:
    """How much the loss fell over ``losses``: (first quarter's median - last's) / |first's|."""
    values = finite(losses)
    if len(values) < 4:
        return None
    quarter = len(values) // 4
    first, last = statistics.median(values[:quarter]), statistics.median(values[-quarter:])
    return (first - last) / max(abs(first), 1e-12)


def starvation(update_ratios: Sequence[float], losses: Sequence[float], *,
               max_update_ratio: float = 1e-5, min_improvement: float | None = 0.01,
               effective_lrs: Sequence[float] = ()) -> Detection | None:
    """Learning-rate starvation (F1): every update of the window was tiny, and the loss stalls.

    ``update_ratios`` are ``||w_after - w_before|| / ||w_before||`` measured over
    the window; fires when all are below ``max_update_ratio`` and the loss
    improved by less than ``min_improvement`` (relative, see
    :func:`relative_improvement`; None: do not look at the loss). The effective
    learning rates ``||update|| / ||gradient||`` go into the evidence.
    """
    ratios = finite(update_ratios)
    if not ratios or len(ratios) < len(update_ratios) or max(ratios) >= max_update_ratio:
        return None
    improvement = relative_improvement(losses) if min_improvement is not None else None
    if min_improvement is not None and (improvement is None or improvement >= min_improvement):
        return None
    lrs = finite(effective_lrs)
    evidence: Evidence = {"max_update_ratio": max(ratios), "threshold": max_update_ratio,
                          "measurements": len(ratios), "loss_improvement": improvement,
                          "min_improvement": min_improvement}
    if lrs:
        evidence.update({"effective_lr_first": lrs[0], "effective_lr_last": lrs[-1]})
    stalled = ("" if improvement is None
               else f" and the loss improved by {100 * improvement:.3g}% over the window")
    return Detection("starvation",
                     f"every update of the last {len(ratios)} measurements moved the weights by "
                     f"less than {max_update_ratio:g} of their norm (at most {max(ratios):.3g})"
                     f"{stalled}", evidence)


@dataclass(frozen=True)
class AccumulatorStats:
    """One low-precision state tensor, summarised: for :func:`accumulator_risk`."""

    key: str
    dtype: str
    max_abs: float
    tiny_fraction: float
    """Fraction of elements whose magnitude is below the dtype's smallest normal number."""


def accumulator_risk(stats: Sequence[AccumulatorStats], *, overflow_fraction: float = 0.1,
                     underflow_fraction: float = 0.01) -> Detection | None:
    """Low-precision (float16/bfloat16) optimizer state near overflow, or underflowing.

    Overflow risk: a value beyond ``overflow_fraction`` of the dtype's largest
    finite number (one more accumulation may reach inf). Underflow: more than
    ``underflow_fraction`` of the elements below the smallest normal number
    (squared gradients that flush to zero turn eps-sized denominators into huge
    steps).
    """
    worst: list[str] = []
    evidence: Evidence = {}
    for s in stats:
        limit = torch.finfo(getattr(torch, s.dtype)).max
        if not math.isfinite(s.max_abs) or s.max_abs > overflow_fraction * limit:
            worst.append(f"{s.key} ({s.dtype}) reaches {s.max_abs:.3g} of max {limit:.3g}")
            evidence[f"{s.key}.max_abs"] = s.max_abs
        if s.tiny_fraction > underflow_fraction:
            worst.append(f"{100 * s.tiny_fraction:.3g}% of {s.key} ({s.dtype}) "
                         "below the smallest normal number")
            evidence[f"{s.key}.tiny_fraction"] = s.tiny_fraction
    if not worst:
        return None
    evidence.update({"overflow_fraction": overflow_fraction,
                     "underflow_fraction": underflow_fraction})
    return Detection("accumulator_risk", "; ".join(worst), evidence)


def overfitting(evals: Sequence[float], train_losses: Sequence[float], *, patience: int = 3,
                mode: str = "min") -> Detection | None:
    """The evaluation metric got worse ``patience`` times in a row while training improved (F4).

    ``evals`` are the evaluation values in order; ``train_losses`` the training
    loss (a window median) at the same evaluations.
    """
    if len(evals) <= patience or len(train_losses) != len(evals):
        return None
    sign = 1.0 if mode == "min" else -1.0
    recent = [sign * v for v in evals[-patience - 1:]]
    train = train_losses[-patience - 1:]
    worse = all(b > a for a, b in itertools.pairwise(recent))
    if not worse or not train[-1] < train[0]:
        return None
    return Detection("overfitting",
                     f"evaluation metric worsened {patience} times in a row "
                     f"({evals[-patience - 1]:.6g} -> {evals[-1]:.6g}) while the training loss "
                     f"fell ({train[0]:.6g} -> {train[-1]:.6g})",
                     {"eval_before": evals[-patience - 1], "eval_now": evals[-1],
                      "train_before": train[0], "train_now": train[-1], "patience": patience})

