"""The guard's policy: which detectors run, with what settings, and what each one does.

A policy is data: a mapping (from Python, a TOML or JSON file) merged over
:meth:`Policy.default`, validated once, with every error naming the key, the
value and what is allowed::

    Policy.from_mapping({
        "clip_norm": 1.0,
        "detectors": {"loss_spike": {"sigmas": 5.0, "action": "rollback"},
                      "starvation": {"action": "reset_accumulators"},
                      "plateau": False},
        "actions": {"rollback": {"skip_batches": 200, "lr_factor": 0.5}},
        "escalation": [{"action": "skip", "count": 3, "consecutive": True, "then": "rollback"},
                       {"action": "rollback", "count": 3, "then": "stop"}],
    })

``detectors.<name>`` takes the detector's settings plus ``action`` and
``enabled`` (``false`` alone disables it); ``actions.<name>`` the settings of an
action; ``escalation`` replaces the default rules when given (``[]``: none).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .detectors import METHODS

ACTIONS: tuple[str, ...] = ("skip", "clip", "lr_backoff", "reset_accumulators", "rollback",
                            "stop", "alert")
"""Every action a policy can name."""

REMEDIES: tuple[str, ...] = ("alert", "lr_backoff", "reset_accumulators", "rollback", "stop")
"""Actions that make sense after a step was applied (not ``skip`` or ``clip``)."""


class PolicyError(ValueError):
    """A policy value is invalid; the message names the key, the value and what is allowed."""


# ------------------------------------------------------------------ value rules
@dataclass(frozen=True)
class _Rule:
    default: Any
    kind: str  # "int", "float", "choice", "bool"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    def allowed(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            noun = "an integer" if self.kind == "int" else "a finite number"
            parts = []
            if self.low is not None:
                parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
            text = noun + (" " + " and ".join(parts) if parts else "")
        return text + (" (or null/None)" if self.optional else "")

    def check(self, where: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        ok = False
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "choice":
            ok = isinstance(value, str) and value in self.choices
        elif self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and self._in_range(value)
        elif self.kind == "float":
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and self._in_range(float(value)))
            value = float(value) if ok else value
        if not ok:
            raise PolicyError(f"invalid {where}={value!r}: allowed is {self.allowed()}")
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (self.high_open and value == self.high)))


def _int(default: int | None, low: int = 1, optional: bool = False) -> _Rule:
    return _Rule(default, "int", low=low, optional=optional)


def _float(default: float | None, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, optional: bool = False) -> _Rule:
    return _Rule(default, "float", low=low, high=high, low_open=low_open, high_open=high_open,
                 optional=optional)


def _choice(default: str, choices: Sequence[str]) -> _Rule:
    return _Rule(default, "choice", choices=tuple(choices))


_SPIKE = {"window": _int(128, 2), "warmup": _int(20, 2), "sigmas": _float(6.0, 0, low_open=True),
          "method": _choice("meanstd", METHODS)}


@dataclass(frozen=True)
class _DetectorSpec:
    action: str
    actions: tuple[str, ...]
    params: Mapping[str, _Rule]
    enabled: bool = True


DETECTOR_SPECS: dict[str, _DetectorSpec] = {
    "nonfinite": _DetectorSpec("skip", ("skip", "stop"), {}),
    "loss_spike": _DetectorSpec("skip", ("skip", *REMEDIES), _SPIKE),
    "grad_spike": _DetectorSpec("skip", ("skip", "clip", *REMEDIES), _SPIKE),
    "divergence": _DetectorSpec("rollback", REMEDIES, {
        "window": _int(50, 2), "rise": _float(1.0, 0, low_open=True),
        "regress": _float(0.1, 0), "history": _int(1000, 2), "every": _int(10)}),
    "plateau": _DetectorSpec("alert", REMEDIES, {
        "patience": _int(10), "min_delta": _float(1e-3, 0), "mode": _choice("min", ("min", "max")),
        "source": _choice("eval", ("eval", "loss")), "every": _int(100)}),
    "starvation": _DetectorSpec("alert", REMEDIES, {
        "window": _int(500), "every": _int(10),
        "max_update_ratio": _float(1e-5, 0, low_open=True),
        "min_improvement": _float(0.01, optional=True), "sample_size": _int(256)}),
    "accumulator_risk": _DetectorSpec("alert", REMEDIES, {
        "every": _int(100), "overflow_fraction": _float(0.1, 0, 1, low_open=True),
        "underflow_fraction": _float(0.01, 0, 1)}),
    "overfitting": _DetectorSpec("alert", REMEDIES, {
        "patience": _int(3), "mode": _choice("min", ("min", "max"))}),
}
"""Every detector: default action, the actions it may take, its settings and their defaults."""

ACTION_SPECS: dict[str, dict[str, _Rule]] = {
    "lr_backoff": {"factor": _float(0.5, 0, 1, low_open=True, high_open=True),
                   "cooldown": _int(100, 0), "floor": _float(0.0, 0)},
    "rollback": {"skip_batches": _int(0, 0), "lr_factor": _float(1.0, 0, 1, low_open=True),
                 "min_age": _int(0, 0)},
    "reset_accumulators": {"scale": _float(None, 0, 1, optional=True)},
    "alert": {"level": _choice("warning", ("info", "warning", "error"))},
}
"""Settings of the actions that have any, with their defaults."""


@dataclass(frozen=True)
class Escalation:
    """``count`` times ``action`` (consecutive guard steps, or within ``window`` steps) -> ``then``.

    ``consecutive=True`` counts guard steps in a row that took ``action`` (any step
    without it starts the count again); otherwise every occurrence within the last
    ``window`` guard steps counts (``window=None``: since the start). After firing,
    the rule's count starts from zero.
    """

    action: str
    count: int
    then: str
    consecutive: bool = False
    window: int | None = None


_ESCALATION_RULES: dict[str, _Rule] = {
    "action": _choice("skip", ACTIONS), "count": _int(3), "then": _choice("stop", REMEDIES),
    "consecutive": _Rule(False, "bool"), "window": _int(None, optional=True),
}

DEFAULT_ESCALATION: tuple[Escalation, ...] = (
    Escalation("skip", 3, "rollback", consecutive=True),
    Escalation("rollback", 3, "stop"),
)


@dataclass(frozen=True)
class DetectorPolicy:
    """One detector's part of a policy: on or off, its action and its settings."""

    name: str
    enabled: bool
    action: str
    params: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


