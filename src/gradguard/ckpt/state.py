"""What is captured from the training objects, and how a checkpoint is checked against them.

* RNG states: Python's ``random``, numpy's global generator, torch's CPU
  generator and, when CUDA is available, every CUDA device's generator.
* The optimizer configuration and its hash (see :func:`optimizer_config`).
* Structure: the model's state-dict keys, shapes and dtypes, and the
  optimizer's parameter groups, so a mismatch is listed before anything is loaded.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .format import DTYPES, canonical_json

SCHEDULER_KEYS: frozenset[str] = frozenset(
    {"lr", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})
"""Param-group keys that LR schedulers own: left out of the optimizer config hash."""

IMPLEMENTATION_KEYS: frozenset[str] = frozenset(
    {"impl", "foreach", "fused", "capturable", "differentiable"})
"""Param-group keys that choose an implementation, not the math: left out of the hash."""

CYCLED_MOMENTUM_KEYS: tuple[str, ...] = ("betas", "momentum")
"""Left out of the hash in groups whose momentum a scheduler cycles (OneCycleLR,
CyclicLR with ``cycle_momentum``: they leave ``max_momentum`` in the group)."""


def qualified_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """The state of every global random number generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> list[str]:
    """Set every global generator from ``state``; return what could not be restored."""
    skipped = []
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(dict(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state:
        cuda = list(state["cuda"])
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            skipped.append(f"CUDA RNG state of {len(cuda)} device(s) not restored: "
                           f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                           "device(s) here")
    return skipped


# --------------------------------------------------------------- optimizer config
def _plain(value: Any) -> Any:
    """A JSON-able, canonical form of a hyperparameter value."""
    if isinstance(value, torch.Tensor):
        return {"$tensor_value": value.detach().cpu().tolist(),
                "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"$tuple": [_plain(v) for v in value]}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {"$dict": [[str(k), _plain(v)] for k, v in value.items()]}
    if isinstance(value, float) and value != value:
        return {"$float": "nan"}
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"$float": "inf" if value > 0 else "-inf"}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"$repr": repr(value)}


def optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The configuration that the config hash covers.

    The optimizer's class and every param-group hyperparameter, except the keys
    schedulers own (:data:`SCHEDULER_KEYS`, and ``betas``/``momentum`` where a
    scheduler cycles them) and implementation choices (:data:`IMPLEMENTATION_KEYS`).
    The learning rate is excluded because schedulers change it every step; the
    scheduler's own state is saved and restored instead.
    """
    groups = []
    for group in optimizer.param_groups:
        cycled = "max_momentum" in group
        groups.append({
            key: _plain(value) for key, value in sorted(group.items())
            if key != "params" and key not in SCHEDULER_KEYS and key not in IMPLEMENTATION_KEYS
            and not (cycled and key in CYCLED_MOMENTUM_KEYS)})
    return {"class": qualified_name(optimizer), "param_groups": groups}


def config_hash(config: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON of an optimizer config."""
    return "sha256:" + hashlib.sha256(canonical_json(config)).hexdigest()


def config_differences(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a saved and a live optimizer config."""
    out = []
    if saved.get("class") != live.get("class"):
        out.append(f"optimizer class: checkpoint {saved.get('class')}, now {live.get('class')}")
    saved_groups, live_groups = saved.get("param_groups", []), live.get("param_groups", [])
    if len(saved_groups) != len(live_groups):
        out.append(f"param groups: {len(saved_groups)} in the checkpoint, {len(live_groups)} now")
    for i, (s, n) in enumerate(zip(saved_groups, live_groups, strict=False)):
        for key in sorted(set(s) | set(n)):
            if s.get(key, "<absent>") != n.get(key, "<absent>"):
                out.append(f"param group {i}: {key}: checkpoint {_show(s.get(key, '<absent>'))}, "
                           f"now {_show(n.get(key, '<absent>'))}")
    return out


def changed_keys(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[list[str]]:
    """Per live param group, the hyperparameters whose values differ from the saved config."""
    saved_groups = saved.get("param_groups", [])
    result = []
    for i, n in enumerate(live.get("param_groups", [])):
        s = saved_groups[i] if i < len(saved_groups) else {}
        result.append(sorted(k for k in n if s.get(k, "<absent>") != n[k]))
    return result


def _show(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag == "$tuple":
            return "(" + ", ".join(_show(v) for v in body) + ("," if len(body) == 1 else "") + ")"
        if tag == "$float":
            return str(body)
    return repr(value)


# ---------------------------------------------------------------------- structure
def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    return str(dtype).removeprefix("torch.")


def tensor_spec(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}


def model_differences(saved: Mapping[str, dict[str, Any] | None],
                      model: torch.nn.Module) -> list[str]:
    """Differences between a saved model index (key -> shape/dtype, None for
    non-tensor entries) and ``model``'s state dict."""
    live = model.state_dict()
    out = []
    for key in live:
        if key not in saved:
            out.append(f"model: {key!r} is in the model but not in the checkpoint")
    for key in saved:
        if key not in live:
            out.append(f"model: {key!r} is in the checkpoint but not in the model")
    for key, spec in saved.items():
        if key not in live or spec is None:
            continue
        value = live[key]
        if not isinstance(value, torch.Tensor):
            out.append(f"model: {key!r} is a tensor in the checkpoint, a "
                       f"{type(value).__name__} in the model")
            continue
        if list(spec["shape"]) != list(value.shape):
            out.append(f"model: {key!r} has shape {tuple(spec['shape'])} in the checkpoint, "
                       f"{tuple(value.shape)} in the model")
        if _dtype_name(spec["dtype"]) != _dtype_name(value.dtype):
            out.append(f"model: {key!r} has dtype {_dtype_name(spec['dtype'])} in the "
                       f"checkpoint, {_dtype_name(value.dtype)} in the model")
    return out


def optimizer_structure(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Group sizes and the shape and dtype of every parameter, in state-dict order."""
    return {
        "group_sizes": [len(g["params"]) for g in optimizer.param_groups],
        "params": [tensor_spec(p) for g in optimizer.param_groups for p in g["params"]],
    }


def optimizer_differences(saved: Mapping[str, Any],
                          optimizer: torch.optim.Optimizer) -> list[str]:
    live = optimizer_structure(optimizer)
    out = []
    if saved["group_sizes"] != live["group_sizes"]:
        out.append(f"optimizer: parameters per group are {saved['group_sizes']} in the "
                   f"checkpoint, {live['group_sizes']} now")
        return out
    for i, (s, n) in enumerate(zip(saved["params"], live["params"], strict=True)):
        if list(s["shape"]) != list(n["shape"]):
            out.append(f"optimizer: parameter {i} has shape {tuple(s['shape'])} in the "
                       f"checkpoint, {tuple(n['shape'])} now")
        if s["dtype"] != n["dtype"]:
            out.append(f"optimizer: parameter {i} has dtype {s['dtype']} in the checkpoint, "
                       f"{n['dtype']} now")
    return out
