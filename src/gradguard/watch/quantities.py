"""Quantities: the statistics the recorder computes, as plain functions of tensors.

Two kinds, matching the recorder's tiers:

* **sampled** statistics of a fixed-size coordinate sample (see
  :mod:`gradguard.watch.sampling`): weighted quantiles, scaled sums of squares.
  They equal the exact statistic when the sample covers every tensor;
* **exact** full-tensor reductions: norms, sums, maxima, non-finite counts,
  bytes. One fused pass where torch has one (``torch._foreach_norm``).

Nothing here knows about optimizers, cadences or sinks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

QUANTILES: tuple[tuple[str, float], ...] = (
    ("min", 0.0),
    ("p01", 0.01),
    ("p10", 0.10),
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("max", 1.0),
)
"""The keys of every distribution and the probability each stands for."""


def quantiles(values: Tensor, weights: Tensor | None = None) -> dict[str, float]:
    """min, p01, p10, p50, p90, p99 and max of ``values`` (1-D), optionally weighted.

    Quantiles are the inverse of the (weighted) empirical distribution
    function: the q-quantile is the smallest value whose cumulative weight is
    at least ``q`` times the total (numpy's ``method="inverted_cdf"``); min and
    max are the extremes. No interpolation, so every reported value is one of
    the values. NaN sorts last: a NaN shows up in ``max`` first.
    """
    if values.numel() == 0:
        raise ValueError("quantiles of an empty tensor")
    values = values.detach().to(torch.float64)
    if values.device.type == "cpu":  # numpy: several times faster at these sizes
        array = values.numpy()
        order = np.argsort(array)
        ordered = array[order]
        cumulative = (np.arange(1, array.size + 1, dtype=np.float64) if weights is None
                      else np.cumsum(weights.detach().to(torch.float64).numpy()[order]))
        positions = np.searchsorted(cumulative, _PROBABILITIES * cumulative[-1] * _SLACK)
        picked = ordered[np.minimum(positions, array.size - 1)].tolist()
    else:
        ordered_t, order_t = torch.sort(values)
        cumulative_t = (torch.arange(1, values.numel() + 1, dtype=torch.float64,
                                     device=values.device) if weights is None
                        else torch.cumsum(weights.to(torch.float64)[order_t], 0))
        targets = torch.tensor(_PROBABILITIES, device=values.device) * cumulative_t[-1] * _SLACK
        positions_t = torch.searchsorted(cumulative_t, targets).clamp_(max=values.numel() - 1)
        picked = ordered_t[positions_t].tolist()
        ordered = ordered_t.cpu().numpy()[[0, -1]]
    picked[0], picked[-1] = float(ordered[0]), float(ordered[-1])
    return dict(zip(_NAMES, picked, strict=True))


_NAMES = tuple(name for name, _ in QUANTILES)
_PROBABILITIES = np.array([q for _, q in QUANTILES], dtype=np.float64)
# The smallest position whose cumulative weight reaches q * total; the relative
# slack absorbs rounding in q * total (0.29 * 100 = 28.999999999999996).
_SLACK = 1 - 1e-12


def scaled_sum_of_squares(values: Tensor, weight: float) -> Tensor:
    """``weight * sum(values**2)`` in float64: a sampled estimate of a tensor's squared norm."""
    return values.to(torch.float64).square().sum() * weight


def sum_of_squares(tensors: Sequence[Tensor]) -> float:
    """Exact ``sum(t**2)`` over all elements of all ``tensors`` (one fused pass)."""
    return sum(n * n for n in norms(tensors))


def norms(tensors: Sequence[Tensor], ord: float = 2.0) -> list[float]:
    """The ``ord``-norm of each tensor (exact), as Python floats in float64."""
    dense = [t.detach() for t in tensors if t.numel() > 0]
    if not dense:
        return []
    result: Sequence[Tensor] = torch._foreach_norm(dense, ord)
    # one read-back per device: optimizer state may mix devices (a CPU step counter
    # next to CUDA moments), and torch.stack takes the tensors of one device only
    by_device: dict[torch.device, list[int]] = {}
    for i, r in enumerate(result):
        by_device.setdefault(r.device, []).append(i)
    values = [0.0] * len(result)
    for run in by_device.values():
        stacked = torch.stack([result[i].to(torch.float64) for i in run]).tolist()
        for i, v in zip(run, stacked, strict=True):
            values[i] = v
    return values


def count_nonfinite(tensors: Iterable[Tensor], norms_hint: Sequence[float] | None = None) -> int:
    """Exact number of NaN or infinite elements in ``tensors``.

    A finite norm proves a tensor finite (a NaN or infinity anywhere makes its
    norm NaN or infinite), so with ``norms_hint`` only tensors whose norm is not
    finite are scanned element by element.
    """
    count = 0
    for i, t in enumerate(tensors):
        if not t.is_floating_point() and not t.is_complex():
            continue
        if norms_hint is not None and math.isfinite(norms_hint[i]):
            continue
        values = t.coalesce().values() if t.is_sparse else t
        count += int((~torch.isfinite(values)).sum().item())
    return count


def state_bytes(values: Iterable[object]) -> int:
    """Bytes held by the tensors among ``values`` (an optimizer state entry's values)."""
    total = 0
    for v in values:
        if isinstance(v, Tensor):
            total += v.numel() * v.element_size()
    return total


def row_digest(table: Tensor, projection: Tensor) -> Tensor:
    """One number per row of a 2-D table that changes whenever the row changes.

    The rows projected on a fixed random vector: a row that changes keeps its
    digest only if the change is orthogonal to the projection, which has
    probability zero. Rows of NaN compare unequal to themselves, so count as
    changed.
    """
    rows = table.detach().reshape(table.shape[0], -1)
    if rows.dtype != projection.dtype:
        rows = rows.to(projection.dtype)
    return rows @ projection
