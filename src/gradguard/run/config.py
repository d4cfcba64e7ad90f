"""The run configuration: one TOML file, validated before anything runs.

Every error names the key path (``optimizer.groups.dense.lr``), the bad value
and what is allowed; unknown keys are errors. The sections, with their
defaults, are the pydantic models below; ``gradguard config example WORKLOAD``
prints a commented file and ``docs/run.md`` documents every key.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration that cannot run; ``problems`` lists ``(key path, message)`` pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where} ({len(self.problems)} problem"
                 f"{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  {path}: {message}" for path, message in self.problems]
        super().__init__("\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSection(_Section):
    """``[run]``: where the run goes and how it executes."""

    output: str | None = Field(None, description="run directory (default: runs/<config file name>)")
    seed: int = Field(0, ge=0, description="seeds python, numpy, torch and the data order")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
                        description='"cpu", "cuda" or "cuda:N"')
    precision: Literal["fp32", "bf16", "fp64"] = Field(
        "fp32", description='"fp32"; "bf16" (autocast, fp32 weights); "fp64" (model in float64)')
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    report: bool = Field(True, description="write report.html when the run ends "
                                           "(`gradguard report RUN_DIR` writes it later)")


class WorkloadSection(_Section):
    """``[workload]``: the data and the model."""

    name: str = Field(description='a built-in workload or "package.module:factory"')
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="keyword options of the workload factory")


SELECTORS = ("embeddings", "dense", "all")


class OptimizerGroup(_Section):
    """``[optimizer.groups.NAME]``: one optimizer of a hybrid on a set of parameters."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="an optimizer name (gradguard optimizers)")
    params: str | list[str] = Field(
        description='"embeddings", "dense", "all", or a list of parameter-name glob patterns')

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerSection(_Section):
    """``[optimizer]``: one optimizer (``name`` + hyperparameters) or named ``groups``."""

    model_config = ConfigDict(extra="allow")
    name: str | None = Field(None, description="optimizer name; omit when using groups")
    groups: dict[str, OptimizerGroup] | None = Field(
        None, description="hybrid: one optimizer per named group of parameters")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _one_form(self) -> OptimizerSection:
        if (self.name is None) == (self.groups is None):
            raise ValueError("give either name = ... (one optimizer) or [optimizer.groups.NAME] "
                             "tables (a hybrid), not " + ("both" if self.name else "neither"))
        if self.groups is not None and self.hyperparameters:
            raise ValueError("with groups, hyperparameters go inside each group; found "
                             + ", ".join(sorted(self.hyperparameters)))
        if self.groups is not None and not self.groups:
            raise ValueError("groups is empty")
        return self


class ScheduleSection(_Section):
    """``[schedule]``: a ``torch.optim.lr_scheduler`` stepped every optimizer step, plus warm-up."""

    name: str | None = Field(None, description="a torch.optim.lr_scheduler class name, or none")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="its keyword arguments")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the schedule")
    warmup_start_factor: float = Field(0.01, gt=0.0, le=1.0,
                                       description="lr factor at the first warm-up step")


class EarlyStopping(_Section):
    """``[train.early_stopping]``: stop when the primary metric stops improving."""

    patience: int = Field(5, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0, description="smallest improvement that counts")


class TrainSection(_Section):
    """``[train]``: how long, how big, how often."""

    steps: int | None = Field(None, ge=1, description="optimizer steps (or give epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data")
    batch_size: int = Field(128, ge=1, description="samples per micro-batch")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    eval_every: int | None = Field(None, ge=1,
                                   description="steps between evaluations (default: steps/20)")
    eval_batch_size: int = Field(4096, ge=1, description="samples per evaluation chunk")
    log_every: int = Field(10, ge=1, description="steps between training-loss records")
    early_stopping: EarlyStopping | None = Field(None, description="off unless given")
    stop_at_target: bool = Field(False,
                                 description="stop at the first evaluation that reaches the target")

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        return self


class GuardSection(_Section):
    """``[guard]``: the guard policy (``gradguard.guard.Policy``; see docs/guard.md)."""

    enabled: bool = True
    policy: dict[str, Any] = Field(default_factory=dict,
                                   description="clip_norm, detectors, actions, escalation")


