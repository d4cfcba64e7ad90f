"""The config-driven runner behind ``gradguard train``.

``config`` (the TOML schema), ``workloads`` (built-in data + models, and the
protocol for your own), ``loop`` (optimizer + recorder + guard + checkpointer),
``rundir`` (what a run leaves behind). See docs/run.md.
"""

from gradguard.run import config
from gradguard.run.config import Config, ConfigError
from gradguard.run.loop import RunDirectoryError, RunResult, Trainer, train
from gradguard.run.workload import Batch, Target, TensorData, Workload

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
