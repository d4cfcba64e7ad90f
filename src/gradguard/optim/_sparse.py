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
  ``pip install gradguard[fast]``): the lookups are split into row ranges
  (tasks), which up to ``torch.get_num_threads()`` threads take, largest first,
  on torch's own OpenMP team when torch has one; each task is sorted by row
  (radix sort), then each distinct row's lookups are summed and the row updated
  in place, in ascending row order, prefetching ahead. float32/float64 CPU
  tensors whose state has the parameter's dtype; anything else takes the torch
  ops.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _hugepages as hugepages

KERNEL_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float64})
"""Parameter dtypes the compiled kernels take."""

ROW_COUNT_KEY = "row_update_count"
"""State key of the per-row update counts (int64, one per row along dim 0), kept when a
group has ``count_row_updates=True``; ``gradguard.watch`` reads it under this name."""


class RowGrad(NamedTuple):
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
    if sparse_dims == 1 and values.dim() == 2:  # an embedding table's gradient
        return RowGrad(indices[0], values, param.shape[0])
    shape = tuple(param.shape)
    rows = indices[0]
    for axis in range(1, sparse_dims):
        rows = rows * shape[axis] + indices[axis]
    return RowGrad(rows, values.reshape(values.shape[0], math.prod(shape[sparse_dims:])),
                   math.prod(shape[:sparse_dims]))


def rows_of(tensor: Tensor, num_rows: int) -> Tensor:
    """``tensor`` viewed as ``(num_rows, row_size)``; in-place updates reach ``tensor``."""
    if tensor.dim() == 2 and tensor.shape[0] == num_rows:  # an embedding table already is
        return tensor
    try:
        return tensor.view(num_rows, -1)
    except RuntimeError:
        raise ValueError(
            f"a tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} cannot be "
            f"viewed as {num_rows} rows for a sparse update; make the parameter contiguous"
        ) from None


def coalesce(grad: RowGrad) -> tuple[Tensor, Tensor]:
    """The distinct rows of ``grad`` (ascending) and the sum of each one's values.

    ``torch.unique`` + ``index_add_``: duplicates are summed in lookup order. The rows
    are in range: the optimizers refuse a step with an id outside its table before it
    starts (``Optimizer.check_sparse_indices``).
    """
    rows, inverse = torch.unique(grad.rows, sorted=True, return_inverse=True)
    summed = grad.values.new_zeros((rows.numel(), grad.values.shape[1]))
    summed.index_add_(0, inverse, grad.values)
    return rows, summed


class OutOfRange(NamedTuple):
    """An index of a sparse gradient outside its shape: which gradient (position in the
    list checked), which lookup, which sparse dimension, the index's value and the size
    there."""

    position: int
    lookup: int
    dim: int
    value: int
    size: int

    def message(self, what: str) -> str:
        where = (f"row {self.value} is out of range for {self.size} rows" if self.dim == 0 else
                 f"index {self.value} of sparse dimension {self.dim} is out of range for size "
                 f"{self.size}")
        return (f"sparse gradient {where} (lookup {self.lookup} of the gradient of {what}); "
                "ids must be in [0, size)")


def first_out_of_range(grads: Sequence[Tensor]) -> OutOfRange | None:
    """The first index of the sparse gradients ``grads`` outside their shape (first gradient,
    then first lookup), or None when all are in range.

    One compiled pass over all embedding gradients (one sparse dimension, int64 ids on
    the CPU) where the kernels are installed; torch ops for the others.
    """
    spec: list[tuple[int, int, int]] = []
    compiled: list[int] = []
    others: list[int] = []
    use_kernels = kernels_installed()
    for position, grad in enumerate(grads):
        indices = grad._indices()
        if (use_kernels and grad.sparse_dim() == 1 and indices.is_cpu
                and indices.dtype == torch.int64 and indices.is_contiguous()):
            spec.append((indices.data_ptr(), indices.shape[1], grad.shape[0]))
            compiled.append(position)
        else:
            others.append(position)
    first: OutOfRange | None = None
    if spec:
        import numpy as np

        row, lookup = kernels().first_out_of_range(np.array(spec, np.int64))
        if row >= 0:
            grad = grads[compiled[row]]
            first = OutOfRange(compiled[row], int(lookup), 0,
                               int(grad._indices()[0, lookup]), grad.shape[0])
    for position in others:
        if first is not None and position > first.position:
            break
        found = _first_out_of_range_torch(grads[position], position)
        if found is not None:
            return found
    return first


