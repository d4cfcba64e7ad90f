"""Row-sparse gradients: the rows of a parameter, coalescing, and the kernel dispatch.

The gradient of ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)``
is a sparse COO tensor with one row of values per lookup: a row looked up three
times in a batch appears three times. An update that is non-linear in the
gradient (every adaptive one) first *coalesces* it, summing the values of each
distinct row, then reads and writes the touched rows only (lazy updates).

Each sparse-capable optimizer has two paths that compute the same numbers:

* **torch ops** (any device, always there; the only one with ``impl="reference"``):
  :func:`coalesce` (``torch.unique`` + ``index_add_``), ``index_select`` of the
  touched rows of the parameter and its state, the update on the gathered rows,
  ``index_copy_`` back. Written next to each algorithm's dense path;
* **compiled CPU kernels** (:mod:`gradguard.optim._sparse_kernels`, numba:
  ``pip install gradguard[fast]``): a hash table finds the distinct rows in one
  pass over the lookups (no sort) and sums the duplicates, then one pass updates
  each touched row in place, prefetching ahead, on up to
  ``torch.get_num_threads()`` threads. float32/float64 CPU tensors whose
  state has the parameter's dtype; anything else takes the torch ops.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _hugepages as hugepages

KERNEL_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float64})
"""Parameter dtypes the compiled kernels take."""

ROW_COUNT_KEY = "row_update_count"
"""State key of the per-row update counts (int64, one per row along dim 0), kept when a
group has ``count_row_updates=True``; ``gradguard.watch`` reads it under this name."""


@dataclass(frozen=True)
class RowGrad:
    """A sparse gradient as rows of its parameter viewed as ``(num_rows, row_size)``.

    ``rows[i]`` is the row of lookup ``i`` (repeated when a row was looked up more
    than once) and ``values[i]`` its gradient.
    """

    rows: Tensor
    values: Tensor
    num_rows: int


def row_grad(param: Tensor, grad: Tensor) -> RowGrad:
    """``grad`` (sparse COO, shaped like ``param``) as rows of ``param``.

    The sparse dimensions index the rows (one for embedding tables); the dense
    dimensions of the values are the row.
    """
    sparse_dims = grad.sparse_dim()
    indices, values = grad._indices(), grad._values()
    shape = tuple(param.shape)
    rows = indices[0]
    for axis in range(1, sparse_dims):
        rows = rows * shape[axis] + indices[axis]
    return RowGrad(rows, values.reshape(values.shape[0], math.prod(shape[sparse_dims:])),
                   math.prod(shape[:sparse_dims]))


def rows_of(tensor: Tensor, num_rows: int) -> Tensor:
    """``tensor`` viewed as ``(num_rows, row_size)``; in-place updates reach ``tensor``."""
    try:
        return tensor.view(num_rows, -1)
    except RuntimeError:
        raise ValueError(
            f"a tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} cannot be "
            f"viewed as {num_rows} rows for a sparse update; make the parameter contiguous"
        ) from None


def coalesce(grad: RowGrad) -> tuple[Tensor, Tensor]:
    """The distinct rows of ``grad`` (ascending) and the sum of each one's values.

    ``torch.unique`` + ``index_add_``: duplicates are summed in lookup order.
    """
    rows, inverse = torch.unique(grad.rows, sorted=True, return_inverse=True)
    if rows.numel() and (rows[0] < 0 or rows[-1] >= grad.num_rows):
        bad = rows[0] if rows[0] < 0 else rows[-1]
        raise IndexError(f"sparse gradient row {int(bad)} is out of range for "
                         f"{grad.num_rows} rows")
    summed = grad.values.new_zeros((rows.numel(), grad.values.shape[1]))
    summed.index_add_(0, inverse, grad.values)
    return rows, summed


# ----------------------------------------------------------- row update counts
def row_counts(group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> Tensor | None:
    """The parameter's per-row update counts when its group counts them, else None.

    Created (zeros) the first time they are needed, so that switching
    ``count_row_updates`` on later works too. A 0-dim parameter has no rows.
    """
    if not group.get("count_row_updates", False) or param.dim() == 0:
        return None
    counts = state.get(ROW_COUNT_KEY)
    if counts is None:
        counts = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
        state[ROW_COUNT_KEY] = counts
    return counts


def count_all_rows(counts: Tensor | None) -> None:
    """A dense gradient updates every row."""
    if counts is not None:
        counts.add_(1)


def count_touched(counts: Tensor | None, rows: Tensor, num_rows: int) -> None:
    """Add one to the counts of the dim-0 rows holding ``rows`` (distinct rows of ``num_rows``)."""
    if counts is None or rows.numel() == 0:
        return
    rows = rows.to(counts.device)
    if num_rows != counts.numel():  # several sparse dims: rows are finer than dim-0 rows
        rows = torch.unique(rows // (num_rows // counts.numel()))
    counts.index_add_(0, rows, torch.ones_like(rows))


def check_count_flag(group: dict[str, Any]) -> None:
    """Refuse a ``count_row_updates`` group key that is not a bool."""
    value = group.get("count_row_updates", False)
    if not isinstance(value, bool):
        raise ValueError(f"count_row_updates must be True or False, got {value!r}")


def describe(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> str:
    """``"parameter 1 of param group 0 (shape (1000, 16))"``, for error messages."""
    group_index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    index = next(i for i, q in enumerate(group["params"]) if q is param)
    return f"parameter {index} of param group {group_index} (shape {tuple(param.shape)})"


# --------------------------------------------------------------------- kernels
def kernels_installed() -> bool:
    """Whether the compiled kernels can run: numba imports (it is imported on the first call)."""
    return _kernel_module() is not None


def kernel_applies(param: Tensor, *state: Tensor) -> bool:
    """Whether the compiled kernels can update ``param`` and its ``state`` in place."""
    return (param.device.type == "cpu" and param.dtype in KERNEL_DTYPES
            and param.is_contiguous()
            and all(s.device.type == "cpu" and s.dtype == param.dtype and s.is_contiguous()
                    for s in state)
            and kernels_installed())


_LOCK = threading.Lock()
_MODULE: list[ModuleType | None] = []
_POOL: list[ThreadPoolExecutor] = []


def _kernel_module() -> ModuleType | None:
    if not _MODULE:
        with _LOCK:
            if not _MODULE:
                module: ModuleType | None = None
                if importlib.util.find_spec("numba") is not None:
                    try:
                        from . import _sparse_kernels as module
                    except ImportError as err:  # numba present but unusable here
                        warnings.warn(f"gradguard's compiled sparse kernels are off ({err}); "
                                      "sparse updates use torch ops", stacklevel=3)
                _MODULE.append(module)
    return _MODULE[0]


def kernels() -> ModuleType:
    """:mod:`gradguard.optim._sparse_kernels`, imported (and numba with it) on first use."""
    module = _kernel_module()
    if module is None:
        raise RuntimeError("gradguard's compiled sparse kernels need numba: "
                           "pip install gradguard[fast]")
    return module


def scalar(dtype: torch.dtype, value: float) -> Any:
    """``value`` as a numpy scalar of ``dtype``, so a kernel computes in the tensors' precision."""
    import numpy as np

    return np.float32(value) if dtype == torch.float32 else np.float64(value)


