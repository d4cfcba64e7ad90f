"""Compiled CPU kernels for row-sparse updates (numba; ``pip install gradguard[fast]``).

Imported on first use by :mod:`gradguard.optim._sparse`, never by ``import
gradguard``. An optimizer step updates its sparse tables as one *batch*: each
thread of the step calls :func:`run_batch` once, on torch's own OpenMP team
(:func:`team_entry`, started with ``GOMP_parallel``, so the step neither waits for
new threads nor competes with torch's idle workers for the cores) or else on a
thread pool. The batch lists each table's *frame* once per thread the table is
given (one per :data:`~gradguard.optim._sparse.ROWS_PER_THREAD` lookups), largest
tables first: small tables run side by side, one thread each, and a large one on
several. A thread claims entries in turn and does its share of each one's frame
(:func:`run`). Every phase of a frame hands out its work with atomic counters, so
that any number of threads, one included, finishes it, and a late or preempted
thread delays the step by one piece of work only:

1. the lookups are cut into *slices*; for each slice a thread checks that every
   row is in range and counts its lookups per *task* (a range of ``2**shift``
   rows). The thread that counts the last slice turns the counts into offsets and
   orders the tasks largest first (:func:`_count_slice`, :func:`_offsets`);
2. each slice's lookups are written out grouped by task (:func:`_scatter_slice`):
   a stable counting sort, in parallel;
3. threads claim tasks, largest first. For a task a thread sorts the task's
   lookups by row (:func:`_group_task`, a stable LSD radix sort, in scratch that
   stays in L1/L2), so that the distinct rows come out ascending, each with its
   lookups in lookup order; then, for each distinct row, it sums the values of the
   row's lookups (duplicates are coalesced here) and updates the row of the
   parameter and its state in place (:func:`_adagrad_rows`,
   :func:`_sparse_adam_rows`, :func:`_ftrl_rows`, :func:`_rowwise_adagrad_rows`),
   prefetching rows and values ahead.

Between the phases the threads of a frame wait for each other by spinning on a
flag (a few microseconds); they wait only for threads already working on the same
frame. An out-of-range row stops that table's step after phase 1, before anything
of it is written: its flag says so and its counters hold the first bad lookup.

Ascending rows matter on large tables: consecutive rows share pages, so a step
walks the page tables once per page rather than once per row, and the memory
controller sees nearby addresses. The result does not depend on the number of
threads or on which thread takes which task: each row is summed in lookup order
by one thread.

The arithmetic is written operation for operation like the torch-ops path of
each algorithm (``adagrad.py``, ``sparse_adam.py``, ``ftrl.py``, ``rowwise.py``),
with scalars passed in the tensors' dtype, so both paths round alike (except the
row-wise mean square, summed in another order); the tests compare them.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import carray
from numba.core import cgutils, types
from numba.extending import intrinsic

PREFETCH_ROWS = 16
"""How many distinct rows ahead the parameter and state rows are prefetched."""

PREFETCH_LOOKUPS = 16
"""How many lookups ahead (in row order) the values rows are prefetched: a hot row's
lookups are scattered over the values, so each would otherwise wait for memory."""

DIGIT_BITS = 11
"""Widest radix-sort digit: a 2,048-bucket histogram (16 KiB) stays in L1."""

MIN_DIGIT_BITS = 4
"""Narrowest radix-sort digit; between the two, a task of ``n`` lookups sorts with digits of
at most ``2 * n`` buckets."""

LOOKUP_BITS = 32
"""A sort key holds the row's low bits above the lookup number's 32 bits."""

# The frame: one int64 array describing a table's step, read by every thread's `run`.
# The fields fixed by the tables come first, then those written for each step, then
# the addresses of the frame's own buffers (shared by the threads of the frame), then
# the per-thread scratch of the batch (`SLOTS` threads, rows of `STRIDE` int64).
KERNEL, NUM_ROWS, WIDTH, STATE_WIDTH, TABLE0, TABLE1, TABLE2, FLOATS, CLAIMS = range(9)
COUNTS, NUM_COUNTS = 9, 10
VALUES, LOOKUPS, IDS, NUM_PARTS, SHIFT, SLICES, MODE = range(11, 18)
PARTS, PART_ORDER, TASK_ORDER, SLICE_HIST = range(18, 22)
SCRATCH, HIST, SLOTS, STRIDE = range(22, 26)
FRAME_SIZE = 26
KERNELS = {"adagrad": 0, "sparse_adam": 1, "ftrl": 2, "rowwise_adagrad": 3}
"""Kernel numbers (``frame[KERNEL]``) by name; ``frame[STATE_WIDTH]`` is 1 for
``rowwise_adagrad``, else ``frame[WIDTH]``."""
ADAGRAD, SPARSE_ADAM, FTRL = KERNELS["adagrad"], KERNELS["sparse_adam"], KERNELS["ftrl"]

# A frame's counters (``frame[CLAIMS]``, int64): the next task, slice to count and
# slice to scatter; how many slices are counted and scattered; the phase flag; the
# first out-of-range lookup (``lookups`` while there is none).
CLAIM_TASK, CLAIM_COUNT, CLAIM_SCATTER, COUNTED, SCATTERED, READY, BAD = range(7)
NUM_CLAIMS = 7
COUNTING, OFFSETS_READY, PARTITIONED, OUT_OF_RANGE = 0, 1, 2, -1
"""``claims[READY]``: counting; offsets ready (scatter); lookups grouped by task (update);
a row out of range (stop)."""

SCRATCH_ARRAYS = 5
"""Per-thread scratch rows: two sort buffers, then unique rows, starts, order."""

# The batch (int64): the next entry and the next thread slot (counters), the number
# of entries, then the entries: frame addresses.
NEXT_ENTRY, NEXT_SLOT, NUM_ENTRIES = range(3)
BATCH_HEADER = 3

jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@intrinsic
def _prefetch(typingctx: Any, array: Any, row: Any, column: Any) -> Any:
    """Prefetch the cache line holding ``array[row, column]`` (2-D, C order) into L2."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, value, kind, types.intp)
                 for value, kind in zip(args[1:], signature.args[1:], strict=True)]
        ptr = cgutils.get_item_pointer(context, builder, array_type, ary, index,
                                       wraparound=False)
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        # (address, read, locality 2 = prefetcht1: into L2, data). Prefetching for
        # writing, or into L1, measured 15% slower: L1 has few miss buffers
        builder.call(prefetch, [builder.bitcast(ptr, byte_ptr), ir.Constant(i32, 0),
                                ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, row, column), codegen


def _counter_pointer(context: Any, builder: Any, signature: Any, args: Any) -> Any:
    """Pointer to ``counters[index]`` (the first two arguments of an atomic intrinsic)."""
    array_type = signature.args[0]
    ary = context.make_array(array_type)(context, builder, args[0])
    at = context.cast(builder, args[1], signature.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [at], wraparound=False)


def _counter_and_value(context: Any, builder: Any, signature: Any, args: Any) -> Any:
    """(pointer to ``counters[index]``, the third argument as an int64): the operands of an
    atomic intrinsic that writes a value."""
    return (_counter_pointer(context, builder, signature, args),
            context.cast(builder, args[2], signature.args[2], types.int64))


@intrinsic
def _claim(typingctx: Any, counters: Any, index: Any) -> Any:
    """Atomically ``counters[index] += 1``, returning the old value (acquire-release: what
    the thread wrote before is visible to a thread that claims after it)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _counter_pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "acq_rel")

    return types.int64(counters, index), codegen


@intrinsic
def _lower_to(typingctx: Any, counters: Any, index: Any, value: Any) -> Any:
    """Atomically ``counters[index] = min(counters[index], value)``."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr, new = _counter_and_value(context, builder, signature, args)
        builder.atomic_rmw("min", ptr, new, "acq_rel")
        return context.get_dummy_value()

    return types.void(counters, index, value), codegen


@intrinsic
def _load_acquire(typingctx: Any, counters: Any, index: Any) -> Any:
    """``counters[index]``, read atomically (a flag another thread sets)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _counter_pointer(context, builder, signature, args)
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(counters, index), codegen


@intrinsic
def _store_release(typingctx: Any, counters: Any, index: Any, value: Any) -> Any:
    """``counters[index] = value``, written atomically after everything written before."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr, new = _counter_and_value(context, builder, signature, args)
        builder.store_atomic(new, ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(counters, index, value), codegen


@intrinsic
def _pointer(typingctx: Any, address: Any, witness: Any) -> Any:
    """The address ``address`` (an int64 from the frame) as a pointer to ``witness``'s type."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        target = context.get_data_type(signature.args[1])
        return builder.inttoptr(args[0], target.as_pointer())

    return types.CPointer(witness)(address, witness), codegen  # type: ignore[attr-defined]


@jit
def _count_slice(rows: Any, lo: int, hi: int, num_rows: int, shift: int, hist: Any) -> int:
    """Count the lookups ``lo..hi`` per task (``row >> shift``) into ``hist``; return the
    first lookup whose row is outside ``[0, num_rows)`` (counting stops there), else -1."""
    hist[:] = 0
    for i in range(lo, hi):
        row = rows[i]
        if row < 0 or row >= num_rows:
            return i
        hist[row >> shift] += 1
    return -1


@jit
def first_out_of_range(spec: Any) -> tuple[int, int]:
    """The first id outside ``[0, bound)``, over the id arrays ``spec`` describes (rows of
    ``(address, length, bound)``, int64 ids): (spec row, position), or (-1, -1)."""
    for t in range(spec.shape[0]):
        ids = carray(_pointer(spec[t, 0], np.int64(0)), (spec[t, 1],))
        bound = np.uint64(spec[t, 2])
        bad = False
        for i in range(ids.size):  # branch-free, so that it vectorizes; negative ids wrap
            bad |= np.uint64(ids[i]) >= bound
        if bad:
            for i in range(ids.size):
                if np.uint64(ids[i]) >= bound:
                    return t, i
    return -1, -1


@jit
def _offsets(slice_hist: Any, part_starts: Any, task_order: Any) -> None:
    """Turn the slices' counts per task into where each slice's lookups of each task go.

    Afterwards task ``p``'s lookups will be ``part_order[part_starts[p]:part_starts[p + 1]]``,
    those of slice ``s`` from ``slice_hist[s, p]`` on (slices in order: the lookups stay
    ascending), and ``task_order`` lists the tasks largest first: the threads take them
    in that order, so that the step does not end waiting for a large task taken last
    (with Zipf-distributed ids the task holding the hottest row has thousands of
    lookups more).
    """
    slices, parts = slice_hist.shape
    total = 0
    for p in range(parts):
        part_starts[p] = total
        for s in range(slices):
            size = slice_hist[s, p]
            slice_hist[s, p] = total
            total += size
    part_starts[parts] = total
    for p in range(parts):  # insertion sort by size, descending (a few dozen tasks)
        size = part_starts[p + 1] - part_starts[p]
        at = p
        while at > 0:
            before = task_order[at - 1]
            if part_starts[before + 1] - part_starts[before] >= size:
                break
            task_order[at] = before
            at -= 1
        task_order[at] = p


@jit
def _scatter_slice(rows: Any, lo: int, hi: int, shift: int, cursor: Any,
                   part_order: Any) -> None:
    """Write the lookups ``lo..hi`` into ``part_order`` by task, from ``cursor`` (the slice's
    offsets) on."""
    for i in range(lo, hi):
        p = rows[i] >> shift
        part_order[cursor[p]] = i
        cursor[p] += 1


@jit
def _group_task(rows: Any, part_order: Any, lo: int, hi: int, shift: int, task: int,
                scratch: Any, hist: Any) -> int:
    """Group the lookups ``part_order[lo:hi]`` (one task's) by row; return the number of
    distinct rows.

    Afterwards, for ``j < count``: ``scratch[2, j]`` is the ``j``-th distinct row, in
    ascending order, and ``scratch[4, scratch[3, j]:scratch[3, j + 1]]`` are its lookups,
    ascending. The sort keys are ``(row's low bits << 32) | lookup``, radix-sorted
    on the row bits in ``scratch[0]`` and ``scratch[1]``.
    """
    n = hi - lo
    src, dst = scratch[0], scratch[1]
    low_mask = (1 << shift) - 1
    for i in range(n):
        lookup = part_order[lo + i]
        src[i] = ((rows[lookup] & low_mask) << LOOKUP_BITS) | lookup
    # digits narrow enough that a pass's histogram is not much larger than the keys:
    # clearing and scanning 2,048 buckets for a few dozen keys (a small table's task)
    # would cost more than sorting them
    widest = DIGIT_BITS
    while widest > MIN_DIGIT_BITS and 1 << widest > 2 * n:
        widest -= 1
    passes = (shift + widest - 1) // widest
    if n > 1 and passes:
        digit = (shift + passes - 1) // passes
        buckets = 1 << digit
        for p in range(passes):
            at = LOOKUP_BITS + p * digit
            hist[:buckets] = 0
            for i in range(n):
                hist[(src[i] >> at) & (buckets - 1)] += 1
            if hist[(src[0] >> at) & (buckets - 1)] == n:
                continue  # every key has this digit: the pass would not move anything
            total = 0
            for b in range(buckets):
                size = hist[b]
                hist[b] = total
                total += size
            for i in range(n):
                key = src[i]
                b = (key >> at) & (buckets - 1)
                dst[hist[b]] = key
                hist[b] += 1
            src, dst = dst, src
    unique, starts, order = scratch[2], scratch[3], scratch[4]
    base = task << shift
    lookup_mask = (1 << LOOKUP_BITS) - 1
    count = 0
    previous = -1
    for i in range(n):
        key = src[i]
        low = key >> LOOKUP_BITS
        if low != previous:
            unique[count] = base | low
            starts[count] = i
            count += 1
            previous = low
        order[i] = key & lookup_mask
    starts[count] = n
    return count


@jit
def _prefetch_row(table: Any, row: Any, width: Any, line: Any) -> None:
    """Ask for every cache line of ``table[row]`` ahead of its use."""
    for c in range(0, width, line):
        _prefetch(table, row, c)


@jit
def _prefetch_first(table: Any, unique: Any, lo: int, hi: int) -> None:
    """Prefetch the rows of the first :data:`PREFETCH_ROWS` distinct rows of ``lo..hi``
    (the update loop prefetches the others, that many rows ahead)."""
    width = table.shape[1]
    line = max(1, 64 // table.itemsize)
    for j in range(lo, min(hi, lo + PREFETCH_ROWS)):
        _prefetch_row(table, unique[j], width, line)


@numba.njit(inline="always")
def _sum_lookups(grad: Any, values: Any, order: Any, first: int, stop: int, end: int,
                 line: int) -> None:
    """``grad`` = the sum of ``values[order[k]]`` for ``k`` in ``first..stop`` (one distinct
    row's lookups), in lookup order, prefetching values :data:`PREFETCH_LOOKUPS` lookups
    ahead (up to ``end``). Inlined into each update kernel by numba (``inline="always"``):
    as a called function it measured 1.6-2x slower per row; inlined, as fast as the loop
    written out in each kernel."""
    width = grad.size
    if first + PREFETCH_LOOKUPS < end:
        _prefetch_row(values, order[first + PREFETCH_LOOKUPS], width, line)
    lookup = order[first]
    for d in range(width):
        grad[d] = values[lookup, d]
    for k in range(first + 1, stop):
        if k + PREFETCH_LOOKUPS < end:
            _prefetch_row(values, order[k + PREFETCH_LOOKUPS], width, line)
        lookup = order[k]
        for d in range(width):
            grad[d] += values[lookup, d]


# Each update kernel prefetches the rows of its first distinct rows; then, for
# distinct row j, the parameter and state rows PREFETCH_ROWS distinct rows ahead.
# It sums the row's lookups into `grad` (_sum_lookups), a row-sized buffer that stays
# in L1, and updates the row in place.


@jit
def _adagrad_rows(param: Any, state_sum: Any, values: Any, unique: Any, starts: Any,
                  order: Any, lo: int, hi: int, minus_clr: Any, eps: Any, sign: Any,
                  counts: Any) -> None:
    """Adagrad on distinct rows ``lo..hi``:
    ``sum += g*g; param += -clr * (g / (sqrt(sum) + eps))``."""
    width = param.shape[1]
    line = max(1, 64 // param.itemsize)
    grad = np.empty(width, param.dtype)
    end = starts[hi]  # the lookups of rows lo..hi are order[starts[lo]:end]
    _prefetch_first(param, unique, lo, hi)
    _prefetch_first(state_sum, unique, lo, hi)
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch_row(state_sum, ahead, width, line)
        _sum_lookups(grad, values, order, starts[j], starts[j + 1], end, line)
        row = unique[j]
        for d in range(width):
            g = sign * grad[d]
            s = state_sum[row, d] + g * g
            state_sum[row, d] = s
            param[row, d] = param[row, d] + minus_clr * (g / (np.sqrt(s) + eps))
        if counts.size:
            counts[row] += 1


@jit
def _sparse_adam_rows(param: Any, exp_avg: Any, exp_avg_sq: Any, values: Any, unique: Any,
                      starts: Any, order: Any, lo: int, hi: int, one_minus_beta1: Any,
                      one_minus_beta2: Any, eps: Any, minus_step_size: Any, sign: Any,
                      counts: Any) -> None:
    """SparseAdam on distinct rows ``lo..hi``, torch.optim.SparseAdam's arithmetic."""
    width = param.shape[1]
    line = max(1, 64 // param.itemsize)
    grad = np.empty(width, param.dtype)
    end = starts[hi]  # the lookups of rows lo..hi are order[starts[lo]:end]
    _prefetch_first(param, unique, lo, hi)
    _prefetch_first(exp_avg, unique, lo, hi)
    _prefetch_first(exp_avg_sq, unique, lo, hi)
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch_row(exp_avg, ahead, width, line)
            _prefetch_row(exp_avg_sq, ahead, width, line)
        _sum_lookups(grad, values, order, starts[j], starts[j + 1], end, line)
        row = unique[j]
        for d in range(width):
            g = sign * grad[d]
            m = exp_avg[row, d]
            m_step = (g - m) * one_minus_beta1
            exp_avg[row, d] = m + m_step
            v = exp_avg_sq[row, d]
            v_step = (g * g - v) * one_minus_beta2
            exp_avg_sq[row, d] = v + v_step
            denom = np.sqrt(v_step + v) + eps
            param[row, d] = param[row, d] + minus_step_size * ((m_step + m) / denom)
        if counts.size:
            counts[row] += 1


@jit
def _ftrl_rows(param: Any, z: Any, n: Any, values: Any, unique: Any, starts: Any, order: Any,
               lo: int, hi: int, lr: Any, inverse_lr: Any, shift: Any, l1: Any, sign: Any,
               counts: Any) -> None:
    """FTRL-Proximal on distinct rows ``lo..hi`` (``shift = beta + lr * l2``)."""
    width = param.shape[1]
    line = max(1, 64 // param.itemsize)
    grad = np.empty(width, param.dtype)
    end = starts[hi]  # the lookups of rows lo..hi are order[starts[lo]:end]
    _prefetch_first(param, unique, lo, hi)
    _prefetch_first(z, unique, lo, hi)
    _prefetch_first(n, unique, lo, hi)
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch_row(z, ahead, width, line)
            _prefetch_row(n, ahead, width, line)
        _sum_lookups(grad, values, order, starts[j], starts[j + 1], end, line)
        row = unique[j]
        for d in range(width):
            g = grad[d]
            n_old = n[row, d]
            n_new = n_old + g * g
            n[row, d] = n_new
            sqrt_n = np.sqrt(n_new)
            z_new = (z[row, d] + sign * g) + inverse_lr * ((np.sqrt(n_old) - sqrt_n)
                                                           * param[row, d])
            z[row, d] = z_new
            if abs(z_new) <= l1:
                param[row, d] = 0.0
            else:
                shrunk = (l1 if z_new > 0 else -l1) - z_new
                param[row, d] = shrunk * lr / (sqrt_n + shift)
        if counts.size:
            counts[row] += 1


@jit
def _rowwise_adagrad_rows(param: Any, state_sum: Any, values: Any, unique: Any, starts: Any,
                          order: Any, lo: int, hi: int, lr: Any, eps: Any, weight_decay: Any,
                          mode: int, sign: Any, zero: Any, one: Any, row_size: Any,
                          counts: Any) -> None:
    """Row-wise Adagrad on distinct rows ``lo..hi``; ``state_sum`` is ``(rows, 1)``.

    ``mode``: 0 no weight decay, 1 L2 (added to the gradient in the mean square,
    ``correction = 1 - multiplier * weight_decay``), 2 decoupled
    (``correction = 1 - lr * weight_decay``).
    """
    width = param.shape[1]
    line = max(1, 64 // param.itemsize)
    grad = np.empty(width, param.dtype)
    end = starts[hi]  # the lookups of rows lo..hi are order[starts[lo]:end]
    _prefetch_first(param, unique, lo, hi)
    _prefetch_first(state_sum, unique, lo, hi)
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch(state_sum, ahead, 0)
        _sum_lookups(grad, values, order, starts[j], starts[j + 1], end, line)
        for d in range(width):
            grad[d] = sign * grad[d]
        row = unique[j]
        # the sum of squares in four interleaved partial sums: a chain of `width`
        # dependent additions would take longer than the row's memory traffic
        sum0 = sum1 = sum2 = sum3 = zero
        for d in range(0, width - 3, 4):
            g0, g1, g2, g3 = grad[d], grad[d + 1], grad[d + 2], grad[d + 3]
            if mode == 1:
                g0 = g0 + weight_decay * param[row, d]
                g1 = g1 + weight_decay * param[row, d + 1]
                g2 = g2 + weight_decay * param[row, d + 2]
                g3 = g3 + weight_decay * param[row, d + 3]
            sum0 += g0 * g0
            sum1 += g1 * g1
            sum2 += g2 * g2
            sum3 += g3 * g3
        for d in range(width - width % 4, width):
            g0 = grad[d]
            if mode == 1:
                g0 = g0 + weight_decay * param[row, d]
            sum0 += g0 * g0
        s = state_sum[row, 0] + ((sum0 + sum1) + (sum2 + sum3)) / row_size
        state_sum[row, 0] = s
        multiplier = lr / (np.sqrt(s) + eps)
        if mode == 1:
            correction = one - multiplier * weight_decay
        elif mode == 2:
            correction = one - lr * weight_decay
        else:
            correction = one
        for d in range(width):
            param[row, d] = correction * param[row, d] - multiplier * grad[d]
        if counts.size:
            counts[row] += 1


# ------------------------------------------------------------------ the step
@jit
def _partition(rows: Any, num_rows: int, shift: int, slice_hist: Any, part_starts: Any,
               part_order: Any, task_order: Any, claims: Any) -> bool:
    """Phases 1 and 2 of the step (this thread's share): group the lookups by task.

    Returns False when a row is out of range (``claims[BAD]`` holds the first such
    lookup; nothing was written but counts), once every slice is counted; else True,
    once every slice is scattered.
    """
    lookups = rows.size
    slices = slice_hist.shape[0]
    per_slice = (lookups + slices - 1) // slices
    while True:
        s = _claim(claims, CLAIM_COUNT)
        if s >= slices:
            break
        lo = s * per_slice
        bad = _count_slice(rows, lo, min(lookups, lo + per_slice), num_rows, shift,
                           slice_hist[s])
        if bad >= 0:
            _lower_to(claims, BAD, bad)
        if _claim(claims, COUNTED) == slices - 1:  # the last slice: every count is in
            if _load_acquire(claims, BAD) < lookups:
                _store_release(claims, READY, OUT_OF_RANGE)
            else:
                _offsets(slice_hist, part_starts, task_order)
                _store_release(claims, READY, OFFSETS_READY)
    phase = _load_acquire(claims, READY)
    while phase == COUNTING:
        phase = _load_acquire(claims, READY)
    if phase == OUT_OF_RANGE:
        return False
    while True:
        s = _claim(claims, CLAIM_SCATTER)
        if s >= slices:
            break
        lo = s * per_slice
        _scatter_slice(rows, lo, min(lookups, lo + per_slice), shift, slice_hist[s],
                       part_order)
        if _claim(claims, SCATTERED) == slices - 1:
            _store_release(claims, READY, PARTITIONED)
    while _load_acquire(claims, READY) != PARTITIONED:
        pass
    return True


@jit
def run(frame: Any, witness: Any, slot: int) -> None:
    """One thread's share of the table step ``frame`` describes, with scratch ``slot``.

    Every thread given the frame calls it once: it shares in grouping the lookups by
    task (:func:`_partition`), then claims tasks, largest first, until none is left,
    and for each groups the task's lookups by row and updates its distinct rows with
    kernel ``frame[KERNEL]``. ``witness`` (a zero of the tables' dtype) types the
    tables. Claiming inside the compiled code keeps the GIL out of the loop.
    """
    index = np.int64(0)
    num_rows, width, lookups = frame[NUM_ROWS], frame[WIDTH], frame[LOOKUPS]
    kernel = frame[KERNEL]
    param = carray(_pointer(frame[TABLE0], witness), (num_rows, width))
    table1 = carray(_pointer(frame[TABLE1], witness), (num_rows, frame[STATE_WIDTH]))
    table2 = carray(_pointer(frame[TABLE2], witness), (num_rows, frame[STATE_WIDTH]))
    values = carray(_pointer(frame[VALUES], witness), (lookups, width))
    floats = carray(_pointer(frame[FLOATS], witness), (8,))
    rows = carray(_pointer(frame[IDS], index), (lookups,))
    parts = frame[NUM_PARTS]
    part_starts = carray(_pointer(frame[PARTS], index), (parts + 1,))
    part_order = carray(_pointer(frame[PART_ORDER], index), (lookups,))
    task_order = carray(_pointer(frame[TASK_ORDER], index), (parts,))
    slice_hist = carray(_pointer(frame[SLICE_HIST], index), (frame[SLICES], parts))
    mine = carray(_pointer(frame[SCRATCH], index),
                  (frame[SLOTS], SCRATCH_ARRAYS, frame[STRIDE]))[slot]
    hist = carray(_pointer(frame[HIST], index), (frame[SLOTS], 1 << DIGIT_BITS))[slot]
    claims = carray(_pointer(frame[CLAIMS], index), (NUM_CLAIMS,))
    counts = carray(_pointer(frame[COUNTS], index), (frame[NUM_COUNTS],))
    if not _partition(rows, num_rows, frame[SHIFT], slice_hist, part_starts, part_order,
                      task_order, claims):
        return
    unique, starts, order = mine[2], mine[3], mine[4]
    while True:
        claimed = _claim(claims, CLAIM_TASK)
        if claimed >= parts:
            return
        task = task_order[claimed]
        lo, hi = part_starts[task], part_starts[task + 1]
        if hi == lo:
            continue
        count = _group_task(rows, part_order, lo, hi, frame[SHIFT], task, mine, hist)
        if kernel == ADAGRAD:
            _adagrad_rows(param, table1, values, unique, starts, order, 0, count, floats[0],
                          floats[1], floats[2], counts)
        elif kernel == SPARSE_ADAM:
            _sparse_adam_rows(param, table1, table2, values, unique, starts, order, 0, count,
                              floats[0], floats[1], floats[2], floats[3], floats[4], counts)
        elif kernel == FTRL:
            _ftrl_rows(param, table1, table2, values, unique, starts, order, 0, count,
                       floats[0], floats[1], floats[2], floats[3], floats[4], counts)
        else:
            _rowwise_adagrad_rows(param, table1, values, unique, starts, order, 0, count,
                                  floats[0], floats[1], floats[2], frame[MODE], floats[3],
                                  floats[4], floats[5], floats[6], counts)


@jit
def run_batch(batch: Any, witness: Any) -> int:
    """One thread's share of a batch of table steps; returns how many entries it took.

    Every thread of the step calls it once: it takes a scratch slot, then claims
    entries in turn until none is left and does its share of each one's frame
    (:func:`run`). A frame listed ``k`` times is shared by at most ``k`` threads; a
    thread that comes to a frame its others have finished finds no work there.
    """
    slot = _claim(batch, NEXT_SLOT)
    taken = 0
    while True:
        entry = _claim(batch, NEXT_ENTRY)
        if entry >= batch[NUM_ENTRIES]:
            return taken
        taken += 1
        run(carray(_pointer(batch[BATCH_HEADER + entry], np.int64(0)), (FRAME_SIZE,)),
            witness, slot)


# GOMP_parallel takes a C function: one per dtype, compiled on first use. numba
# caches compiled code of module-level functions only (not of closures), so both
# are written out.
def _entry32(batch: Any) -> None:
    header = carray(batch, (BATCH_HEADER,), np.int64)
    run_batch(carray(batch, (BATCH_HEADER + header[NUM_ENTRIES],), np.int64), np.float32(0))


def _entry64(batch: Any) -> None:
    header = carray(batch, (BATCH_HEADER,), np.int64)
    run_batch(carray(batch, (BATCH_HEADER + header[NUM_ENTRIES],), np.int64), np.float64(0))


_ENTRY_BODIES = {4: _entry32, 8: _entry64}
_ENTRIES: dict[int, Any] = {}  # the compiled cfuncs: their code lives as long as they do


def team_entry(itemsize: int) -> int:
    """The address of ``void entry(int64 *batch)``, which runs :func:`run_batch` on tables
    of ``itemsize``-byte floats (for ``GOMP_parallel``: every thread of the team calls it)."""
    if itemsize not in _ENTRIES:
        _ENTRIES[itemsize] = numba.cfunc(types.void(types.voidptr),
                                         cache=True)(_ENTRY_BODIES[itemsize])
    return int(_ENTRIES[itemsize].address)
