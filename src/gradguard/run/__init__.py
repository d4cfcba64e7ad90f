"""The config-driven runner behind ``gradguard train``.

``config`` (the TOML schema), ``workloads`` (built-in data + models, and the
protocol for your own), ``loop`` (optimizer + recorder + guard + checkpointer),
``rundir`` (what a run leaves behind). See docs/run.md.

The names below are imported on first use, so ``gradguard.run.rundir`` (file
names only) can be read without importing torch and the training loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradguard.run import config
    from gradguard.run.config import Config, ConfigError
    from gradguard.run.loop import RunDirectoryError, RunResult, Trainer, train
    from gradguard.run.workload import Batch, Target, TensorData, Workload

_EXPORTS = {
    "Batch": "gradguard.run.workload",
    "Config": "gradguard.run.config",
    "ConfigError": "gradguard.run.config",
    "RunDirectoryError": "gradguard.run.loop",
    "RunResult": "gradguard.run.loop",
    "Target": "gradguard.run.workload",
    "TensorData": "gradguard.run.workload",
    "Trainer": "gradguard.run.loop",
    "Workload": "gradguard.run.workload",
    "train": "gradguard.run.loop",
}

__all__ = [
    "Batch",
    "Config",
    "ConfigError",
    "RunDirectoryError",
    "RunResult",
    "Target",
    "TensorData",
    "Trainer",
    "Workload",
    "config",
    "train",
]


def __getattr__(name: str) -> Any:
    if name == "config":
        return importlib.import_module("gradguard.run.config")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradguard.run' has no attribute {name!r}")
