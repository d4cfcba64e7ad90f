"""From a validated :class:`~gradguard.run.config.Config` to live objects.

The optimizer (one, or a :class:`~gradguard.optim.Hybrid` of named groups), the
LR schedule with warm-up, and the recorder's sinks. Errors are
:class:`~gradguard.run.config.ConfigError` with the key path that caused them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gradguard.optim import Hybrid
from gradguard.run.config import Config, ConfigError, optimizer_class
from gradguard.run.workload import Workload


def embedding_names(workload: Workload) -> list[str]:
    """Names of the workload's embedding-table parameters."""
    if workload.embeddings is not None:
        return list(workload.embeddings)
    from gradguard.optim.hybrid import split_parameters

    tables = {id(p) for p in split_parameters(workload.model).embeddings}
    return [n for n, p in workload.model.named_parameters() if id(p) in tables]


def select_parameters(workload: Workload, selector: str | list[str]
                      ) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters a group's ``params`` selector names, in model order."""
    named = [(n, p) for n, p in workload.model.named_parameters() if p.requires_grad]
    tables = set(embedding_names(workload))
    if selector == "all":
        return named
    if selector == "embeddings":
        return [(n, p) for n, p in named if n in tables]
    if selector == "dense":
        return [(n, p) for n, p in named if n not in tables]
    patterns = [selector] if isinstance(selector, str) else selector
    return [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


def build_optimizer(config: Config, workload: Workload, *, zero: bool = False
                    ) -> torch.optim.Optimizer:
    """The configured optimizer over the workload model's trainable parameters.

    ``zero=True`` (data-parallel runs with ``dist.zero``) wraps it in
    ``torch.distributed.optim.ZeroRedundancyOptimizer``: each rank keeps the state
    of its partition of the parameters (needs an initialised process group).
    """
    spec = config.optimizer
    if spec.name is not None:
        params = [p for p in workload.model.parameters() if p.requires_grad]
        if zero:
            from gradguard.dist import make_zero

            try:
                return make_zero(params, optimizer_class(spec.name), **spec.hyperparameters)
            except (TypeError, ValueError) as exc:
                raise ConfigError([("optimizer", str(exc))]) from None
        return _construct("optimizer", spec.name, params, spec.hyperparameters)
    if zero:
        raise ConfigError([("dist.zero", "ZeroRedundancyOptimizer wraps one optimizer class; a "
                            "hybrid (optimizer.groups) cannot be sharded")])
    assert spec.groups is not None
    owner: dict[str, str] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for group, gspec in spec.groups.items():
        chosen = select_parameters(workload, gspec.params)
        path = f"optimizer.groups.{group}.params"
        if not chosen:
            names = [n for n, p in workload.model.named_parameters() if p.requires_grad]
            raise ConfigError([(path, f"{gspec.params!r} selects no parameter of the "
                                f"{workload.name} model; its parameters: {', '.join(names)}")])
        for name, _ in chosen:
            if name in owner:
                raise ConfigError([(path, f"parameter {name!r} is already in group "
                                    f"{owner[name]!r}; each parameter belongs to one group")])
            owner[name] = group
        optimizers[group] = _construct(f"optimizer.groups.{group}", gspec.name,
                                       [p for _, p in chosen], gspec.hyperparameters)
        for param_group in optimizers[group].param_groups:
            param_group["name"] = group  # the recorder's metric label
    missing = [n for n, p in workload.model.named_parameters()
               if p.requires_grad and n not in owner]
    if missing:
        raise ConfigError([("optimizer.groups", "no group selects these parameters: "
                            + ", ".join(missing) + " (add them to a group, e.g. params = "
                            '"dense", or list their names)')])
    return Hybrid(optimizers)


def _construct(path: str, name: str, params: list[torch.nn.Parameter],
               hparams: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        optimizer: torch.optim.Optimizer = optimizer_class(name)(params, **hparams)
    except (TypeError, ValueError) as exc:
        raise ConfigError([(path, str(exc))]) from None
    return optimizer


def build_schedule(config: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The LR scheduler (stepped once per optimizer step), warm-up first; None without one."""
    from torch.optim import lr_scheduler

    spec = config.schedule
    main = None
    if spec.name is not None:
        cls = getattr(lr_scheduler, spec.name)
        kwargs = dict(spec.kwargs)
        if spec.name == "ReduceLROnPlateau":
            raise ConfigError([("schedule.name", "ReduceLROnPlateau needs a metric per step; use "
                                "the guard's plateau detector with action lr_backoff instead "
                                "(guard.policy.detectors.plateau)")])
        if spec.name in ("CosineAnnealingLR",) and "T_max" not in kwargs:
            kwargs["T_max"] = max(1, total_steps - spec.warmup_steps)
        if spec.name in ("OneCycleLR",) and "total_steps" not in kwargs:
            kwargs["total_steps"] = max(1, total_steps - spec.warmup_steps)
        try:
            main = cls(optimizer, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError([("schedule.kwargs", f"{spec.name}: {exc}")]) from None
    if spec.warmup_steps == 0:
        return main
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=spec.warmup_start_factor,
                                   end_factor=1.0, total_iters=spec.warmup_steps)
    if main is None:
        return warmup
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[spec.warmup_steps])


def build_sinks(config: Config, run_dir: Path, metrics_file: Path) -> list[Any]:
    """The recorder's sinks: JSONL always, then TensorBoard / Prometheus / MLflow as configured."""
    from gradguard.watch import JsonlSink

    spec = config.recorder
    sinks: list[Any] = [JsonlSink(metrics_file)]
    try:
        if spec.tensorboard:
            from gradguard.watch import TensorBoardSink

            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        if spec.prometheus_port is not None:
            from gradguard.watch import PrometheusSink

            sinks.append(PrometheusSink(spec.prometheus_port, spec.prometheus_addr))
        if spec.mlflow:
            from gradguard.watch import MlflowSink

            sinks.append(MlflowSink(run_name=run_dir.name))
    except (ImportError, OSError) as exc:
        for sink in sinks:
            sink.close()
        raise ConfigError([("recorder", str(exc))]) from None
    return sinks


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
