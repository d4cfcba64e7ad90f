"""Shared pieces of the recorder tests: an in-memory sink, small problems, exact references."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradguard.watch import QUANTILES, Record, Sink

SHAPES: tuple[tuple[int, ...], ...] = ((5, 3), (7,), (2, 2, 4))


class ListSink(Sink):
    """Keeps every record, and the config it was started with."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.config: dict[str, str] = {}
        self.closed = False

    def start(self, config: Any) -> None:
        self.config = dict(config)

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        self.closed = True

    def find(self, step: int, group: str = "default") -> Record:
        """The hook's record of ``step`` for ``group``."""
        matches = [r for r in self.records if r.step == step and r.group == group
                   and "step" in r.tiers and "log" not in r.tiers]
        assert matches, f"no record for step {step}, group {group!r}"
        return matches[-1]


def make_params(seed: int = 0, shapes: Sequence[tuple[int, ...]] = SHAPES,
                dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def set_grads(params: Sequence[Tensor], step: int, seed: int = 0) -> None:
    """Deterministic gradients depending on the parameters (so state and params interact)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.grad = 0.5 * p.detach() + noise


def exact_quantiles(values: Tensor | np.ndarray) -> dict[str, float]:
    """min, p01, ..., max by numpy's inverted-CDF definition."""
    array = values.detach().double().numpy() if isinstance(values, Tensor) else values
    qs = [q for _, q in QUANTILES]
    result = np.quantile(array.ravel(), qs, method="inverted_cdf")
    return {name: float(x) for (name, _), x in zip(QUANTILES, result, strict=True)}


def assert_distribution_equal(actual: Any, expected: dict[str, float],
                              rtol: float = 1e-12) -> None:
    assert isinstance(actual, dict), actual
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=0, err_msg=key)