class RecorderSection(_Section):
    """``[recorder]``: the flight recorder and its sinks (metrics.jsonl is always written)."""

    every: int | None = Field(10, ge=1, description="steps between sampled emissions")
    full_every: int | None = Field(100, ge=1, description="steps between full-tensor emissions")
    sample_size: int = Field(1024, ge=1, description="sampled coordinates per tensor")
    tensorboard: bool = Field(False, description="also write TensorBoard events to RUN/tensorboard")
    prometheus_port: int | None = Field(None, ge=0, le=65535,
                                        description="serve Prometheus metrics on this port")
    prometheus_addr: str = Field("127.0.0.1", description="address of the metrics endpoint")
    mlflow: bool = Field(False, description="also log to MLflow (MLFLOW_TRACKING_URI)")


class CheckpointSection(_Section):
    """``[checkpoint]``: atomic, verified checkpoints under RUN/checkpoints."""

    enabled: bool = True
    every: int | None = Field(None, ge=1, description="steps between saves (default: eval_every)")
    keep_last: int | None = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1)
    keep_best: int | None = Field(1, ge=1, description="also keep the N best by the primary metric")
    async_save: bool = Field(True, description="write in a background thread")
    signing_key_file: str | None = Field(None, description="HMAC key file (signed checkpoints)")


class LocalSGDSection(_Section):
    """``[dist.local_sgd]``: post-local SGD (torch's ``model_averaging``), not every-step sync."""

    period: int = Field(4, ge=1, description="steps between parameter averagings")
    warmup_steps: int = Field(0, ge=0, description="steps of ordinary DDP before local SGD starts")
    subgroup_size: int = Field(
        1, ge=0, description="ranks that still all-reduce gradients every step: 1 (purely "
        "local), 0 (the ranks of one machine, LOCAL_WORLD_SIZE), or N dividing the world size")


class DistSection(_Section):
    """``[dist]``: data-parallel training under ``torchrun`` (ignored in a single process)."""

    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description='"auto" (nccl on CUDA, gloo on the CPU), "gloo" or "nccl"')
    check_every: int | None = Field(
        100, ge=1, description="steps between replica checksum comparisons (none: off)")
    on_mismatch: Literal["resync_from_rank0", "stop"] = Field(
        "resync_from_rank0", description='"resync_from_rank0" (broadcast rank 0\'s state) or '
        '"stop" (halt with a diagnosis)')
    spread_every: int | None = Field(
        10, ge=1, description="steps between per-rank gradient-norm measurements (none: off)")
    zero: bool = Field(False, description="shard the optimizer state "
                       "(torch.distributed.optim.ZeroRedundancyOptimizer)")
    local_sgd: LocalSGDSection | None = Field(
        None, description="post-local SGD: {period, warmup_steps, subgroup_size}; off unless given")
    timeout: float = Field(1800.0, gt=0, description="seconds a collective may wait for the "
                           "other ranks")
    find_unused_parameters: bool = Field(
        False, description="DistributedDataParallel(find_unused_parameters=...)")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size in MiB")


class Config(_Section):
    """A whole run configuration."""

    run: RunSection = Field(default_factory=RunSection)  # type: ignore[arg-type]
    workload: WorkloadSection
    optimizer: OptimizerSection
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)  # type: ignore[arg-type]
    train: TrainSection
    guard: GuardSection = Field(default_factory=GuardSection)
    recorder: RecorderSection = Field(default_factory=RecorderSection)  # type: ignore[arg-type]
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)  # type: ignore[arg-type]
    dist: DistSection = Field(default_factory=DistSection)  # type: ignore[arg-type]

    @field_validator("workload", mode="before")
    @classmethod
    def _workload_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def to_dict(self) -> dict[str, Any]:
        """Plain data (every default filled in), for config.toml and checkpoints."""
        return self.model_dump(mode="json", exclude_none=False)