def _first_out_of_range_torch(grad: Tensor, position: int) -> OutOfRange | None:
    indices = grad._indices()
    if indices.numel() == 0:
        return None
    sizes = torch.tensor(grad.shape[:grad.sparse_dim()], device=indices.device).unsqueeze(1)
    bad = (indices < 0) | (indices >= sizes)
    if not bool(bad.any()):
        return None
    lookup = int(bad.any(0).nonzero()[0, 0])
    dim = int(bad[:, lookup].nonzero()[0, 0])
    return OutOfRange(position, lookup, dim, int(indices[dim, lookup]), grad.shape[dim])


def advance(step: Tensor) -> None:
    """``step += 1`` for a 0-dim step counter. On the CPU it is written as
    ``fill_(step.item() + 1)``: the same number (the sum is exact before it is rounded
    to the counter's dtype), at less than half the cost of ``+=``, which a model with
    dozens of tables pays per table and step."""
    if step.is_cpu:
        step.fill_(step.item() + 1)
    else:  # no host read on an accelerator
        step += 1


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
    dtype = param.dtype
    if not (param.is_cpu and dtype in KERNEL_DTYPES and param.is_contiguous()):
        return False
    for tensor in state:  # (a loop: a generator costs more, paid per table and step)
        if not (tensor.is_cpu and tensor.dtype == dtype and tensor.is_contiguous()):
            return False
    return kernels_installed()


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


def use_kernel(group: dict[str, Any], *tables: Tensor) -> bool:
    """Whether a group's sparse update runs the compiled kernel on ``tables``.

    ``impl="reference"`` keeps the torch ops; any other choice takes the kernel
    where it applies.
    """
    return group["impl"] != "reference" and kernel_applies(*tables)


class _Scratch:
    """The threads' scratch for compiled steps, kept between steps (allocating and
    faulting in megabytes per step costs more than the step): per thread slot, the
    sort buffers and row lists (:data:`~._sparse_kernels.SCRATCH_ARRAYS` rows of
    ``stride`` int64) and a radix histogram; and the batch list of the batches that
    torch's OpenMP team or the calling thread alone runs (all are done with it when
    the call returns; a thread pool's batch gets its own list)."""

    def __init__(self) -> None:
        import numpy as np

        self.scratch = np.empty((0, 0, 0), np.int64)
        self.hist = np.empty((0, 0), np.int64)
        self.fields: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.batch = np.empty(0, np.int64)
        self.batch_address = 0

    def prepare(self, slots: int, lookups: int) -> tuple[int, int, int, int]:
        """Grow the scratch for ``slots`` threads and ``lookups`` lookups per table; return
        (scratch address, histograms address, slots, stride) for the frames."""
        import numpy as np

        scratch = self.scratch
        grow_scratch = scratch.shape[0] < slots or scratch.shape[2] < lookups + 1
        grow_hist = self.hist.shape[0] < slots
        if grow_scratch or grow_hist:
            module = kernels()
            if grow_scratch:
                self.scratch = np.empty((max(slots, scratch.shape[0]), module.SCRATCH_ARRAYS,
                                         max(lookups + 1, scratch.shape[2])), np.int64)
            if grow_hist:
                self.hist = np.empty((slots, 1 << module.DIGIT_BITS), np.int64)
            self.fields = (self.scratch.ctypes.data, self.hist.ctypes.data,
                           self.scratch.shape[0], self.scratch.shape[2])
        return self.fields

    def team_batch(self, size: int) -> tuple[Any, int]:
        """The batch list of ``size`` int64 (grown as needed, contents left as they are)
        and its address."""
        import numpy as np

        if self.batch.size < size:
            self.batch = np.empty(max(size, 2 * self.batch.size), np.int64)
            self.batch_address = self.batch.ctypes.data
        return self.batch, self.batch_address


ROWS_PER_THREAD = 2048
"""Lookups per thread below which a sparse step uses fewer threads (a table with fewer
lookups runs on one thread, side by side with the step's other tables)."""

