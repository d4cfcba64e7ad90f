"""The random-row floor of a sparse embedding step: what touching its bytes costs at least.

A sparse step must read and write each distinct touched row of the table and of
its state, and read each lookup's row of gradient values. Those rows lie at
random in tables far larger than the caches, so the step is bound by memory
latency and by how many misses the cores keep in flight, not by the streaming
bandwidth that :func:`embedding_step.bandwidth_ceiling` measures. The floor
measures that bound on the machine in hand: a compiled loop, on all of torch's
threads (its OpenMP team where there is one), that does only the memory work:

* each distinct row of the table and of a state array is read and written
  (``state += 1``, ``table -= 1e-6 * state``), rows in ascending order,
  prefetched :data:`PREFETCH_ROWS` rows ahead, chunks of :data:`CHUNK_ROWS` rows
  claimed by whichever thread is free;
* the values are read once, in order (a sequential stream: the cheapest way to
  read them), and summed, and each thread writes its sum out, so that no compiler
  drops the reads.

The state array has the table's shape (Adagrad's sum, one value per element) or,
with ``row_wise=True``, one column (RowWiseAdagrad's one value per row). No
sorting, no coalescing, no optimizer arithmetic: the distinct rows are found
before the clock starts. Every implementation of the step does at least this
memory work, so ``torch's step / floor`` is the largest speed-up over torch that
the machine allows, as far as this loop gets the most out of the memory system:
it is the fastest of the prefetch settings tried (:data:`PREFETCH_ROWS`).

Needs numba (gradguard's ``fast`` extra); :func:`make_floor` returns None without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from gradguard.optim import _hugepages, _sparse

CHUNK_ROWS = 256
"""Rows (and values rows) a thread claims at a time."""

PREFETCH_ROWS = 48
"""How many rows ahead the table and state rows are prefetched. With this and
:data:`CHUNK_ROWS` the loop ran fastest of those tried (8 to 48 rows ahead, chunks of 64
to 256 rows) on the development VM, on one 2,000,000 x 64 table after a 256 MB write:
0.93 ms for 6,846 rows (Zipf ids) against 1.08 ms with 16 and 64 (the sparse kernels'
prefetch distance), 1.55 against 1.62 ms for 19,900 rows (uniform ids). Without
prefetching the uniform rows took 1.94 ms (against 1.53 ms with 16 and 64, another run)."""

# The plan (int64): the claim counters, the table count, the address of the threads'
# sums of the values (float64, one per thread), the chunks of rows and of values of all
# tables, then one record per table.
NEXT_ROW_CHUNK, NEXT_VALUE_CHUNK, NEXT_SLOT, NUM_TABLES, SINK, ROW_CHUNKS, VALUE_CHUNKS = (
    range(7))
HEADER = 7
(TABLE, STATE, VALUES, ROWS, DISTINCT, LOOKUPS, NUM_ROWS, WIDTH, STATE_WIDTH, FIRST_ROW_CHUNK,
 FIRST_VALUE_CHUNK) = range(11)
RECORD = 11
"""A table's record: addresses of table, state, values and distinct rows (int64); the
distinct rows, lookups, table rows, width and state width (the width or 1); the number
of its first chunk of rows and of values (chunks are numbered across the tables)."""


_COMPILED: list[tuple[Callable[[Any], None], Any]] = []


class Plan(NamedTuple):
    """One pass: the int64 plan the threads read, and the tensors its addresses point to."""

    fields: Any
    keep: list[torch.Tensor]


def _compile() -> tuple[Callable[[Any], None], Any]:
    """(the per-thread function, the numba cfunc ``void entry(int64 *plan)`` that calls it,
    for ``GOMP_parallel``)."""
    import numba
    import numpy as np
    from numba import carray, types

    kernels = _sparse.kernels()
    claim, pointer, prefetch_row = kernels._claim, kernels._pointer, kernels._prefetch_row

    @numba.njit(nogil=True, error_model="numpy", inline="always")
    def claim_chunk(plan: Any, counter: int, total: int, first: int, t: int) -> Any:
        """Claim the next of the ``plan[total]`` chunks on ``plan[counter]``: (its table's
        record, its first row there, the table's number ``t``, searched from the last one
        on; ``first`` is the record field of a table's first chunk), or a record of -1 when
        none is left."""
        chunk = claim(plan, counter)
        if chunk >= plan[total]:
            return -1, 0, t
        while t + 1 < plan[NUM_TABLES] and plan[HEADER + (t + 1) * RECORD + first] <= chunk:
            t += 1  # (past the tables without chunks too)
        record = HEADER + t * RECORD
        return record, (chunk - plan[record + first]) * CHUNK_ROWS, t

    @numba.njit(nogil=True, error_model="numpy")
    def share(plan: Any) -> None:
        slot = claim(plan, NEXT_SLOT)
        t = 0
        while True:  # the rows of table and state
            record, lo, t = claim_chunk(plan, NEXT_ROW_CHUNK, ROW_CHUNKS, FIRST_ROW_CHUNK, t)
            if record < 0:
                break
            num_rows, width = plan[record + NUM_ROWS], plan[record + WIDTH]
            distinct, state_width = plan[record + DISTINCT], plan[record + STATE_WIDTH]
            table = carray(pointer(plan[record + TABLE], np.float32(0)), (num_rows, width))
            state = carray(pointer(plan[record + STATE], np.float32(0)),
                           (num_rows, state_width))
            rows = carray(pointer(plan[record + ROWS], np.int64(0)), (distinct,))
            hi = min(distinct, lo + CHUNK_ROWS)
            for j in range(lo, min(hi, lo + PREFETCH_ROWS)):
                prefetch_row(table, rows[j], width, 16)  # 16 floats: a 64-byte line
                prefetch_row(state, rows[j], state_width, 16)
            for j in range(lo, hi):
                if j + PREFETCH_ROWS < hi:
                    prefetch_row(table, rows[j + PREFETCH_ROWS], width, 16)
                    prefetch_row(state, rows[j + PREFETCH_ROWS], state_width, 16)
                row = rows[j]
                if state_width == width:
                    for c in range(width):
                        s = state[row, c] + np.float32(1)
                        state[row, c] = s
                        table[row, c] -= np.float32(1e-6) * s
                else:
                    s = state[row, 0] + np.float32(1)
                    state[row, 0] = s
                    for c in range(width):
                        table[row, c] -= np.float32(1e-6) * s
        total = 0.0
        t = 0
        while True:  # the values, in order
            record, lo, t = claim_chunk(plan, NEXT_VALUE_CHUNK, VALUE_CHUNKS, FIRST_VALUE_CHUNK,
                                        t)
            if record < 0:
                break
            lookups, width = plan[record + LOOKUPS], plan[record + WIDTH]
            values = carray(pointer(plan[record + VALUES], np.float32(0)), (lookups, width))
            for i in range(lo, min(lookups, lo + CHUNK_ROWS)):
                for c in range(width):
                    total += values[i, c]
        sink = carray(pointer(plan[SINK], np.float64(0)), (slot + 1,))
        sink[slot] = total

    def entry(address: Any) -> None:
        header = carray(address, (HEADER,), np.int64)
        share(carray(address, (HEADER + header[NUM_TABLES] * RECORD,), np.int64))

    return share, numba.cfunc(types.void(types.voidptr))(entry)


class Floor:
    """Runs the floor's pass over tables and their own state arrays (the tables' shape, or
    one column with ``row_wise``), on ``threads`` threads (torch's thread count unless
    given): on torch's OpenMP team where there is one (as gradguard's steps run) unless
    ``use_team`` is False, else on a thread pool. A pass writes to the tables themselves
    (``-1e-6 * state`` on each touched element), as a step would."""

    def __init__(self, tables: Sequence[torch.Tensor], threads: int = 0, row_wise: bool = False,
                 use_team: bool = True) -> None:
        import numpy as np

        if not tables:
            raise ValueError("the floor needs at least one table")
        for table in tables:
            if table.dtype != torch.float32 or table.dim() != 2 or not table.is_contiguous():
                raise ValueError("the floor takes contiguous 2-D float32 tables, got "
                                 f"{table.dtype} of shape {tuple(table.shape)}")
        if not _COMPILED:
            _COMPILED.append(_compile())
        self._share, self._entry = _COMPILED[0]
        self._np = np
        self.tables = [t.detach() for t in tables]
        self.states = [torch.zeros(t.shape[0], 1 if row_wise else t.shape[1],
                                   dtype=torch.float32) for t in self.tables]
        for tensor in [*self.tables, *self.states]:
            _hugepages.advise(tensor)
        self.threads = threads or torch.get_num_threads()
        self.sink = np.zeros(self.threads, np.float64)
        self._team = _sparse.omp_parallel() if use_team else None
        self._pool = (ThreadPoolExecutor(self.threads - 1)
                      if self._team is None and self.threads > 1 else None)

    def plan(self, ids: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Plan:
        """The plan of one pass: each table's distinct rows of ``ids`` and its ``values``."""
        np = self._np
        if not len(ids) == len(values) == len(self.tables):
            raise ValueError(f"one ids and one values tensor per table ({len(self.tables)}), "
                             f"got {len(ids)} and {len(values)}")
        plan = np.zeros(HEADER + RECORD * len(self.tables), np.int64)
        plan[NUM_TABLES], plan[SINK] = len(self.tables), self.sink.ctypes.data
        keep: list[torch.Tensor] = []
        row_chunks = value_chunks = 0
        for k, (table, state, table_ids, table_values) in enumerate(
                zip(self.tables, self.states, ids, values, strict=True)):
            rows = torch.unique(table_ids.reshape(-1))  # ascending
            if rows.numel() and not 0 <= int(rows[0]) <= int(rows[-1]) < table.shape[0]:
                raise IndexError(f"ids of table {k} out of range for {table.shape[0]} rows")
            table_values = table_values.detach().to(torch.float32).contiguous()
            if table_values.shape != (table_ids.numel(), table.shape[1]):
                raise ValueError(f"values of table {k}: shape {tuple(table_values.shape)}, "
                                 f"expected ({table_ids.numel()}, {table.shape[1]})")
            keep += [rows, table_values]
            at = HEADER + k * RECORD
            plan[at:at + RECORD] = [
                table.data_ptr(), state.data_ptr(), table_values.data_ptr(), rows.data_ptr(),
                rows.numel(), table_values.shape[0], table.shape[0], table.shape[1],
                state.shape[1], row_chunks, value_chunks]
            row_chunks += -(-rows.numel() // CHUNK_ROWS)
            value_chunks += -(-table_values.shape[0] // CHUNK_ROWS)
        plan[ROW_CHUNKS], plan[VALUE_CHUNKS] = row_chunks, value_chunks
        return Plan(plan, keep)

    def run(self, plan: Plan) -> float:
        """Run a plan (once); return its seconds."""
        fields = plan.fields
        fields[:NUM_TABLES] = 0  # the claim counters
        self.sink[:] = 0
        if self._team is not None and self.threads > 1:
            t0 = time.perf_counter()
            self._team(self._entry.address, fields.ctypes.data, self.threads, 0)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        futures = [self._pool.submit(self._share, fields) for _ in range(self.threads - 1)
                   ] if self._pool is not None else []
        self._share(fields)
        for future in futures:
            future.result()
        return time.perf_counter() - t0

    def __call__(self, ids: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> float:
        return self.run(self.plan(ids, values))


def make_floor(tables: Sequence[torch.Tensor], threads: int = 0,
               row_wise: bool = False) -> Floor | None:
    """A :class:`Floor` over ``tables``, or None where numba is not installed."""
    return Floor(tables, threads, row_wise) if _sparse.kernels_installed() else None