# =============================================================== loading
def parse(data: Mapping[str, Any], source: str | None = None, *, deep: bool = True) -> Config:
    """Validate a config mapping; raise :class:`ConfigError` listing every problem.

    ``deep`` also checks what the sections refer to: the workload and its
    option names, optimizer names and hyperparameters, the scheduler, the guard
    policy (imports the workload registry; builds nothing big).
    """
    try:
        config = Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc, data), source) from None
    if deep:
        problems = check_references(config)
        if problems:
            raise ConfigError(problems, source)
    return config


def load(path: str | Path, overrides: Sequence[str] = (), *, deep: bool = True) -> Config:
    """Read and validate a TOML file, then apply ``key.path=value`` overrides (TOML values)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("(file)", f"no such file: {path}")], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("(syntax)", f"not valid TOML: {exc}")], str(path)) from None
    data = apply_overrides(data, overrides)
    config = parse(data, str(path), deep=deep)
    if config.run.output is None:
        config.run.output = str(Path("runs") / path.stem)
    return config


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=100", 'optimizer.name="adam"']`` applied to a copy of ``data``.

    The value is parsed as TOML (``100``, ``1e-3``, ``true``, ``"adam"``, ``[1, 2]``);
    anything that is not a TOML value is taken as a string.
    """
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([(item, "an override is KEY.PATH=VALUE, e.g. train.steps=100")])
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([(key, f"{part} is a value, not a table")])
            node = child
        node[parts[-1]] = value
    return data


