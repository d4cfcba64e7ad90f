"""TensorBoard: scalars per group and metric, histograms of the sampled effective lr."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ..record import Record
from .base import Sink, require


class TensorBoardSink(Sink):
    """Writes event files to ``log_dir`` through ``torch.utils.tensorboard.SummaryWriter``.

    Tags: ``{group}/{metric}`` for scalars, ``{group}/{metric}/{quantile}`` for
    distributions (quantile keys min, p01, ..., max) and a histogram
    ``{group}/{metric}`` of each sampled distribution's raw values (finite ones)
    when ``histograms`` is true. The optimizer configuration goes in as text
    (tag ``gradguard/config``). Needs ``pip install 'gradguard[tensorboard]'``.
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, histograms: bool = True,
                 flush_secs: int = 10) -> None:
        require("tensorboard", "tensorboard", "TensorBoardSink")
        writer_module = require("torch.utils.tensorboard", "tensorboard", "TensorBoardSink")
        self.log_dir = str(log_dir)
        self.histograms = histograms
        self.writer = writer_module.SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)

    def start(self, config: Mapping[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in config.items())
        self.writer.add_text("gradguard/config", "| key | value |\n|---|---|\n" + table)

    def write(self, records: Sequence[Record]) -> None:
        add = self.writer.add_scalar
        for r in records:
            for name, value in r.metrics.items():
                if isinstance(value, dict):
                    for quantile, x in value.items():
                        add(f"{r.group}/{name}/{quantile}", x, r.step, walltime=r.wall_time)
                else:
                    add(f"{r.group}/{name}", value, r.step, walltime=r.wall_time)
            if self.histograms:
                for name, values in r.samples.items():
                    finite = values[torch.isfinite(values)].cpu()
                    if finite.numel():
                        self.writer.add_histogram(f"{r.group}/{name}", finite, r.step,
                                                  walltime=r.wall_time)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