def use_kernel(group: dict[str, Any], *tables: Tensor) -> bool:
    """Whether a group's sparse update runs the compiled kernel on ``tables``.

    ``impl="reference"`` keeps the torch ops; any other choice takes the kernel
    where it applies.
    """
    return group["impl"] != "reference" and kernel_applies(*tables)


class _Workspace:
    """Scratch for :func:`~gradguard.optim._sparse_kernels.group_lookups`, kept between
    steps (allocating and faulting in megabytes per step costs more than the step)."""

    def __init__(self) -> None:
        import numpy as np

        self.keys = np.empty(0, np.int64)
        self.slots = np.empty(0, np.int64)
        self.lookups = np.empty((5, 0), np.int64)

    def arrays(self, lookups: int) -> tuple[Any, ...]:
        """(keys, slots, unique, starts, order, inverse, cursor) for ``lookups`` lookups."""
        import numpy as np

        capacity = 1 << max(4, (2 * lookups - 1).bit_length())
        if self.keys.size < capacity:
            self.keys = np.full(capacity, -1, np.int64)
            self.slots = np.empty(capacity, np.int64)
        if self.lookups.shape[1] < lookups + 1:
            self.lookups = np.empty((5, lookups + 1), np.int64)
        unique, starts, order, inverse, cursor = self.lookups
        return self.keys[:capacity], self.slots[:capacity], unique, starts, order, inverse, cursor