def _pydantic_problems(exc: ValidationError, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            message = (f"unknown key{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                       f"allowed: {', '.join(allowed)}")
        elif kind == "missing":
            message = "required key is missing"
        else:
            msg = "not an allowed value" if kind == "string_pattern_mismatch" else err["msg"]
            message = f"{msg} (got {err.get('input')!r})"
            doc = _field_description(loc)
            if doc:
                message += f"; allowed: {doc}"
        problems.append((path, message))
    return problems


def _model_at(loc: Sequence[str]) -> type[BaseModel] | None:
    """The section model at a key path (``optimizer.groups.NAME`` is an OptimizerGroup)."""
    if len(loc) >= 3 and loc[0] == "optimizer" and loc[1] == "groups":
        return OptimizerGroup if len(loc) == 3 else None
    model: type[BaseModel] | None = Config
    for part in loc:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _submodel(field.annotation)
    return model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _fields_at(loc: Sequence[str]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _field_description(loc: Sequence[str]) -> str | None:
    model = _model_at(loc[:-1]) if loc else None
    field = model.model_fields.get(loc[-1]) if model is not None else None
    return field.description if field is not None else None


# =============================================================== deep checks
FULL_BATCH_OPTIMIZERS = {
    "gradient_descent": ("gradguard.optim.linesearch", "GradientDescent"),
    "nonlinear_cg": ("gradguard.optim.cg", "NonlinearCG"),
    "newton": ("gradguard.optim.newton", "Newton"),
    "lbfgs": ("torch.optim", "LBFGS"),
}
"""Closure-based optimizers the runner accepts besides the registry (full-batch workloads)."""

CLOSURE_CALLS_BACKWARD = frozenset({"lbfgs"})
"""Those whose closure must compute the gradients (torch's convention); gradguard's line-search
methods differentiate the closure's loss themselves."""


def optimizer_class(name: str) -> type:
    """The optimizer class for a config name: the registry, or a full-batch optimizer."""
    import importlib

    from gradguard.optim import registry

    if name in FULL_BATCH_OPTIMIZERS:
        module, attr = FULL_BATCH_OPTIMIZERS[name]
        cls: type = getattr(importlib.import_module(module), attr)
        return cls
    return registry.get(name)


def optimizer_names() -> list[str]:
    from gradguard.optim import registry

    return sorted([*registry.available(), *FULL_BATCH_OPTIMIZERS])


def check_optimizer(path: str, name: str, hparams: Mapping[str, Any]
                    ) -> tuple[str, str] | None:
    """``(key path, message)`` of the first problem with an optimizer's settings, or None.

    Names are checked against the optimizer's signature; values by building it on
    a dummy parameter, so the optimizer's own validation speaks.
    """
    import inspect
    import re

    import torch

    if name not in optimizer_names():
        hint = difflib.get_close_matches(name, optimizer_names(), n=1)
        return (f"{path}.name", f"unknown optimizer {name!r}"
                f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"allowed: {', '.join(optimizer_names())}")
    cls = optimizer_class(name)
    allowed = [p for p in inspect.signature(cls).parameters if p != "params"]
    for key in hparams:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            return (f"{path}.{key}", f"{name} has no hyperparameter {key!r}"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                    f"allowed: {', '.join(allowed)}")
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **dict(hparams))
    except (TypeError, ValueError) as exc:
        named = re.search(r"\b(\w+)(\[\d+\])?=", str(exc))
        where = (f"{path}.{named.group(1)}" if named and named.group(1) in hparams else path)
        return (where, str(exc))
    return None


def check_references(config: Config) -> list[tuple[str, str]]:
    """Problems with what the config names (workload, options, optimizers, schedule, policy)."""
    problems: list[tuple[str, str]] = []
    from gradguard.run import workloads

    name = config.workload.name
    if ":" not in name:
        if name not in workloads.available():
            hint = difflib.get_close_matches(name, workloads.available(), n=1)
            problems.append(("workload.name", f"unknown workload {name!r}"
                             f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed: "
                             f"{', '.join(workloads.available())}, or 'package.module:factory'"))
        else:
            known = workloads.options(name)
            for key in config.workload.options:
                if key not in known:
                    hint = difflib.get_close_matches(key, list(known), n=1)
                    problems.append((f"workload.options.{key}", f"unknown option of {name}"
                                     f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                     f"allowed: {', '.join(known)}"))
    opt = config.optimizer
    if opt.name is not None:
        problem = check_optimizer("optimizer", opt.name, opt.hyperparameters)
        if problem:
            problems.append(problem)
    else:
        assert opt.groups is not None
        for group, spec in opt.groups.items():
            if group == "all":
                problems.append(("optimizer.groups.all", "'all' is reserved for run-wide metrics; "
                                 "name the group otherwise"))
            if spec.name in FULL_BATCH_OPTIMIZERS:
                problems.append((f"optimizer.groups.{group}.name",
                                 f"{spec.name} is a full-batch optimizer; it cannot be one group "
                                 "of a hybrid"))
                continue
            problem = check_optimizer(f"optimizer.groups.{group}", spec.name,
                                      spec.hyperparameters)
            if problem:
                problems.append(problem)
            patterns = [spec.params] if isinstance(spec.params, str) else spec.params
            if isinstance(spec.params, str) and spec.params not in SELECTORS:
                problems.append((f"optimizer.groups.{group}.params",
                                 f"{spec.params!r} is not a selector; allowed: "
                                 f"{', '.join(map(repr, SELECTORS))}, or a list of glob patterns "
                                 "over parameter names"))
            elif not patterns:
                problems.append((f"optimizer.groups.{group}.params", "empty list of patterns"))
    sched = config.schedule
    if sched.name is not None:
        from torch.optim import lr_scheduler

        names = schedule_names()
        if sched.name not in names:
            hint = difflib.get_close_matches(sched.name, names, n=1)
            problems.append(("schedule.name", f"unknown scheduler {sched.name!r}"
                             f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed: "
                             f"{', '.join(names)}"))
        else:
            import inspect

            cls = getattr(lr_scheduler, sched.name)
            params = inspect.signature(cls.__init__).parameters
            for key in sched.kwargs:
                if key not in params or key in ("self", "optimizer"):
                    allowed = [p for p in params if p not in ("self", "optimizer")]
                    problems.append((f"schedule.kwargs.{key}",
                                     f"{sched.name} has no argument {key!r}; allowed: "
                                     f"{', '.join(allowed)}"))
    if config.guard.enabled:
        from gradguard.guard import Policy

        try:
            Policy.from_mapping(config.guard.policy)
        except ValueError as exc:
            problems.append(("guard.policy", str(exc)))
    if config.run.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(("run.device", f"{config.run.device!r} asked for, but torch sees no "
                             "CUDA device; allowed here: 'cpu'"))
    train = config.train
    if train.eval_every is not None and train.steps is not None and train.eval_every > train.steps:
        problems.append(("train.eval_every", f"{train.eval_every} is more than train.steps "
                         f"({train.steps}): no evaluation would run before the end"))
    if config.run.precision == "bf16" and config.optimizer.name in FULL_BATCH_OPTIMIZERS:
        problems.append(("run.precision", "line-search optimizers need fp32 or fp64, got bf16"))
    if math.isnan(config.schedule.warmup_start_factor):
        problems.append(("schedule.warmup_start_factor", "NaN is not allowed"))
    problems += check_dist(config)
    return problems


RANK_LOCAL_DETECTORS: dict[str, tuple[str, ...]] = {
    "grad_spike": ("alert", "clip"),
    "starvation": ("alert",),
    "accumulator_risk": ("alert",),
}
"""Under post-local SGD these detectors read rank-local values (gradients before any
all-reduce, local parameters and state), so their decisions may differ between ranks: only
actions that need no agreement are allowed (the runner makes ``alert`` their default there)."""


def check_dist(config: Config) -> list[tuple[str, str]]:
    """Problems with the ``[dist]`` section and what it is combined with."""
    problems: list[tuple[str, str]] = []
    d = config.dist
    opt = config.optimizer
    if d.zero and d.local_sgd is not None:
        problems.append(("dist.zero", "ZeroRedundancyOptimizer shards optimizer state across "
                         "replicas that post-local SGD lets drift apart; use one of dist.zero "
                         "and dist.local_sgd"))
    if d.zero and opt.groups is not None:
        problems.append(("dist.zero", "ZeroRedundancyOptimizer wraps one optimizer class; a "
                         "hybrid (optimizer.groups) cannot be sharded: use one optimizer, or "
                         "dist.zero = false"))
    if (d.zero or d.local_sgd is not None) and opt.name in FULL_BATCH_OPTIMIZERS:
        problems.append(("dist", f"{opt.name} is a full-batch optimizer; data-parallel training "
                         "(dist.zero, dist.local_sgd) needs a mini-batch optimizer"))
    if d.local_sgd is not None and config.guard.enabled:
        detectors = config.guard.policy.get("detectors", {}) or {}
        for name, allowed in RANK_LOCAL_DETECTORS.items():
            spec = detectors.get(name)
            action = spec.get("action") if isinstance(spec, Mapping) else None
            if action is not None and action not in allowed:
                problems.append((f"guard.policy.detectors.{name}.action",
                                 f"{action!r} needs every rank to agree, but under "
                                 f"dist.local_sgd {name} judges rank-local values; allowed: "
                                 f"{', '.join(map(repr, allowed))}"))
        for i, rule in enumerate(config.guard.policy.get("escalation", []) or []):
            if isinstance(rule, Mapping) and rule.get("action") in ("alert", "clip"):
                problems.append((f"guard.policy.escalation[{i}].action",
                                 f"escalating on {rule.get('action')!r} counts rank-local "
                                 "decisions under dist.local_sgd; escalate on skip, rollback or "
                                 "lr_backoff"))
    return problems


NOT_SCHEDULES = {"LRScheduler", "_LRScheduler", "SequentialLR", "ChainedScheduler"}


def schedule_names() -> list[str]:
    """torch.optim.lr_scheduler classes usable by name (composites are built from warm-up)."""
    import inspect

    from torch.optim import lr_scheduler

    names = []
    for name, obj in vars(lr_scheduler).items():
        if (inspect.isclass(obj) and not name.startswith("_") and name not in NOT_SCHEDULES
                and (issubclass(obj, lr_scheduler.LRScheduler) or name == "ReduceLROnPlateau")):
            names.append(name)
    return sorted(names)


# =============================================================== writing
def dumps(data: Mapping[str, Any]) -> str:
    """TOML text for a config mapping (``None`` values are left out: they are the defaults)."""
    lines: list[str] = []
    _emit_table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items()
               if v is not None and not (isinstance(v, Mapping) and not _inline(v))}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping) and not _inline(v)}
    if path and (scalars or not tables):
        lines.append("")
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables.items():
        _emit_table(lines, [*path, key], value)


def _inline(value: Mapping[str, Any]) -> bool:
    """Empty tables are written inline (``options = {}``) so they survive a round trip."""
    return not value


def _key(key: str) -> str:
    import re

    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _value(key)


def _value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")