def _unknown(where: str, key: object, allowed: Sequence[str]) -> PolicyError:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return PolicyError(f"unknown key {where}.{key}{hint} Allowed: {', '.join(allowed)}")


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"invalid {where}={value!r}: allowed is a mapping (table)")
    return value


def _params(where: str, given: Mapping[str, Any], rules: Mapping[str, _Rule],
            extra: Sequence[str] = ()) -> dict[str, Any]:
    for key in given:
        if key not in rules and key not in extra:
            raise _unknown(where, key, [*rules, *extra])
    return {name: rule.check(f"{where}.{name}", given.get(name, rule.default))
            for name, rule in rules.items()}


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :meth:`default`, :meth:`from_mapping` or :meth:`load`."""

    clip_norm: float | None = None
    detectors: Mapping[str, DetectorPolicy] = field(default_factory=dict)
    actions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    escalation: tuple[Escalation, ...] = DEFAULT_ESCALATION

    @classmethod
    def default(cls) -> Policy:
        """Every detector with its defaults, no clipping, the default escalation."""
        return cls.from_mapping({})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None) -> Policy:
        """Validate ``mapping`` (merged over the defaults) into a policy."""
        top = dict(_mapping("policy", mapping or {}))
        allowed_top = ("clip_norm", "detectors", "actions", "escalation")
        for key in top:
            if key not in allowed_top:
                raise _unknown("policy", key, allowed_top)
        clip = _float(None, 0, low_open=True, optional=True).check("policy.clip_norm",
                                                                   top.get("clip_norm"))
        given_detectors = _mapping("policy.detectors", top.get("detectors", {}))
        for name in given_detectors:
            if name not in DETECTOR_SPECS:
                raise _unknown("policy.detectors", name, list(DETECTOR_SPECS))
        detectors = {name: _detector(name, spec, given_detectors.get(name, {}))
                     for name, spec in DETECTOR_SPECS.items()}
        given_actions = _mapping("policy.actions", top.get("actions", {}))
        for name in given_actions:
            if name not in ACTION_SPECS:
                raise _unknown("policy.actions", name, list(ACTION_SPECS))
        actions = {name: _params(f"policy.actions.{name}",
                                 _mapping(f"policy.actions.{name}", given_actions.get(name, {})),
                                 rules)
                   for name, rules in ACTION_SPECS.items()}
        escalation = DEFAULT_ESCALATION
        if "escalation" in top:
            escalation = _escalation(top["escalation"])
        return cls(clip, detectors, actions, escalation)

    @classmethod
    def load(cls, source: str | os.PathLike[str]) -> Policy:
        """Read a policy from a ``.toml`` or ``.json`` file."""
        path = Path(source)
        if path.suffix not in (".json", ".toml"):
            raise PolicyError(f"invalid policy file {str(path)!r}: allowed are .toml and .json "
                              "files")
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_mapping(json.loads(text))
        return cls.from_toml(text)

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """Validate a policy written in TOML (the mapping of :meth:`from_mapping`)."""
        try:
            import tomllib  # type: ignore[import-not-found,unused-ignore]
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
        return cls.from_mapping(tomllib.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data; ``Policy.from_mapping(p.to_dict()) == p``."""
        return {
            "clip_norm": self.clip_norm,
            "detectors": {name: {"enabled": d.enabled, "action": d.action, **d.params}
                          for name, d in self.detectors.items()},
            "actions": {name: dict(params) for name, params in self.actions.items()},
            "escalation": [{"action": e.action, "count": e.count, "then": e.then,
                            "consecutive": e.consecutive, "window": e.window}
                           for e in self.escalation],
        }

    def detector(self, name: str) -> DetectorPolicy:
        """The policy of detector ``name``."""
        return self.detectors[name]

    def enabled(self, name: str) -> bool:
        """Whether detector ``name`` runs."""
        return self.detectors[name].enabled

    def uses(self, action: str) -> bool:
        """Whether any enabled detector or escalation rule can take ``action``."""
        return (any(d.enabled and d.action == action for d in self.detectors.values())
                or any(e.then == action for e in self.escalation))


