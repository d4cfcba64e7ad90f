"""Quantities equal their exact definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.watch import quantiles
from gradguard.watch.quantities import (
    count_nonfinite,
    norms,
    row_digest,
    state_bytes,
    sum_of_squares,
)

from .helpers import assert_distribution_equal, exact_quantiles


@pytest.mark.parametrize("n", [1, 2, 7, 99, 100, 101, 1000, 4321])
def test_quantiles_equal_numpy_inverted_cdf(n: int) -> None:
    values = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert_distribution_equal(quantiles(values), exact_quantiles(values), rtol=0)


def test_quantiles_with_ties_equal_numpy() -> None:
    values = torch.tensor([3.0, 1.0, 1.0, 2.0, 2.0, 2.0, 5.0] * 30, dtype=torch.float64)
    assert_distribution_equal(quantiles(values), exact_quantiles(values), rtol=0)


def test_integer_weights_equal_repeating_the_values() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, dtype=torch.float64, generator=gen)
    weights = torch.randint(1, 6, (50,), generator=gen).double()
    repeated = values.repeat_interleave(weights.long())
    assert_distribution_equal(quantiles(values, weights), exact_quantiles(repeated), rtol=0)


def test_nan_shows_in_the_maximum() -> None:
    result = quantiles(torch.tensor([1.0, float("nan"), 2.0, 3.0]))
    assert result["min"] == 1.0 and math.isnan(result["max"])


def test_quantiles_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        quantiles(torch.zeros(0))


def test_norms_and_sum_of_squares_are_exact() -> None:
    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
               torch.randn(2, 2, dtype=torch.float64)[:, :1]]  # a non-contiguous one too
    expected = [float(t.norm()) for t in tensors]
    np.testing.assert_allclose(norms(tensors), expected, rtol=1e-14)
    assert sum_of_squares(tensors) == pytest.approx(sum(float((t**2).sum()) for t in tensors),
                                                    rel=1e-14)
    assert norms([]) == []


def test_count_nonfinite_is_exact_with_and_without_norm_hints() -> None:
    a = torch.ones(10)
    b = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    c = torch.tensor([1e30, 1e30])  # finite, but its float32 norm overflows to inf
    tensors = [a, b, c]
    assert count_nonfinite(tensors) == 3
    assert count_nonfinite(tensors, norms(tensors)) == 3
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([float("nan"), 1.0]),
                                     (4,), check_invariants=True)
    assert count_nonfinite([sparse]) == 1
    assert count_nonfinite([torch.arange(3)]) == 0  # integer tensors hold no NaN


def test_state_bytes_counts_tensors_only() -> None:
    state = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(10, dtype=torch.float64),
             "other": 5}
    assert state_bytes(state.values()) == 4 + 80


def test_row_digest_changes_exactly_for_changed_rows() -> None:
    table = torch.randn(100, 8)
    projection = torch.randn(8)
    before = row_digest(table, projection)
    table[[3, 50, 99]] += torch.randn(3, 8)
    table[7, 2] = float("nan")
    changed = (row_digest(table, projection) != before).nonzero().reshape(-1).tolist()
    assert changed == [3, 7, 50, 99]
