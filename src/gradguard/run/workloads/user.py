"""User workloads: resolving ``"package.module:factory"`` and calling factories safely.

A user factory is any callable ``factory(*, seed: int, **options) -> Workload``
importable from ``sys.path`` (a module next to a script run with ``python -m``,
an installed package, or a directory on ``PYTHONPATH``)::

    # myproject/work.py
    from gradguard.run.workload import TensorData, Workload
    from gradguard.run.workloads import classification_metrics, cross_entropy_loss, seeded

    def make(*, seed: int, hidden: int = 64) -> Workload:
        ...

and named in a config as ``workload = "myproject.work:make"``. The options a
factory accepts are its keyword parameters with defaults (keyword-only ones
preferred). A factory taking ``**options`` accepts any option, unless it
declares them in a mapping ``DEFAULTS`` (option -> default), an attribute of
the factory or of its module: then those are its options, listed by
:func:`factory_options` and checked by :func:`build`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Mapping
from typing import Any

from ..workload import Workload, WorkloadFactory

__all__ = ["build", "factory_options", "is_import_path", "resolve"]

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_OPTION_KINDS = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the import-path form (contains ``:``) rather than a built-in name."""
    return ":" in name


def resolve(path: str) -> WorkloadFactory:
    """Import ``"package.module:factory"`` and return the callable it names.

    The attribute may be dotted (``"pkg.mod:Class.create"``).

    Raises:
        ValueError: a malformed path, a module that cannot be imported (naming
            the module and the underlying error), a missing attribute, an
            attribute that is not callable.
    """
    module_name, sep, attribute = path.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if (not sep or not _MODULE.match(module_name) or ":" in attribute
            or not all(part.isidentifier() for part in attribute.split("."))):
        raise ValueError(f"workload {path!r}: an import path must have the form "
                         "'package.module:factory' (a dotted module name, one colon, the "
                         "name of a callable in that module)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError):
            hint = (" (is the directory containing it on sys.path? Run from that directory "
                    "with `python -m gradguard`, install the package, or set PYTHONPATH)")
        raise ValueError(f"workload {path!r}: cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc}{hint}") from exc
    obj: Any = module
    for i, part in enumerate(attribute.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:i])}"
            raise ValueError(f"workload {path!r}: {where!r} has no attribute {part!r}; expected "
                             "a callable factory(*, seed, **options) returning a Workload"
                             ) from None
    if not callable(obj):
        raise ValueError(f"workload {path!r}: {attribute!r} is a {type(obj).__name__}, not "
                         "callable; expected a factory(*, seed, **options) returning a Workload")
    factory: WorkloadFactory = obj
    return factory


def _signature(factory: WorkloadFactory) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def _declared_defaults(factory: WorkloadFactory) -> Mapping[str, Any] | None:
    """The ``DEFAULTS`` mapping of a ``**options`` factory (its attribute, else its module's)."""
    declared = getattr(factory, "DEFAULTS", None)
    if declared is None:
        module = sys.modules.get(getattr(factory, "__module__", None) or "")
        declared = getattr(module, "DEFAULTS", None)
    return declared if isinstance(declared, Mapping) else None


def _open(sig: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def factory_options(factory: WorkloadFactory) -> dict[str, Any]:
    """The factory's options with their defaults: keyword parameters other than ``seed``.

    Parameters without a default are required options; they are listed with
    the value :data:`inspect.Parameter.empty`. A factory taking ``**options``
    adds the entries of its ``DEFAULTS`` mapping, if it declares one.
    """
    sig = _signature(factory)
    if sig is None:
        return {}
    found = {p.name: p.default for p in sig.parameters.values()
             if p.kind in _OPTION_KINDS and p.name != "seed"}
    declared = _declared_defaults(factory) if _open(sig) else None
    if declared is not None:
        found.update({str(k): v for k, v in declared.items() if k != "seed"})
    return found


def _check_call(name: str, factory: WorkloadFactory, options: dict[str, Any]) -> None:
    sig = _signature(factory)
    if sig is None:
        return
    params = sig.parameters
    var_keyword = _open(sig)
    seed = params.get("seed")
    if not var_keyword and (seed is None or seed.kind not in _OPTION_KINDS):
        raise ValueError(f"workload {name!r}: the factory must accept the keyword argument "
                         f"'seed' (expected factory(*, seed, **options)); its signature is {sig}")
    if "seed" in options:
        raise ValueError(f"workload {name!r}: 'seed' is not an option; it is the run's seed")
    allowed = factory_options(factory)
    unknown = sorted(set(options) - set(allowed))
    if unknown and (not var_keyword or _declared_defaults(factory) is not None):
        listed = ", ".join(f"{k} (default {v!r})" if v is not inspect.Parameter.empty
                           else f"{k} (required)" for k, v in allowed.items()) or "none"
        raise ValueError(f"workload {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"allowed options: {listed}")
    missing = [k for k, v in allowed.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"workload {name!r}: missing required option(s) "
                         f"{', '.join(map(repr, missing))}")
    positional_only = [p.name for p in params.values()
                       if p.kind is inspect.Parameter.POSITIONAL_ONLY
                       and p.default is inspect.Parameter.empty]
    if positional_only:
        raise ValueError(f"workload {name!r}: the factory has required positional-only "
                         f"parameters {positional_only}; expected factory(*, seed, **options)")


def build(name: str, factory: WorkloadFactory, *, seed: int,
          options: dict[str, Any]) -> Workload:
    """Call ``factory(seed=seed, **options)`` after checking the options; check the result.

    Raises:
        ValueError: an unknown or missing option, a factory that cannot take
            ``seed``, a result that is not a ``Workload``, or the factory's own
            ``ValueError`` / ``TypeError`` (prefixed with ``name``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"workload {name!r}: seed must be an int, got {seed!r}")
    _check_call(name, factory, options)
    try:
        result = factory(seed=seed, **options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"workload {name!r}: {exc}") from exc
    if not isinstance(result, Workload):
        raise ValueError(f"workload {name!r}: the factory returned a {type(result).__name__}; "
                         "expected a gradguard.run.workload.Workload")
    return result