def _detector(name: str, spec: _DetectorSpec, given: Any) -> DetectorPolicy:
    where = f"policy.detectors.{name}"
    if isinstance(given, bool):
        given = {"enabled": given}
    given = _mapping(where, given)
    params = _params(where, given, spec.params, extra=("action", "enabled"))
    enabled = _Rule(spec.enabled, "bool").check(f"{where}.enabled", given.get("enabled", True))
    action = _choice(spec.action, spec.actions).check(f"{where}.action",
                                                      given.get("action", spec.action))
    return DetectorPolicy(name, enabled, action, params)


def _escalation(value: Any) -> tuple[Escalation, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise PolicyError(f"invalid policy.escalation={value!r}: allowed is a list of rules "
                          "(mappings with action, count, then, consecutive, window)")
    rules = []
    for i, rule in enumerate(value):
        where = f"policy.escalation[{i}]"
        given = _mapping(where, rule)
        for key in ("action", "then"):
            if key not in given:
                raise PolicyError(f"missing {where}.{key}: allowed is "
                                  f"{_ESCALATION_RULES[key].allowed()}")
        params = _params(where, given, _ESCALATION_RULES)
        if params["then"] == params["action"]:
            raise PolicyError(f"invalid {where}.then={params['then']!r}: it must differ from "
                              f"{where}.action")
        rules.append(Escalation(**params))
    return tuple(rules)
