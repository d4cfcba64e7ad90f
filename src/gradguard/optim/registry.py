"""Optimizer registry: a name for every algorithm, and validated construction.

``create("adamw", model.parameters(), lr=3e-4)`` builds an optimizer by name,
refusing unknown names (with the nearest names suggested) and unknown
hyperparameters (with the allowed ones listed). Values are checked by the
class itself, so every error names the argument, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from .base import Optimizer, ParamsT

_REGISTRY: dict[str, type[Optimizer]] = {}


def register(name: str, cls: type[Optimizer]) -> None:
    """Make ``cls`` available to :func:`create` under ``name`` (lower case)."""
    key = name.lower()
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"optimizer name {name!r} is already registered to "
                         f"{_REGISTRY[key].__qualname__}")
    _REGISTRY[key] = cls


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Optimizer]:
    """The class registered as ``name``; ``ValueError`` with suggestions if none is."""
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint} Available: {', '.join(available())}")
    return _REGISTRY[key]


def hyperparameters(name: str) -> dict[str, Any]:
    """The keyword arguments ``name`` accepts, with their defaults."""
    signature = inspect.signature(get(name).__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[2:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create(name: str, params: ParamsT, **hparams: Any) -> Optimizer:
    """Construct the optimizer registered as ``name`` with validated ``hparams``."""
    cls = get(name)
    allowed = hyperparameters(name)
    for key in hparams:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{cls.__name__} has no hyperparameter {key!r}{hint}; "
                             f"allowed: {', '.join(allowed)}")
    return cls(params, **hparams)


def summary(name: str) -> str:
    """The first line of the class docstring: what the optimizer is, in one line."""
    doc = inspect.getdoc(get(name)) or ""
    return doc.splitlines()[0] if doc else ""