TASKS_PER_THREAD = 8
"""The lookups are split into at least this many tasks (row ranges) per thread,
claimed as threads come free, so that a thread the OS preempts delays the step by
a small task only, and a task's sort scratch stays in L1/L2."""

SLICES_PER_THREAD = 4
LOOKUPS_PER_SLICE = 1024
"""The ids are checked and grouped by task in slices of at least this many lookups,
up to :data:`SLICES_PER_THREAD` per thread."""

_SCRATCH: list[_Scratch] = []
_STEP_LOCK = threading.Lock()  # the scratch serves one batch at a time


def _task_bits(num_rows: int, threads: int) -> tuple[int, int]:
    """(task bits, shift): ``2**bits`` tasks, task of row ``r`` = ``r >> shift``.

    At least :data:`TASKS_PER_THREAD` tasks per thread; the rows below each task's
    range fit a sort key's 31 free bits.
    """
    row_bits = max(0, (num_rows - 1).bit_length())
    bits = min(row_bits, max(1, (TASKS_PER_THREAD * threads - 1).bit_length()))
    bits = max(bits, row_bits - 31)
    return bits, row_bits - bits


class _Frame:
    """The frame of compiled steps on one set of tables (:mod:`._sparse_kernels`' field
    order), kept between steps with its scalars, counters and the buffers its threads
    share: a step writes only the fields that change (the gradient, the task split)."""

    def __init__(self, module: ModuleType, name: str, num_rows: int, tables: Sequence[Tensor],
                 counts: Tensor | None) -> None:
        import numpy as np

        dtype = np.float32 if tables[0].dtype == torch.float32 else np.float64
        self.floats = np.zeros(8, dtype)
        self.claims = np.zeros(module.NUM_CLAIMS, np.int64)
        pointers = [t.data_ptr() for t in tables]
        pointers += pointers[-1:] * (3 - len(pointers))  # unused table slots: any valid one
        # KERNEL, NUM_ROWS, WIDTH, STATE_WIDTH, TABLE0..2, FLOATS, CLAIMS, COUNTS, NUM_COUNTS
        self.num_rows = num_rows
        self.fields = np.zeros(module.FRAME_SIZE, np.int64)
        self.fields[:module.VALUES] = [
            module.KERNELS[name], num_rows, tables[0].shape[1], tables[1].shape[1], *pointers,
            self.floats.ctypes.data, self.claims.ctypes.data,
            0 if counts is None else counts.data_ptr(), 0 if counts is None else num_rows]
        self.address = self.fields.ctypes.data
        self.field_bytes = self.fields.data.cast("B")  # for struct.pack_into
        self.buffers = [np.empty(0, np.int64) for _ in range(4)]
        self.module = module
        self.layout_key: tuple[int, ...] = ()
        self.layout_threads = 0
        for table in tables:
            hugepages.advise(table)

    def layout(self, lookups: int, mode: int) -> int:
        """Write the fields from ``NUM_PARTS`` to ``SLICE_HIST`` for a step of ``lookups``
        lookups: the task split, ``mode`` and the shared buffers (grown as needed); return
        the threads the step is given. Kept from the last step when its lookups, threads
        and tuning were the same: a table's steps mostly repeat them."""
        key = (lookups, mode, torch.get_num_threads(), ROWS_PER_THREAD, TASKS_PER_THREAD,
               SLICES_PER_THREAD, LOOKUPS_PER_SLICE)
        if key != self.layout_key:
            threads = max(1, min(key[2], lookups // ROWS_PER_THREAD))
            bits, shift = _task_bits(self.num_rows, threads)
            slices = max(1, min(SLICES_PER_THREAD * threads, lookups // LOOKUPS_PER_SLICE))
            module = self.module
            self.fields[module.NUM_PARTS:module.SCRATCH] = (
                1 << bits, shift, slices, mode, *self.prepare(lookups, 1 << bits, slices))
            self.layout_key, self.layout_threads = key, threads
        return self.layout_threads

    def prepare(self, lookups: int, parts: int, slices: int) -> tuple[int, ...]:
        """Grow the shared buffers for ``lookups`` lookups in ``parts`` tasks and ``slices``
        slices; return their addresses (part starts, part order, task order, slice
        histograms). Called when a step's layout changes only."""
        import numpy as np

        sizes = (parts + 1, lookups, parts, slices * parts)
        self.buffers = [b if b.size >= n else np.empty(n, np.int64)
                        for b, n in zip(self.buffers, sizes, strict=True)]
        return tuple(b.ctypes.data for b in self.buffers)


class _Step(NamedTuple):
    """A table's compiled step, queued in a batch: its frame, how many threads it is
    given, and what must outlive it (the ids and values the frame points to, the dim-0
    update counts of a gradient with several sparse dims, counted after the step).
    ``ids`` is 1-D, or the one row of an embedding gradient's indices."""

    frame: _Frame
    threads: int
    lookups: int
    ids: Tensor
    values: Tensor
    dim0_counts: Tensor | None
    num_rows: int


_FRAMES: OrderedDict[tuple[Any, ...], _Frame] = OrderedDict()
MAX_FRAMES = 1024
"""Frames kept, one per table set a process updates (the least recently used goes when
full): a model with hundreds of tables keeps all of its frames."""

_QUEUE = threading.local()  # .steps: this thread's open batch, by parameter address; or None


@contextmanager
def batch() -> Iterator[None]:
    """Run the compiled sparse steps started inside together, when the block ends.

    Each table's step is queued by :func:`kernel_update`; at the end all of them
    run in one parallel region (:func:`~._sparse_kernels.run_batch`): tables too
    small for a thread each run side by side instead of one after another, and the
    threads are woken once per step instead of once per table. Optimizers open one
    around their whole step. Nested blocks join the outermost one. The steps run
    also when the block raises (as they would have run one by one before the
    error); an out-of-range row raises IndexError then (see :func:`kernel_update`).
    """
    if getattr(_QUEUE, "steps", None) is not None:
        yield
        return
    steps: dict[int, _Step] = {}
    _QUEUE.steps = steps
    try:
        yield
    finally:
        _QUEUE.steps = None
        if steps:
            _run_steps(list(steps.values()))


def kernel_update(name: str, grad: RowGrad, tables: Sequence[Tensor], scalars: Sequence[float],
                  counts: Tensor | None, mode: int = 0) -> None:
    """Run kernel ``name`` on ``tables`` (the parameter and its state) for ``grad``.

    ``scalars`` are passed in the tables' dtype, ``mode`` (the row-wise weight decay
    mode) as it is. The step runs on up to ``torch.get_num_threads()``
    threads (one per :data:`ROWS_PER_THREAD` lookups): torch's OpenMP team where
    torch has one, else a thread pool with the calling thread. Inside
    :func:`batch` it is queued and runs when the batch ends. A row out of range
    raises IndexError, with no row of these tables modified.
    """
    if counts is not None and counts.numel() != grad.num_rows:
        dim0_counts, counts = counts, None  # several sparse dims: counted below, by dim-0 row
    else:
        dim0_counts = None
    _queue_step(kernels(), name, grad.num_rows, grad.rows, grad.values, tables, scalars, counts,
                mode, dim0_counts)


def kernel_or_rows(name: str, group: dict[str, Any], param: Tensor, grad: Tensor,
                   state: Sequence[Tensor], scalars: Sequence[float], counts: Tensor | None,
                   mode: int = 0) -> tuple[RowGrad, Tensor, list[Tensor]] | None:
    """Kernel ``name``'s step of ``param`` and its ``state`` tensors for the sparse
    ``grad`` where the compiled kernels apply (:func:`kernel_update`: queued in the open
    batch, or run), returning None; elsewhere what the torch ops take instead: the
    gradient as rows, and the parameter and the state viewed as rows.

    An embedding table's gradient (:func:`table_step`) goes to the kernel with a fraction
    of the Python of the general path (:func:`row_grad`, :func:`rows_of`,
    :func:`use_kernel`): a model has dozens of tables, each stepped every step.
    """
    if table_step(name, group, param, grad, state, scalars, counts, mode):
        return None
    rows = row_grad(param, grad)
    tables = [rows_of(tensor, rows.num_rows) for tensor in (param, *state)]
    if use_kernel(group, *tables):
        kernel_update(name, rows, tables, scalars, counts, mode)
        return None
    return rows, tables[0], tables[1:]


def table_step(name: str, group: dict[str, Any], param: Tensor, grad: Tensor,
               state: Sequence[Tensor], scalars: Sequence[float], counts: Tensor | None,
               mode: int = 0) -> bool:
    """:func:`kernel_update` for the gradient of an embedding table, with little Python.

    Applies where the general path would run the kernel on ``[param, *state]`` as they
    are: a 2-D parameter and a gradient with one sparse dimension. Returns False
    elsewhere, doing nothing.
    """
    if param.dim() != 2 or grad.sparse_dim() != 1 or not use_kernel(group, param, *state):
        return False
    _queue_step(kernels(), name, param.shape[0], grad._indices(), grad._values(),
                [param, *state], scalars, counts, mode, None)
    return True


_DATA_PTR = Tensor.data_ptr
_GRADIENT_FIELDS = struct.Struct("=3q")  # a frame's VALUES, LOOKUPS, IDS: one call to write


def _queue_step(module: ModuleType, name: str, num_rows: int, ids: Tensor, values: Tensor,
                tables: Sequence[Tensor], scalars: Sequence[float], counts: Tensor | None,
                mode: int, dim0_counts: Tensor | None) -> None:
    """Queue kernel ``name``'s step on ``tables`` (rows ``ids``, 1-D or one row of
    int64, with their ``values``) in the open batch, or run it now."""
    lookups = ids.numel()
    if lookups == 0:
        return
    if lookups >= 1 << 32:
        raise ValueError(f"a sparse gradient of {lookups:,} lookups is too large for the "
                         "compiled kernels (at most 2**32 - 1); use impl='reference'")
    if not ids.is_contiguous():  # (asking is cheaper than .contiguous() returning itself)
        ids = ids.contiguous()
    table = tables[0]
    if values.dtype != table.dtype:
        values = values.to(table.dtype)
    if not values.is_contiguous():
        values = values.contiguous()
    key = (name, num_rows, table.dtype, None if counts is None else counts.data_ptr(),
           *map(_DATA_PTR, tables), *[t.shape[1] for t in tables])
    queue: dict[int, _Step] | None = getattr(_QUEUE, "steps", None)
    with _STEP_LOCK:
        frame = _FRAMES.get(key)
        if frame is None:
            while len(_FRAMES) >= MAX_FRAMES:
                _FRAMES.popitem(last=False)
            frame = _FRAMES[key] = _Frame(module, name, num_rows, tables, counts)
        else:
            _FRAMES.move_to_end(key)
    address = table.data_ptr()
    if queue is not None and address in queue:
        # the same parameter twice in a batch: the steps so far go first
        steps = list(queue.values())
        queue.clear()
        _run_steps(steps)
    frame.floats[:len(scalars)] = scalars
    threads = frame.layout(lookups, mode)
    _GRADIENT_FIELDS.pack_into(frame.field_bytes, module.VALUES * 8, values.data_ptr(), lookups,
                               ids.data_ptr())
    step = _Step(frame, threads, lookups, ids, values, dim0_counts, num_rows)
    if queue is None:
        _run_steps([step])
    else:
        queue[address] = step


def _run_steps(steps: list[_Step]) -> None:
    """Run queued steps as batches (one per table dtype) and count the dim-0 rows of
    those with several sparse dims; then raise IndexError for the first step, in
    queue order, that met a row out of range (the others are done)."""
    module = kernels()
    claims: dict[int, Any] = {}
    for itemsize in sorted({step.frame.floats.itemsize for step in steps}):
        same = [step for step in steps if step.frame.floats.itemsize == itemsize]
        with _STEP_LOCK:
            claims.update(zip(map(id, same), _run_on_threads(module, same), strict=True))
    bad = None
    for step in steps:
        step_claims = claims[id(step)]
        if step_claims[module.READY] == module.OUT_OF_RANGE:
            bad = bad or (step, int(step_claims[module.BAD]))
        elif step.dim0_counts is not None:
            count_touched(step.dim0_counts, torch.unique(step.ids), step.num_rows)
    if bad is not None:
        step, lookup = bad
        raise IndexError(f"sparse gradient row {int(step.ids.view(-1)[lookup])} is out of "
                         f"range for {step.num_rows} rows")


def _run_on_threads(module: ModuleType, steps: list[_Step]) -> list[Any]:
    """Run ``steps`` (tables of one dtype) as one batch: each of the step's threads runs
    ``module.run_batch`` once. Return each step's counters once all are done."""
    import numpy as np

    order = sorted(steps, key=lambda step: -step.lookups)
    entries = [step.frame for step in order for _ in range(step.threads)]
    total = sum(step.lookups for step in steps)
    threads = max(1, min(torch.get_num_threads(), total // ROWS_PER_THREAD, len(entries)))
    if not _SCRATCH:
        _SCRATCH.append(_Scratch())
    scratch = _SCRATCH[0].prepare(threads, order[0].lookups)
    size = module.BATCH_HEADER + len(entries)
    witness = steps[0].frame.floats[0]
    team = omp_parallel() if threads > 1 else None
    if team is not None or threads == 1:
        batch, address = _SCRATCH[0].team_batch(size)
        header = [0] * module.BATCH_HEADER  # the claim counters start at 0
        header[module.NUM_ENTRIES] = len(entries)
        batch[:size] = header + [frame.address for frame in entries]
        for step in steps:
            step.frame.fields[module.SCRATCH:] = scratch
            step.frame.claims[:] = 0
            step.frame.claims[module.BAD] = step.lookups
        if team is not None:  # torch's OpenMP team: GOMP_parallel returns when all are done
            team(module.team_entry(witness.itemsize), address, threads, 0)
        else:
            module.run_batch(batch, witness)
        return [step.frame.claims for step in steps]
    batch = np.zeros(size, np.int64)
    batch[module.NUM_ENTRIES] = len(entries)
    # a pool thread may start after the step is over: it gets the step's own batch,
    # frames and counters (kept alive here), finds no entry left, and returns touching
    # nothing else
    copies: dict[int, tuple[Any, Any]] = {}
    for step in steps:
        claims = np.zeros_like(step.frame.claims)
        claims[module.BAD] = step.lookups
        fields = step.frame.fields.copy()
        fields[module.CLAIMS] = claims.ctypes.data
        fields[module.SCRATCH:] = scratch
        copies[id(step.frame)] = (fields, claims)
    batch[module.BATCH_HEADER:] = [copies[id(frame)][0].ctypes.data for frame in entries]

    def share(batch: Any = batch, copies: Any = copies) -> int:  # holds them until it returns
        return int(module.run_batch(batch, witness))

    futures = [_pool(threads - 1).submit(share) for _ in range(threads - 1)]
    if module.run_batch(batch, witness) < len(entries):  # another thread took entries:
        for future in futures:  # wait until it is done
            future.result()
    return [copies[id(step.frame)][1] for step in steps]


_OMP: list[Any] = []


def omp_parallel() -> Any:
    """``GOMP_parallel(fn, data, num_threads, flags)`` of the OpenMP runtime torch runs its
    own parallel loops on (ctypes, releases the GIL), or None.

    None where torch has no OpenMP (another parallel backend) or its runtime has no GNU
    entry points (libgomp and LLVM's libomp have them); the steps then use a thread pool.
    """
    if not _OMP:
        with _LOCK:
            if not _OMP:
                _OMP.append(_find_gomp_parallel())
    return _OMP[0]


def _find_gomp_parallel() -> Any:
    import ctypes
    import os
    import re

    if not torch.backends.openmp.is_available():
        return None
    # the runtime loaded from torch's own lib folder first: another library may have
    # loaded a second OpenMP runtime, with its own threads
    libraries: list[str | None] = []
    try:
        with open("/proc/self/maps") as maps:
            torch_lib = os.path.dirname(torch.__file__)
            libraries += sorted({path for path in re.findall(r"(/\S*lib[gi]?omp[^/\s]*)",
                                                              maps.read())
                                 if path.startswith(torch_lib)})
    except OSError:
        pass
    for library in [*libraries, None]:
        try:
            function = ctypes.CDLL(library).GOMP_parallel
        except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        function.restype = None
        return function
    return None


def _pool(workers: int) -> ThreadPoolExecutor:
    with _LOCK:
        if not _POOL or _POOL[0]._max_workers < workers:
            if _POOL:
                _POOL.pop().shutdown(wait=False)
            _POOL.append(ThreadPoolExecutor(workers, thread_name_prefix="gradguard-sparse"))
        return _POOL[0]
