"""Fixed-size, deterministic coordinate samples: distributions at a cost flat in model size.

Each tensor gets at most ``size`` flat coordinates, drawn once from a seed derived
from the recorder's seed and the tensor's position (group index, parameter
index), sorted for memory locality, and re-drawn only when the tensor's shape
changes. A tensor with ``numel <= size`` is covered completely, so every sampled
statistic of it is exact.

Statistics over a group combine tensors of different sizes; each sampled
coordinate of a tensor stands for ``numel / k`` coordinates (its *weight*), so
weighted quantiles and scaled sums estimate the group's full distribution and
norms without bias towards small tensors.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable

import torch
from torch import Tensor


class CoordinateSampler:
    """Chooses, caches and hands out the sampled flat coordinates of each tensor."""

    def __init__(self, size: int = 1024, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sample_size must be an integer >= 1, got {size!r}")
        self.size = size
        self.seed = int(seed)
        self._cache: dict[Hashable, tuple[torch.Size, torch.device, Tensor]] = {}

    def indices(self, key: Hashable, tensor: Tensor) -> Tensor:
        """Sorted int64 flat coordinates of ``tensor`` (on its device) for ``key``."""
        cached = self._cache.get(key)
        if cached is not None and cached[0] == tensor.shape and cached[1] == tensor.device:
            return cached[2]
        index = draw(tensor.numel(), self.size, self._seed_for(key)).to(tensor.device)
        self._cache[key] = (tensor.shape, tensor.device, index)
        return index

    def _seed_for(self, key: Hashable) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(repr(key).encode())) % (2**63)


def draw(numel: int, size: int, seed: int) -> Tensor:
    """``min(numel, size)`` distinct sorted coordinates of ``range(numel)``, reproducibly.

    Costs O(size) for large tensors (rejection of repeats), never O(numel),
    except below ``4 * size`` where a permutation is cheaper than rejection.
    """
    if numel <= size:
        return torch.arange(numel, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    if numel <= 4 * size:
        return torch.randperm(numel, generator=gen)[:size].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < size:
        extra = torch.randint(numel, (size - chosen.numel(),), generator=gen, dtype=torch.int64)
        chosen = torch.unique(torch.cat([chosen, extra]))
    return chosen


def take(values: Tensor, index: Tensor, shape: torch.Size) -> Tensor | None:
    """``values`` at the flat coordinates ``index`` of a tensor shaped ``shape``.

    State kept per row (a prefix of the parameter's shape, e.g. row-wise
    accumulators) or as one scalar is broadcast to the coordinates; a tensor of
    any other shape gives None.
    """
    if values.is_sparse:
        return take_sparse(values, index, shape)
    if values.shape == shape:
        return torch.take(values, index)
    if values.dim() == 0:
        return values.reshape(1).expand(index.numel())
    if values.shape == shape[: values.dim()]:
        inner = math.prod(shape[values.dim():])
        return torch.take(values, torch.div(index, inner, rounding_mode="floor"))
    return None


def take_sparse(values: Tensor, index: Tensor, shape: torch.Size) -> Tensor:
    """A sparse COO tensor (e.g. an embedding gradient) at flat coordinates ``index``.

    Coalesces (O(nnz log nnz), bounded by the batch, not the table) and looks the
    sampled rows up by binary search; coordinates in rows absent from the
    gradient are 0.
    """
    coalesced = values.coalesce()
    if coalesced.sparse_dim() != 1:
        return torch.take(coalesced.to_dense(), index)
    inner = math.prod(shape[1:])
    rows = coalesced.indices()[0]
    dense_rows = coalesced.values().reshape(rows.numel(), inner)
    out = torch.zeros(index.numel(), dtype=values.dtype, device=values.device)
    if rows.numel() == 0:
        return out
    wanted = torch.div(index, inner, rounding_mode="floor")
    pos = torch.searchsorted(rows, wanted).clamp_(max=rows.numel() - 1)
    hit = rows[pos] == wanted
    out[hit] = dense_rows[pos[hit], (index % inner)[hit]]
    return out
