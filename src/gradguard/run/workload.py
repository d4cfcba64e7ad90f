"""The workload protocol: what `gradguard train` needs from a data source + model.

A workload factory is any callable ``factory(*, seed: int, **options) -> Workload``.
Built-in ones are registered by name (``ctr``, ``digits``, ``mnist1d``,
``quadratic``, ``rosenbrock``); a user's is named by import path,
``"package.module:factory"``. ``options`` are the keys of the config's
``[workload.options]`` table, passed as keyword arguments.

Data lives in memory as tuples of tensors sharing their first dimension
(:class:`TensorData`). The training loop owns shuffling and batching (a
``torch.Generator`` seeded from the run's seed and the epoch), so the data
position of a run is two integers (epoch, batch) and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Batch = tuple[Tensor, ...]
"""One batch: the workload's tensors, each indexed by the same sample indices."""


@dataclass
class TensorData:
    """A data split: tensors whose first dimension is the sample index.

    ``tensors`` may be empty for analytic problems (no data; every step is the
    whole problem). ``content_hash`` is filled by :meth:`fingerprint`.
    """

    tensors: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in self.tensors}
        if len(sizes) > 1:
            raise ValueError("TensorData: tensors disagree on the number of samples: "
                             f"{sorted(sizes)}")

    def __len__(self) -> int:
        return self.tensors[0].shape[0] if self.tensors else 0

    def batch(self, index: Tensor) -> Batch:
        """The samples at ``index`` (a 1-D long tensor) from every tensor."""
        return tuple(t[index] for t in self.tensors)

    def all(self) -> Batch:
        return self.tensors

    def fingerprint(self) -> str:
        """sha256 of the split's bytes (dtype, shape and values of every tensor)."""
        import hashlib

        h = hashlib.sha256()
        for t in self.tensors:
            c = t.detach().cpu().contiguous()
            h.update(f"{c.dtype}:{tuple(c.shape)};".encode())
            h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
        return h.hexdigest()


@dataclass
class Target:
    """The documented goal of a workload: ``metric`` reaching ``value`` (see ``mode``)."""

    metric: str
    value: float
    mode: Literal["min", "max"]

    def reached(self, value: float) -> bool:
        return value <= self.value if self.mode == "min" else value >= self.value


@dataclass
class Workload:
    """A data source, a model, its loss and its evaluation.

    Attributes:
        name: short name (``"ctr"``, ``"digits"``, ``"pkg.mod:factory"``).
        model: the ``torch.nn.Module`` to train (on CPU; the loop moves it).
        train: training split.
        eval: evaluation split (the loop evaluates on it every ``eval_every``
            steps and at the end).
        loss: ``loss(model, batch) -> scalar tensor`` (mean over the batch).
        evaluate: ``evaluate(model, batch) -> {metric: float}`` on a whole split
            or a chunk of it, with ``torch.no_grad`` already set by the caller;
            every metric must be a mean over samples (the loop averages chunks
            weighted by their sizes).
        primary_metric: the metric early stopping, ``keep_best`` and the report
            use; ``mode`` says whether lower (``"min"``) or higher is better.
        target: the documented target (None: none).
        full_batch: True for analytic problems: every step uses the whole
            training split (closure-based optimizers such as line search work).
        embeddings: names of the model's embedding-table parameters (for hybrid
            optimizers' ``"embeddings"`` group and the recorder); default:
            every ``nn.Embedding`` / ``nn.EmbeddingBag`` weight.
        slices: named boolean masks over the eval split for per-slice metrics.
        info: facts about the problem shown in the report (e.g. the
            ground-truth log-loss of a generated data set, the optimum).
    """

    name: str
    model: torch.nn.Module
    train: TensorData
    eval: TensorData
    loss: Callable[[torch.nn.Module, Batch], Tensor]
    evaluate: Callable[[torch.nn.Module, Batch], dict[str, float]]
    primary_metric: str
    mode: Literal["min", "max"]
    target: Target | None = None
    full_batch: bool = False
    embeddings: list[str] | None = None
    slices: Mapping[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"Workload {self.name!r}: mode must be 'min' or 'max', "
                             f"got {self.mode!r}")
        for name, mask in self.slices.items():
            if mask.dtype != torch.bool or mask.shape != (len(self.eval),):
                raise ValueError(f"Workload {self.name!r}: slice {name!r} must be a bool mask of "
                                 f"shape ({len(self.eval)},), got {mask.dtype} {tuple(mask.shape)}")


WorkloadFactory = Callable[..., Workload]
