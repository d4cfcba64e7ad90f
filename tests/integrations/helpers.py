"""Small models and data for the integration tests (CPU, one thread, a few dozen steps)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def poison(param: Tensor) -> None:
    """Put a NaN into the gradient of ``param`` (the injected failure)."""
    assert param.grad is not None
    param.grad.view(-1)[0] = math.nan


def snapshot(params: Iterable[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def same(a: Iterable[Tensor], b: Iterable[Tensor]) -> bool:
    """Bit-for-bit equality of two parameter lists."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