ROWS_PER_THREAD = 2048
"""Distinct rows per thread below which a sparse step uses fewer threads."""

ROW_COST = 2
"""A row's update costs about as much as summing this many lookups' values (random
rows of the table and state, read and written, against rows of the values read):
chunks are cut to equal ``lookups + ROW_COST * rows``, so that the chunk holding a
hot row (thousands of lookups with Zipf-distributed ids) is not the one the step
waits for."""

CHUNKS_PER_THREAD = 8
"""The distinct rows are cut into this many chunks per thread, claimed as threads
come free, so that a thread the OS preempts (for instance for torch's OpenMP
workers, which spin for a while after each parallel op) delays the step by a
small chunk only."""

_WORKSPACE = _Workspace()
_STEP_LOCK = threading.Lock()  # the workspace serves one step at a time


def kernel_update(name: str, grad: RowGrad, tables: Sequence[Tensor],
                  scalars: Sequence[float | int], counts: Tensor | None) -> None:
    """Group ``grad``'s lookups by row and run kernel ``name`` on ``tables`` (the
    parameter and its state).

    Float ``scalars`` are passed in the tables' dtype, ints as they are. The
    distinct rows are updated on up to ``torch.get_num_threads()`` threads, the
    calling one included (one thread for small gradients).
    """
    import numpy as np

    lookups = grad.rows.numel()
    if lookups == 0:
        return
    dtype = tables[0].dtype
    module = kernels()
    update = getattr(module, name)
    rows = grad.rows.detach().contiguous().numpy()
    values = grad.values.detach().to(dtype).contiguous().numpy()
    for table in tables:
        hugepages.advise(table)
    arrays = [t.detach().numpy() for t in tables]
    per_row = counts is not None and counts.numel() == grad.num_rows
    counts_array = counts.numpy() if per_row and counts is not None else np.empty(0, np.int64)
    arguments = [scalar(dtype, x) if isinstance(x, float) else x for x in scalars]
    with _STEP_LOCK:
        keys, slots, unique, starts, order, inverse, cursor = _WORKSPACE.arrays(lookups)
        count = module.group_lookups(rows, grad.num_rows, keys, slots, unique, starts, order,
                                     inverse, cursor)
        if count < 0:
            raise IndexError(f"sparse gradient row {int(rows[-1 - count])} is out of range "
                             f"for {grad.num_rows} rows")
        threads = max(1, min(torch.get_num_threads(), count // ROWS_PER_THREAD))
        chunks = threads * CHUNKS_PER_THREAD if threads > 1 else 1
        bounds = np.array([0, count], np.int64)
        if chunks > 1:  # chunks of equal work: a hot row's lookups count, not only its update
            cost = starts[:count + 1] + ROW_COST * np.arange(count + 1)
            bounds = np.searchsorted(cost, np.linspace(0, cost[-1], chunks + 1)).astype(np.int64)
            bounds[-1] = count
        claim = np.zeros(1, np.int64)

        def work() -> int:  # one compiled call: it claims chunks until none is left
            return int(update(*arrays, values, unique, starts, order, bounds, claim,
                              *arguments, counts_array))

        futures = [_pool(threads - 1).submit(work) for _ in range(threads - 1)]
        if work() < chunks:  # another thread updated rows: wait until it is done
            for future in futures:
                future.result()
        # else the other threads had not started: they will find no chunk left and return
        # at once, touching nothing (``claim`` is this step's own counter)
        if counts is not None and not per_row:  # several sparse dims: count dim-0 rows
            count_touched(counts, torch.from_numpy(unique[:count].copy()), grad.num_rows)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _LOCK:
        if not _POOL or _POOL[0]._max_workers < workers:
            if _POOL:
                _POOL.pop().shutdown(wait=False)
            _POOL.append(ThreadPoolExecutor(workers, thread_name_prefix="gradguard-sparse"))
        return _POOL[0]
