"""Replica consistency: bitwise checksums of parameters and optimizer state, compared across ranks.

Data-parallel replicas apply the same update to the same parameters, so they
stay *bitwise* identical; anything else is failure mode F3 (distributed
divergence: a rank that skipped a step alone, a parameter changed outside the
optimizer, unsynchronised accumulators, a bad restore). :func:`checksums`
reduces every tensor to two 64-bit integers computed from its bits (its
elements read as integers, the even-indexed ones summed and the odd-indexed
ones summed, modulo 2^64): exact, independent of summation order, and one read
of the tensor on its own device (no copy). :func:`compare` finds which ranks
and which tensors differ from rank 0 after an all-gather.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(tensor: Tensor) -> Tensor:
    """Two int64 numbers from the bits of ``tensor``: the sums of its even- and odd-indexed words.

    Each element is read as an integer of its size (a float32 as an int32, ...).
    Equal tensors (same dtype, shape and bits) give equal checksums; a change of
    any one element changes them, and so does swapping neighbours; several changes
    that compensate exactly would not (drift does not).
    """
    t = tensor.detach()
    if t.is_sparse:
        t = t.coalesce().values()
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.contiguous().reshape(-1)
    words = t.view(_INT_VIEW[t.element_size()]) if t.dtype != torch.bool else t.view(torch.uint8)
    return torch.stack([words[0::2].sum(dtype=torch.int64), words[1::2].sum(dtype=torch.int64)])


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterable[tuple[str, Tensor]]:
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                for key in sorted(state, key=str):
                    value = state[key]
                    if isinstance(value, Tensor):
                        yield f"optimizer.state[{index}].{key}", value
                    elif isinstance(value, int | float) and not isinstance(value, bool):
                        yield (f"optimizer.state[{index}].{key}",
                               torch.tensor(float(value), dtype=torch.float64))
            index += 1


@dataclass
class Checksums:
    """Per-tensor checksums of one replica: ``names[i]`` has ``values[i]`` (two int64)."""

    names: list[str]
    values: Tensor
    """int64, shape (len(names), 2), on the CPU."""


def checksums(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Checksums:
    """Checksums of the model's parameters and (when given) the optimizer's state tensors.

    Buffers are left out: DistributedDataParallel broadcasts them from rank 0 at
    every forward, and a forward updates running statistics per rank.
    """
    names: list[str] = []
    parts: list[Tensor] = []
    for name, param in model.named_parameters():
        names.append(f"model.{name}")
        parts.append(tensor_checksum(param).cpu())
    if optimizer is not None:
        for name, value in _state_tensors(optimizer):
            names.append(name)
            parts.append(tensor_checksum(value).cpu())
    values = torch.stack(parts) if parts else torch.zeros((0, 2), dtype=torch.int64)
    return Checksums(names, values)


@dataclass
class Mismatch:
    """Ranks whose replica differs from rank 0's, and what differs."""

    ranks: list[int]
    """Ranks (other than 0) that differ from rank 0."""
    tensors: dict[int, list[str]] = field(default_factory=dict)
    """Per differing rank, the names of the tensors that differ (all of them)."""
    structure: dict[int, str] = field(default_factory=dict)
    """Per rank whose set of tensors differs from rank 0's: how."""

    def evidence(self, limit: int = 10) -> dict[str, Any]:
        """For the audit log: the ranks, and up to ``limit`` tensor names per rank."""
        return {"ranks": self.ranks,
                "tensors": {str(r): names[:limit] for r, names in self.tensors.items()},
                "differing_tensors": {str(r): len(names) for r, names in self.tensors.items()},
                "structure": {str(r): why for r, why in self.structure.items()}}

    def message(self) -> str:
        parts = []
        for r in self.ranks:
            if r in self.structure:
                parts.append(f"rank {r}: {self.structure[r]}")
            else:
                names = self.tensors.get(r, [])
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                                else "")
                parts.append(f"rank {r}: {len(names)} tensor(s) differ ({shown})")
        return "replicas differ from rank 0: " + "; ".join(parts)


def compare(names: list[list[str]], values: list[Tensor]) -> Mismatch | None:
    """Which ranks' checksums differ from rank 0's (``names``/``values`` in rank order)."""
    reference_names, reference = names[0], values[0]
    differing: list[int] = []
    mismatch = Mismatch([])
    for r in range(1, len(values)):
        if names[r] != reference_names:
            missing = sorted(set(reference_names) - set(names[r]))
            extra = sorted(set(names[r]) - set(reference_names))
            mismatch.structure[r] = ("holds other tensors than rank 0"
                                     + (f" (missing {', '.join(missing[:3])})" if missing else "")
                                     + (f" (extra {', '.join(extra[:3])})" if extra else ""))
            differing.append(r)
            continue
        rows = (values[r] != reference).any(dim=1).nonzero().flatten().tolist()
        if rows:
            mismatch.tensors[r] = [reference_names[i] for i in rows]
            differing.append(r)
    if not differing:
        return None
    mismatch.ranks = differing
    return mismatch
