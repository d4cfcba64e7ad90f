"""The workload registry: built-in workloads by name, a user's by import path.

>>> from gradguard.run import workloads
>>> workloads.available()
['ctr', 'digits', 'mnist1d', 'quadratic', 'rosenbrock']
>>> w = workloads.load("quadratic", seed=0, options={"dim": 10, "condition": 1e3})

A name is either a built-in (:data:`BUILTIN`) or an import path
``"package.module:factory"`` naming a callable ``factory(*, seed, **options)``
that returns a :class:`~gradguard.run.workload.Workload` (see :mod:`.user`).
Built-in factories are imported only when looked up, so a workload's
dependencies (scikit-learn for ``digits``, ``mnist1d``) are needed only when
it is used.

Options are the factory's keyword parameters with defaults
(:func:`options` lists them); :func:`load` refuses any other with a
``ValueError`` naming the allowed ones. The small helpers :func:`seeded`,
:func:`cross_entropy_loss` and :func:`classification_metrics` are shared by
the classification workloads and are meant for user factories too.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..workload import Batch, Workload, WorkloadFactory
from . import user

__all__ = [
    "BUILTIN",
    "available",
    "classification_metrics",
    "cross_entropy_loss",
    "describe",
    "factory",
    "load",
    "options",
    "seeded",
]

BUILTIN: dict[str, str] = {
    "ctr": "synthetic click-through-rate data with a known ground truth; embedding model",
    "digits": "scikit-learn's 8x8 handwritten digits (1797 images), MLP classifier",
    "mnist1d": "MNIST-1D (Greydanus 2020), generated locally; logreg, MLP or CNN",
    "quadratic": "convex quadratic 0.5 (x-x*)^T A (x-x*) of chosen dimension and condition number",
    "rosenbrock": "n-dimensional Rosenbrock function from the standard start (-1.2, 1, ...)",
}
"""Built-in workload names and a one-line description of each."""

_BUILTIN_FACTORIES: dict[str, tuple[str, str]] = {
    "ctr": (".ctr", "ctr"),
    "digits": (".digits", "digits"),
    "mnist1d": (".mnist1d", "mnist1d"),
    "quadratic": (".analytic", "quadratic"),
    "rosenbrock": (".analytic", "rosenbrock"),
}


def available() -> list[str]:
    """The built-in workload names, sorted."""
    return sorted(BUILTIN)


def factory(name: str) -> WorkloadFactory:
    """The factory named by ``name``: a built-in name or ``"package.module:factory"``.

    Raises:
        ValueError: unknown built-in name (with the nearest name, the available
            ones and the import-path form), a module that cannot be imported,
            a missing or non-callable attribute.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"workload name must be a non-empty string, got {name!r}; "
                         f"{_naming_help()}")
    name = name.strip()
    if user.is_import_path(name):
        return user.resolve(name)
    if name not in _BUILTIN_FACTORIES:
        close = difflib.get_close_matches(name, list(BUILTIN), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown workload {name!r}.{hint} {_naming_help()}")
    module_name, attribute = _BUILTIN_FACTORIES[name]
    try:
        module = importlib.import_module(module_name, __name__)
    except Exception as exc:
        raise ValueError(f"built-in workload {name!r} cannot be imported "
                         f"({__name__}{module_name}): {type(exc).__name__}: {exc}") from exc
    found: WorkloadFactory | None = getattr(module, attribute, None)
    if not callable(found):
        raise ValueError(f"built-in workload {name!r}: {__name__}{module_name} has no "
                         f"callable {attribute!r}")
    return found


def load(name: str, *, seed: int = 0, options: Mapping[str, Any] | None = None) -> Workload:
    """Build the workload ``name`` with ``seed`` and ``options``.

    Args:
        name: a built-in name (:func:`available`) or ``"package.module:factory"``.
        seed: the run's seed; a factory derives its data split and model
            initialisation from it (same seed, same workload).
        options: keyword options for the factory (a config's
            ``[workload.options]`` table); unknown ones are refused.

    Raises:
        ValueError: see :func:`factory`; an unknown or missing option; a
            factory that does not return a ``Workload``; a factory's own
            ``ValueError`` / ``TypeError`` (prefixed with the workload name).
    """
    fn = factory(name)
    return user.build(name.strip(), fn, seed=seed, options=dict(options or {}))


def describe(name: str) -> str:
    """A one-paragraph summary of the workload: the first paragraph of its factory's docstring."""
    doc = (factory(name).__doc__ or "").strip()
    if not doc:
        return BUILTIN.get(name, "(no description)")
    first = doc.split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


def options(name: str) -> dict[str, Any]:
    """The options the workload accepts, with their defaults (``seed`` excluded)."""
    return user.factory_options(factory(name))


def _naming_help() -> str:
    return (f"Built-in workloads: {', '.join(available())}; or name your own factory by "
            "import path, 'package.module:factory' (a callable factory(*, seed, **options) "
            "returning a gradguard.run.workload.Workload).")


# --------------------------------------------------------------------------- helpers
@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``seed``, restoring it after.

    For deterministic model initialisation without disturbing the caller's
    random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _inputs(model: torch.nn.Module, x: Tensor) -> Tensor:
    """``x`` on the model's device, floating inputs in the model's dtype."""
    p = next(model.parameters())
    if x.is_floating_point():
        return x.to(device=p.device, dtype=p.dtype)
    return x.to(device=p.device)


def cross_entropy_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of ``model(x)`` (logits) against class labels, ``batch = (x, y)``."""
    x, y = batch
    logits = model(_inputs(model, x))
    return F.cross_entropy(logits, y.to(logits.device))


def classification_metrics(model: torch.nn.Module, batch: Batch) -> dict[str, float]:
    """``accuracy`` and ``loss`` (mean cross-entropy) of ``model`` on ``batch = (x, y)``."""
    x, y = batch
    logits = model(_inputs(model, x))
    y = y.to(logits.device)
    return {
        "accuracy": float((logits.argmax(dim=-1) == y).double().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }
