"""The flight recorder: an optimizer's internal state as metrics, at near-zero cost.

:class:`Recorder` attaches to any :class:`torch.optim.Optimizer` through
``register_step_pre_hook`` / ``register_step_post_hook`` and emits
:class:`~gradguard.watch.record.Record` objects to its sinks on three cadences:

* **every step**, only what is free: the scheduled lr per group, the step time
  and samples/s; plus, immediately, what the user (:meth:`Recorder.log`) or the
  guard (:meth:`Recorder.observe_gradients`) hands over;
* **every ``every`` steps** (the sampled tier), from a fixed-size coordinate
  sample per tensor (cost flat in model size): effective-lr and accumulator
  quantiles, the gradient norm estimate, update norm and update-to-param ratio
  (the parameters' sampled coordinates are snapshotted by the pre-step hook);
* **every ``full_every`` steps** (the full tier), exact full-tensor reductions:
  parameter, gradient and moment norms, accumulator mean/max/growth, non-finite
  counts, state bytes, embedding-row statistics.

What each quantity means for each algorithm comes from its
:class:`~gradguard.watch.schema.StateSchema`.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import quantities as q
from .record import RUN_GROUP, MetricValue, Record
from .sampling import CoordinateSampler, take_sparse
from .schema import Coordinates, StateSchema, schema_for, state_step
from .sinks.base import Sink

_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *args: None).__code__
"""The code of torch's hook-running wrapper around every ``step``."""

ROW_COUNT_KEYS: tuple[str, ...] = ("row_update_count", "row_update_counts", "update_count")
"""State keys holding per-row update counts of an embedding table (shape ``(rows,)``)."""

Key = tuple[int, int]
"""A parameter's position: (group index, index in the group's ``params``)."""


@dataclass
class _Table:
    """An embedding table being watched.

    With per-row update counts in the optimizer state, the counts at the
    previous full emission; otherwise a digest of each row's values at the
    previous full emission and which rows ever changed.
    """

    counts: Tensor | None = None
    projection: Tensor | None = None
    digest: Tensor | None = None
    ever_updated: Tensor | None = None


def embedding_params(model: torch.nn.Module) -> list[Tensor]:
    """The weights of every ``nn.Embedding`` and ``nn.EmbeddingBag`` in ``model``."""
    return [m.weight for m in model.modules()
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]


def group_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """The label of each group: its ``"name"``, else ``"default"`` (one group) or ``"group{i}"``."""
    labels = []
    for i, group in enumerate(param_groups):
        name = group.get("name")
        if name is not None:
            labels.append(str(name))
        else:
            labels.append("default" if len(param_groups) == 1 else f"group{i}")
    if RUN_GROUP in labels:
        raise ValueError(f"a parameter group is named {RUN_GROUP!r}, the label reserved for "
                         "run-wide values; rename the group")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"parameter groups share the names {duplicates}; group names must be "
                         "unique to label their metrics")
    return labels


def optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The optimizer's class and each group's hyperparameters, as flat strings."""
    cls = type(optimizer)
    config = {"optimizer": f"{cls.__module__}.{cls.__qualname__}"}
    for label, group in zip(group_labels(optimizer.param_groups), optimizer.param_groups,
                            strict=True):
        config[f"{label}.params"] = str(len(group["params"]))
        for key, value in sorted(group.items()):
            if key in ("params", "name"):
                continue
            if isinstance(value, Tensor):
                value = value.item() if value.numel() == 1 else tuple(value.shape)
            config[f"{label}.{key}"] = str(value)
    return config


def _check_cadence(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or None (off), got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    return float(value)


class Recorder:
    """Records an optimizer's state to sinks on three cadences; see the module docstring.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (gradguard's or torch's).
        sinks: where records go (:class:`~gradguard.watch.JsonlSink`, ...).
        every: steps between sampled emissions (None: off). Default 10.
        full_every: steps between exact full-tensor emissions (None: off). Default 100.
        sample_size: sampled coordinates per tensor (tensors this small or
            smaller are covered exactly). Default 1024.
        seed: seed of the coordinate sample (deterministic across runs).
        batch_size: samples per step, for ``samples_per_second`` (settable later).
        embeddings: parameters to treat as embedding tables (rows touched, rows
            never updated). Parameters that receive sparse gradients and 2-D
            parameters whose state keeps per-row update counts are added
            automatically. See :func:`embedding_params`.
        start_step: the step count already done (when resuming); the first
            observed step is ``start_step + 1``.
        schema: override the state schema looked up from the optimizer's class.
        on_sink_error: ``"warn"`` (default: a failing sink never stops training;
            one warning per sink, errors counted in ``sink_errors``) or ``"raise"``.

    Use as a context manager, or call :meth:`close` (which detaches the hooks
    and closes the sinks).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sinks: Iterable[Sink] = (),
        *,
        every: int | None = 10,
        full_every: int | None = 100,
        sample_size: int = 1024,
        seed: int = 0,
        batch_size: int | None = None,
        embeddings: Iterable[Tensor] | None = None,
        start_step: int = 0,
        schema: StateSchema | None = None,
        on_sink_error: str = "warn",
    ) -> None:
        if on_sink_error not in ("warn", "raise"):
            raise ValueError(f"on_sink_error must be 'warn' or 'raise', got {on_sink_error!r}")
        self.optimizer = optimizer
        self.sinks: list[Sink] = list(sinks)
        self.every = _check_cadence("every", every)
        self.full_every = _check_cadence("full_every", full_every)
        self.schema = schema if schema is not None else schema_for(optimizer)
        self._explicit_schema = schema is not None
        self._group_schemas: dict[int, StateSchema] = {}
        self.batch_size = batch_size
        self.step = int(start_step)
        """The number of optimizer steps done (the step of the latest emission)."""
        self.on_sink_error = on_sink_error
        self.sink_errors: dict[int, int] = {}
        """Write errors per sink (index in ``sinks``) under ``on_sink_error="warn"``."""
        self._sampler = CoordinateSampler(sample_size, seed)
        self._seed = int(seed)
        self._snapshots: dict[Key, Tensor] = {}
        self._observed: set[tuple[int, str]] = set()
        self._accumulator_means: dict[str, tuple[int, float]] = {}
        self._tables: dict[Key, _Table] = {}
        self._weight_cache: dict[int, tuple[tuple[tuple[int, int], ...], Tensor]] = {}
        self._last_step_time: float | None = None
        self._discovered = False
        self._warned_schema = False
        self._depth = 0
        self._closed = False

        group_labels(optimizer.param_groups)  # refuse unusable group names early
        wanted = {id(p) for p in embeddings} if embeddings is not None else set()
        for key, p in self._params():
            if id(p) in wanted:
                self._watch_table(key, p)

        config = optimizer_config(optimizer)
        config.update({"watch.schema": self.schema.name, "watch.every": str(self.every),
                       "watch.full_every": str(self.full_every),
                       "watch.sample_size": str(sample_size), "watch.seed": str(seed)})
        self._for_each_sink("start", config)
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ------------------------------------------------------------ public API
    def log(self, step: int, loss: float | Tensor | None = None, **extra: float | Tensor) -> None:
        """Emit user values for ``step`` now, as a run-wide record (group ``"all"``).

        ``loss`` and every keyword must be a number or a one-element tensor
        (reading a tensor synchronises with its device).
        """
        metrics: dict[str, MetricValue] = {}
        if loss is not None:
            metrics["loss"] = _number(loss)
        for name, value in extra.items():
            try:
                metrics[name] = _number(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"Recorder.log: value of {name!r} must be a number or a "
                                f"1-element tensor, got {value!r}") from err
        if metrics:
            self._emit([Record(int(step), time.time(), RUN_GROUP, ("log",), metrics)])

    def observe_gradients(self, norm: float | Tensor | None = None,
                          nonfinite: int | Tensor | None = None, *, group: str | None = None,
                          step: int | None = None) -> None:
        """Hand over a gradient norm / non-finite count someone already computed.

        For the guard and for gradient clipping, which compute both in their
        pass over the gradients before ``optimizer.step()``: call this before the
        step (or instead of it, when the step is skipped) and the values are
        emitted at once, every step, at no extra cost. ``group`` is the group
        label the values belong to (None: all groups together, label ``"all"``);
        ``step`` defaults to the step about to be taken (``recorder.step + 1``).
        A group whose values were observed for a step is not re-reduced by the
        full tier at that step.
        """
        label = RUN_GROUP if group is None else group
        at = self.step + 1 if step is None else int(step)
        metrics: dict[str, MetricValue] = {}
        if norm is not None:
            metrics["grad_norm"] = _number(norm)
        if nonfinite is not None:
            metrics["nonfinite_gradients"] = int(_number(nonfinite))
        if metrics:
            self._observed.add((at, label))
            self._emit([Record(at, time.time(), label, ("step",), metrics)])

    def flush(self) -> None:
        """Push buffered records of every sink out."""
        self._for_each_sink("flush")

    def detach(self) -> None:
        """Remove the optimizer hooks; the sinks stay open (``log`` still works)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def close(self) -> None:
        """Detach from the optimizer, then flush and close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        self._for_each_sink("close")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def is_sampled_step(self, step: int) -> bool:
        """Whether ``step`` gets a sampled-tier emission."""
        return self.every is not None and step % self.every == 0

    def is_full_step(self, step: int) -> bool:
        """Whether ``step`` gets a full-tier emission."""
        return self.full_every is not None and step % self.full_every == 0

    # ----------------------------------------------------------------- hooks
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A subclass whose step() calls super().step() runs the hooks of the
        # same optimizer twice, nested; only the outermost call is a step.
        if self._depth > 0 and self._steps_on_stack() < 2:
            self._depth = 0  # left over from a step that raised before its post hooks
        self._depth += 1
        if self._depth > 1:
            return
        if not self._discovered:
            self._discovered = True
            for key, p in self._params():
                if p.grad is not None and p.grad.is_sparse and p.dim() == 2:
                    self._watch_table(key, p)
        if self.is_sampled_step(self.step + 1):
            self.snapshot()

    def snapshot(self) -> None:
        """Keep the parameters' sampled coordinates as they are before the step."""
        indices = self._sampler.indices
        with torch.no_grad():
            self._snapshots = {key: torch.take(p, indices(key, p)) for key, p in self._params()}

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth > 0:
            return
        self.step += 1
        now = time.perf_counter()
        records = self.measure(self.step, now)
        self._emit(records)

    def measure(self, step: int, now: float | None = None) -> list[Record]:
        """The records of ``step``: the every-step values, plus the tiers due at ``step``.

        Called by the post-step hook; callable directly (e.g. to time one emission).
        """
        if self.is_sampled_step(step) or self.is_full_step(step):
            with torch.no_grad():
                return self._measure(step, now)
        return self._measure(step, now)

    def _measure(self, step: int, now: float | None) -> list[Record]:
        wall = time.time()
        groups = self.optimizer.param_groups
        labels = group_labels(groups)
        tiers = ["step"]
        sampled, full = self.is_sampled_step(step), self.is_full_step(step)
        if sampled:
            tiers.append("sampled")
        if full:
            tiers.append("full")
        run: dict[str, MetricValue] = {}
        if now is not None:
            if self._last_step_time is not None:
                step_time = now - self._last_step_time
                run["step_time"] = step_time
                if self.batch_size and step_time > 0:
                    run["samples_per_second"] = self.batch_size / step_time
            self._last_step_time = now
        records = [Record(step, wall, RUN_GROUP, tuple(tiers), run)] if run else []
        for gi, (label, group) in enumerate(zip(labels, groups, strict=True)):
            metrics: dict[str, MetricValue] = {}
            if group.get("lr") is not None:
                metrics["lr"] = _number(group["lr"])
            samples: dict[str, Tensor] = {}
            observed = (step, label) in self._observed
            if sampled:
                self._sampled_tier(gi, group, metrics, samples, skip_grad=observed)
            if full:
                self._full_tier(gi, label, step, group, metrics, skip_grad=observed)
            records.append(Record(step, wall, label, tuple(tiers), metrics, samples))
        if sampled:
            self._snapshots = {}
        if self._observed:
            self._observed = {o for o in self._observed if o[0] > step}
        return records

    # ---------------------------------------------------------------- tiers
    def schema_of(self, group: Mapping[str, Any]) -> StateSchema:
        """The schema of one parameter group: its inner optimizer's for a ``Hybrid``.

        An optimizer made of others (an ``optimizers`` mapping whose param groups
        are the same objects, as :class:`gradguard.optim.Hybrid`) is measured
        group by group with each inner optimizer's schema, unless a schema was
        given to the recorder.
        """
        if self._explicit_schema:
            return self.schema
        found = self._group_schemas.get(id(group))
        if found is None:
            found = self.schema
            inner = getattr(self.optimizer, "optimizers", None)
            if isinstance(inner, Mapping):
                for optimizer in inner.values():
                    if any(g is group for g in getattr(optimizer, "param_groups", ())):
                        found = schema_for(optimizer)
                        break
            self._group_schemas[id(group)] = found
        return found

    def _sampled_tier(self, gi: int, group: Mapping[str, Any], metrics: dict[str, MetricValue],
                      samples: dict[str, Tensor], *, skip_grad: bool) -> None:
        """Sampled-coordinate statistics of one group, a few whole-group tensor ops.

        Per tensor only the gathers (``torch.take``) run; everything else works
        on the group's concatenated sample, so the cost is flat in model size.
        """
        schema = self.schema_of(group)
        f64 = torch.float64
        state_of = self.optimizer.state
        sampler = self._sampler
        snapshots = self._snapshots
        params: list[Tensor] = []
        indices: list[Tensor] = []
        sizes: list[int] = []
        states: list[Mapping[str, Any]] = []
        afters: list[Tensor] = []
        befores: list[Tensor] | None = []
        grads: list[Tensor] = []
        sparse_grad_sq: list[Tensor] = []
        has_grad = False
        for pi, p in enumerate(group["params"]):
            key = (gi, pi)
            index = sampler.indices(key, p)
            size = index.numel()
            if size == 0:
                continue
            params.append(p)
            indices.append(index)
            sizes.append(size)
            states.append(state_of.get(p) or {})
            afters.append(torch.take(p, index))
            if befores is not None:
                before = snapshots.get(key)
                if before is not None and before.numel() == size:
                    befores.append(before)
                else:
                    befores = None
            grad = p.grad
            if grad is None:
                grads.append(torch.zeros(size, dtype=p.dtype, device=p.device))
            elif grad.is_sparse:
                has_grad = True
                if p.dim() == 2 and key not in self._tables:
                    self._watch_table(key, p)
                # Exact and cheap: a sparse gradient stores only the batch's rows.
                sparse_grad_sq.append(grad.coalesce().values().to(f64).square().sum())
                grads.append(take_sparse(grad, index, p.shape))
            else:
                has_grad = True
                grads.append(torch.take(grad, index))
        if not params:
            return
        weights = self._weights(gi, params, indices)
        after = _cat64(afters)
        before_all = _cat64(befores) if befores else None
        param = before_all if before_all is not None else after
        grad_all = _cat64(grads)

        # grad, update and parameter squared norms, weighted: one matrix-vector product
        dense_grad = grad_all
        if sparse_grad_sq:  # their norms are exact already; keep them out of the estimate
            mask = torch.cat([torch.full((n,), float(not (p.grad is not None and p.grad.is_sparse)),
                                         dtype=f64, device=weights.device)
                              for p, n in zip(params, sizes, strict=True)])
            dense_grad = grad_all * mask
        rows = [dense_grad] if before_all is None else [dense_grad, after - before_all, before_all]
        totals = (torch.stack(rows).square_() @ weights).tolist()
        if sparse_grad_sq:
            totals[0] += float(torch.stack(sparse_grad_sq).sum())
        if has_grad and not skip_grad:
            metrics["grad_norm_estimate"] = math.sqrt(totals[0])
        if before_all is not None:
            update_norm = math.sqrt(totals[1])
            metrics["update_norm"] = update_norm
            if totals[2] > 0:
                metrics["update_ratio"] = update_norm / math.sqrt(totals[2])

        lr_parts: list[tuple[Tensor, Tensor]] = []
        acc_parts: list[tuple[Tensor, Tensor]] = []
        for batch in self._batches(schema, params, states):
            if len(batch) == len(params):
                coords = Coordinates(group, states, indices, [p.shape for p in params],
                                     param, grad_all, weights)
            else:
                offsets = [0, *itertools.accumulate(sizes)]
                positions = torch.cat([torch.arange(offsets[i], offsets[i + 1])
                                       for i in batch]).to(weights.device)
                coords = Coordinates(group, [states[i] for i in batch],
                                     [indices[i] for i in batch],
                                     [params[i].shape for i in batch], param[positions],
                                     grad_all[positions], weights[positions])
            if schema.effective_lr is not None:
                try:
                    value = schema.effective_lr(coords)
                except KeyError as missing:
                    self._schema_mismatch(missing)
                    value = None
                if value is not None:
                    if not isinstance(value, Tensor):
                        value = torch.full((coords.size,), float(value), dtype=f64,
                                           device=weights.device)
                    lr_parts.append((value.expand(coords.size), coords.weights))
            if schema.accumulator is not None and all(
                    isinstance(states[i].get(schema.accumulator), Tensor) for i in batch):
                try:
                    acc_parts.append((coords.state(schema.accumulator), coords.weights))
                except KeyError as missing:  # state of a shape that does not map onto params
                    self._schema_mismatch(missing)
        if lr_parts:
            values, value_weights = _join(lr_parts)
            metrics["effective_lr"] = q.quantiles(values, value_weights)
            samples["effective_lr"] = values
        if acc_parts:
            metrics["accumulator"] = q.quantiles(*_join(acc_parts))

    def _schema_mismatch(self, missing: KeyError) -> None:
        if not self._warned_schema:
            self._warned_schema = True
            warnings.warn(
                f"gradguard.watch: the {self.schema.name} schema does not fit the state of "
                f"{type(self.optimizer).__name__} (state key {missing} missing or shaped "
                "unlike its parameter); those tensors are left out of the effective-lr and "
                "accumulator distributions. Register a schema with "
                "gradguard.watch.register_schema.", RuntimeWarning, stacklevel=4)

    @staticmethod
    def _batches(schema: StateSchema, params: list[Tensor],
                 states: list[Mapping[str, Any]]) -> list[list[int]]:
        """Positions of tensors that one effective-lr call can handle together."""
        if schema.per_tensor:
            return [[i] for i in range(len(params))]
        by_step: dict[float, list[int]] = {}
        for i, st in enumerate(states):
            if schema.needs_state and not st:
                continue
            by_step.setdefault(state_step(st), []).append(i)
        return list(by_step.values())

    def _weights(self, gi: int, params: list[Tensor], indices: list[Tensor]) -> Tensor:
        """Per sampled coordinate: how many coordinates of its tensor it stands for."""
        signature = tuple((p.numel(), i.numel()) for p, i in zip(params, indices, strict=True))
        cached = self._weight_cache.get(gi)
        if cached is not None and cached[0] == signature:
            return cached[1]
        weights = torch.cat([torch.full((k,), n / k, dtype=torch.float64, device=i.device)
                             for (n, k), i in zip(signature, indices, strict=True)])
        self._weight_cache[gi] = (signature, weights)
        return weights

    def _full_tier(self, gi: int, label: str, step: int, group: Mapping[str, Any],
                   metrics: dict[str, MetricValue], *, skip_grad: bool) -> None:
        schema = self.schema_of(group)
        params: list[Tensor] = list(group["params"])
        param_norms = q.norms(params)
        metrics["param_norm"] = math.sqrt(sum(n * n for n in param_norms))
        metrics["nonfinite_params"] = q.count_nonfinite(
            [p for p in params if p.numel() > 0], param_norms)

        if not skip_grad:
            dense = [p.grad for p in params
                     if p.grad is not None and not p.grad.is_sparse and p.grad.numel() > 0]
            sparse = [p.grad.coalesce() for p in params
                      if p.grad is not None and p.grad.is_sparse]
            if dense or sparse:
                grad_norms = q.norms(dense) + q.norms([g.values() for g in sparse])
                metrics["grad_norm"] = math.sqrt(sum(n * n for n in grad_norms))
                metrics["nonfinite_gradients"] = (
                    q.count_nonfinite(dense, grad_norms[:len(dense)])
                    + q.count_nonfinite([g.values() for g in sparse], grad_norms[len(dense):]))

        states = [s for s in (self.optimizer.state.get(p) for p in params) if s]
        metrics["state_bytes"] = sum(q.state_bytes(s.values()) for s in states)
        tensors = [v for s in states for v in s.values()
                   if isinstance(v, Tensor) and v.numel() > 0 and v.is_floating_point()]
        state_norms = q.norms(tensors)
        metrics["nonfinite_state"] = q.count_nonfinite(tensors, state_norms)
        norm_of = {id(t): n for t, n in zip(tensors, state_norms, strict=True)}

        if schema.first_moment is not None:
            moments = [s[schema.first_moment] for s in states
                       if isinstance(s.get(schema.first_moment), Tensor)]
            if moments:
                metrics["first_moment_norm"] = math.sqrt(
                    sum(norm_of.get(id(t), 0.0) ** 2 for t in moments))
        if schema.accumulator is not None:
            accumulators = [s[schema.accumulator] for s in states
                            if isinstance(s.get(schema.accumulator), Tensor)
                            and s[schema.accumulator].numel() > 0]
            if accumulators:
                metrics["second_moment_norm"] = math.sqrt(
                    sum(norm_of.get(id(t), 0.0) ** 2 for t in accumulators))
                total = torch.stack([t.detach().sum().to(torch.float64).cpu()
                                     for t in accumulators]).sum().item()
                count = sum(t.numel() for t in accumulators)
                mean = total / count
                metrics["accumulator_mean"] = mean
                metrics["accumulator_max"] = torch.stack(
                    [t.detach().amax().to(torch.float64).cpu() for t in accumulators]
                ).amax().item()
                previous = self._accumulator_means.get(label)
                if previous is not None and step > previous[0]:
                    metrics["accumulator_growth"] = (mean - previous[1]) / (step - previous[0])
                self._accumulator_means[label] = (step, mean)

        self._embedding_rows(gi, params, metrics)

    def _embedding_rows(self, gi: int, params: list[Tensor],
                        metrics: dict[str, MetricValue]) -> None:
        rows = touched = never = 0
        all_counts: list[Tensor] = []
        for pi, p in enumerate(params):
            key = (gi, pi)
            counts = _row_counts(self.optimizer.state.get(p), p)
            if key not in self._tables:
                if counts is None:
                    continue
                self._watch_table(key, p)
            table = self._tables[key]
            rows += p.shape[0]
            if counts is not None:
                # the optimizer counts updates per row: exact, and O(rows)
                previous = table.counts if table.counts is not None else torch.zeros_like(counts)
                touched += int((counts != previous).sum().item())
                never += int((counts == 0).sum().item())
                table.counts = counts.clone()
                all_counts.append(counts)
                continue
            if table.projection is None or table.digest is None or table.ever_updated is None:
                self._start_digest(table, p)
                continue  # a baseline now; changes are counted from the next emission
            digest = q.row_digest(p, table.projection)
            changed = digest != table.digest
            table.digest = digest
            table.ever_updated |= changed
            touched += int(changed.sum().item())
            never += int((~table.ever_updated).sum().item())
        if rows:
            metrics["embedding_rows"] = rows
            metrics["embedding_rows_touched"] = touched
            metrics["embedding_rows_never_updated"] = never
        if all_counts:
            metrics["embedding_row_update_count"] = q.quantiles(torch.cat(all_counts))

    # --------------------------------------------------------------- helpers
    def _steps_on_stack(self) -> int:
        """How many hooked ``step`` calls of this optimizer are running (rare path)."""
        count = 0
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code is _STEP_WRAPPER_CODE and frame.f_locals.get("self") is self.optimizer:
                count += 1
            frame = frame.f_back  # type: ignore[assignment]
        return count

    def _params(self) -> Iterator[tuple[Key, Tensor]]:
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                yield (gi, pi), p

    def _watch_table(self, key: Key, p: Tensor) -> None:
        if p.dim() < 2:
            raise ValueError(f"parameter {key[1]} of group {key[0]} has shape {tuple(p.shape)}; "
                             "an embedding table has rows (2 or more dimensions)")
        table = _Table()  # with row counts, the first emission compares with zero counts
        if _row_counts(self.optimizer.state.get(p), p) is None:
            self._start_digest(table, p, key)
        self._tables[key] = table

    def _start_digest(self, table: _Table, p: Tensor, key: Key = (0, 0)) -> None:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        gen = torch.Generator().manual_seed(self._seed + 7919 * (key[0] * 65_537 + key[1]))
        table.projection = torch.randn(p[0].numel(), generator=gen, dtype=dtype).to(p.device)
        table.digest = q.row_digest(p, table.projection)
        table.ever_updated = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)

    def _emit(self, records: Sequence[Record]) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                sink.write(records)
            except Exception as err:
                self._sink_failed(i, sink, "write", err)

    def _for_each_sink(self, method: str, *args: Any) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as err:
                self._sink_failed(i, sink, method, err)

    def _sink_failed(self, index: int, sink: Sink, method: str, err: Exception) -> None:
        if self.on_sink_error == "raise":
            raise err
        self.sink_errors[index] = self.sink_errors.get(index, 0) + 1
        if self.sink_errors[index] == 1:
            warnings.warn(f"gradguard.watch: {type(sink).__name__}.{method} failed ({err!r}); "
                          "training continues, further errors of this sink are only counted "
                          "in Recorder.sink_errors", RuntimeWarning, stacklevel=3)


def _row_counts(state: Mapping[str, Any] | None, p: Tensor) -> Tensor | None:
    """The per-row update counts an optimizer keeps for a 2-D parameter, if it does."""
    if not state or p.dim() < 2:
        return None
    for key in ROW_COUNT_KEYS:
        value = state.get(key)
        if isinstance(value, Tensor) and value.numel() == p.shape[0]:
            return value.detach().reshape(-1)
    return None


def _cat64(tensors: list[Tensor]) -> Tensor:
    joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return joined if joined.dtype == torch.float64 else joined.to(torch.float64)


def _join(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    if len(parts) == 1:
        return parts[0]
    return torch.cat([v for v, _ in parts]), torch.cat([w for _, w in parts])
