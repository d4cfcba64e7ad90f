"""Declarative hyperparameter rules.

Each optimizer class lists a rule per hyperparameter; the base class checks
every parameter group against them (at construction and in
``add_param_group``), so a bad value is reported with the argument's name, the
value given and what is allowed, whichever way it reached the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class Rule:
    """A constraint on one hyperparameter."""

    def check(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _as_real(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r} "
                         f"({type(value).__name__})")
    return float(value)


@dataclass(frozen=True)
class Interval(Rule):
    """A finite real number in ``[low, high]``; either end may be open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def check(self, name: str, value: Any) -> None:
        v = _as_real(name, value)
        if not self.contains(v):
            raise ValueError(f"invalid {name}={value!r}: allowed is a finite number in "
                             f"{self.describe()}")

    def describe(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


NON_NEGATIVE = Interval(0.0)
POSITIVE = Interval(0.0, low_open=True)
UNIT_HALF_OPEN = Interval(0.0, 1.0, high_open=True)  # [0, 1)
UNIT_CLOSED = Interval(0.0, 1.0)  # [0, 1]


@dataclass(frozen=True)
class Pair(Rule):
    """A pair such as ``betas=(beta1, beta2)``, each element with its own rule."""

    first: Rule
    second: Rule

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise ValueError(f"{name} must be a pair of numbers, got {value!r}")
        self.first.check(f"{name}[0]", value[0])
        self.second.check(f"{name}[1]", value[1])

    def describe(self) -> str:
        return f"({self.first.describe()}, {self.second.describe()})"


@dataclass(frozen=True)
class Flag(Rule):
    """A ``bool``."""

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")

    def describe(self) -> str:
        return "True or False"


FLAG = Flag()


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of values."""

    choices: tuple[Any, ...]

    def check(self, name: str, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"invalid {name}={value!r}: allowed are "
                             + ", ".join(repr(c) for c in self.choices))

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)
