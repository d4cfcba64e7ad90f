"""Compiled CPU kernels for row-sparse updates (numba; ``pip install gradguard[fast]``).

Imported on first use by :mod:`gradguard.optim._sparse`, never by ``import
gradguard``. A sparse step:

1. :func:`group_lookups` finds the distinct rows of the lookups with a hash table
   (no sort) and groups each row's lookups (a stable counting sort of the lookup
   numbers), touching only the ids and scratch that fits in L2, not the values;
2. each thread makes one call of the algorithm's step (:func:`adagrad`,
   :func:`sparse_adam`, :func:`ftrl`, :func:`rowwise_adagrad`), which claims
   chunks of the distinct rows with an atomic counter until none is left (a
   preempted thread delays the step by one small chunk, and the GIL stays out of
   the loop); for each row it sums the values of the row's lookups in lookup
   order (duplicates are coalesced here, on all threads) and updates the row in
   place, prefetching the parameter and state rows and the values
   :data:`PREFETCH_ROWS` rows ahead, so that the time goes to the touched rows'
   memory traffic rather than to the latency of each random row.

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
from numba.core import cgutils, types
from numba.extending import intrinsic

PREFETCH_ROWS = 16
"""How many distinct rows ahead the parameter and state rows are prefetched."""

PREFETCH_LOOKUPS = 16
"""How many lookups ahead (in row order) the values rows are prefetched: a hot row's
lookups are scattered over the values, so each would otherwise wait for memory."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: 2**64 / golden ratio

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


@intrinsic
def _claim(typingctx: Any, counter: Any) -> Any:
    """Atomically ``counter[0] += 1``, returning the old value: the next task to run."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, ary,
                                       [context.get_constant(types.intp, 0)], wraparound=False)
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@jit
def group_lookups(rows: Any, num_rows: int, keys: Any, slots: Any, unique: Any, starts: Any,
                  order: Any, inverse: Any, cursor: Any) -> int:
    """Group the lookups by row; return the number of distinct rows.

    Afterwards, for ``j < count``: ``unique[j]`` is a distinct row (in order of first
    lookup) and ``order[starts[j]:starts[j + 1]]`` are its lookups, ascending. The
    values are not touched: the update kernels sum a row's lookups when they update
    it. ``keys`` (all ``-1``, a power-of-two size above twice the lookups) and
    ``slots`` are the hash table's scratch, left all ``-1`` again; ``inverse`` and
    ``cursor`` are scratch of the lookups' size. A row outside ``[0, num_rows)``
    stops the grouping: the result is then ``-1 - i`` for the first such lookup ``i``.
    """
    mask = keys.size - 1
    bits = 0
    while (1 << bits) < keys.size:
        bits += 1
    shift = np.uint64(64 - bits)  # the top `bits` bits of the hash index the table
    count = 0
    bad = -1
    starts[0] = 0
    for i in range(rows.size):
        row = rows[i]
        if row < 0 or row >= num_rows:
            bad = i
            break
        at = np.int64((np.uint64(row) * _GOLDEN) >> shift) & mask
        while keys[at] != -1 and keys[at] != row:
            at = (at + 1) & mask
        if keys[at] == -1:
            keys[at] = row
            slots[at] = count
            unique[count] = row
            cursor[count] = at
            starts[count + 1] = 0
            count += 1
        j = slots[at]
        inverse[i] = j
        starts[j + 1] += 1
    for j in range(count):  # leave the table empty for the next call
        keys[cursor[j]] = -1
    if bad >= 0:
        return -1 - bad
    for j in range(count):  # lookups per row -> where each row's lookups start
        starts[j + 1] += starts[j]
        cursor[j] = starts[j]
    for i in range(rows.size):  # a stable counting sort of the lookups by row
        j = inverse[i]
        order[cursor[j]] = i
        cursor[j] += 1
    return count


# Each update kernel starts distinct row j by prefetching the parameter and state
# rows PREFETCH_ROWS distinct rows ahead; then it sums the row's lookups, in
# lookup order (prefetching values PREFETCH_LOOKUPS lookups ahead), into `grad`,
# a row-sized buffer that stays in L1, and updates the row in place. The summing
# loop is written out in each kernel: a helper taking arrays measured 1.6-2x slower
# per row.


@jit
def _prefetch_row(table: Any, row: Any, width: Any, line: Any) -> None:
    """Ask for every cache line of ``table[row]`` ahead of its use."""
    for c in range(0, width, line):
        _prefetch(table, row, c)


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
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch_row(state_sum, ahead, width, line)
        first = starts[j]
        if first + PREFETCH_LOOKUPS < end:
            _prefetch_row(values, order[first + PREFETCH_LOOKUPS], width, line)
        lookup = order[first]
        for d in range(width):
            grad[d] = values[lookup, d]
        for k in range(first + 1, starts[j + 1]):
            if k + PREFETCH_LOOKUPS < end:
                _prefetch_row(values, order[k + PREFETCH_LOOKUPS], width, line)
            lookup = order[k]
            for d in range(width):
                grad[d] += values[lookup, d]
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
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch_row(exp_avg, ahead, width, line)
            _prefetch_row(exp_avg_sq, ahead, width, line)
        first = starts[j]
        if first + PREFETCH_LOOKUPS < end:
            _prefetch_row(values, order[first + PREFETCH_LOOKUPS], width, line)
        lookup = order[first]
        for d in range(width):
            grad[d] = values[lookup, d]
        for k in range(first + 1, starts[j + 1]):
            if k + PREFETCH_LOOKUPS < end:
                _prefetch_row(values, order[k + PREFETCH_LOOKUPS], width, line)
            lookup = order[k]
            for d in range(width):
                grad[d] += values[lookup, d]
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
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch_row(z, ahead, width, line)
            _prefetch_row(n, ahead, width, line)
        first = starts[j]
        if first + PREFETCH_LOOKUPS < end:
            _prefetch_row(values, order[first + PREFETCH_LOOKUPS], width, line)
        lookup = order[first]
        for d in range(width):
            grad[d] = values[lookup, d]
        for k in range(first + 1, starts[j + 1]):
            if k + PREFETCH_LOOKUPS < end:
                _prefetch_row(values, order[k + PREFETCH_LOOKUPS], width, line)
            lookup = order[k]
            for d in range(width):
                grad[d] += values[lookup, d]
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
    for j in range(lo, hi):
        if j + PREFETCH_ROWS < hi:
            ahead = unique[j + PREFETCH_ROWS]
            _prefetch_row(param, ahead, width, line)
            _prefetch(state_sum, ahead, 0)
        first = starts[j]
        if first + PREFETCH_LOOKUPS < end:
            _prefetch_row(values, order[first + PREFETCH_LOOKUPS], width, line)
        lookup = order[first]
        for d in range(width):
            grad[d] = values[lookup, d]
        for k in range(first + 1, starts[j + 1]):
            if k + PREFETCH_LOOKUPS < end:
                _prefetch_row(values, order[k + PREFETCH_LOOKUPS], width, line)
            lookup = order[k]
            for d in range(width):
                grad[d] += values[lookup, d]
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


# ----------------------------------------------------------------- the steps
# One call per thread: each claims chunks of the distinct rows (``bounds``) until
# none is left, updates them, and returns how many it did (the caller need not
# wait for a thread that started too late to get one). Claiming inside the
# compiled code keeps the GIL out of the loop: threads that came back to Python
# between chunks would queue for it, one behind the other.


@jit
def adagrad(param: Any, state_sum: Any, values: Any, unique: Any, starts: Any, order: Any,
            bounds: Any, claim: Any, minus_clr: Any, eps: Any, sign: Any,
            counts: Any) -> int:
    """Adagrad's sparse step on the chunks of distinct rows this thread claims."""
    done = 0
    while True:
        chunk = _claim(claim)
        if chunk >= bounds.size - 1:
            return done
        done += 1
        _adagrad_rows(param, state_sum, values, unique, starts, order, bounds[chunk],
                      bounds[chunk + 1], minus_clr, eps, sign, counts)


@jit
def sparse_adam(param: Any, exp_avg: Any, exp_avg_sq: Any, values: Any, unique: Any,
                starts: Any, order: Any, bounds: Any, claim: Any, one_minus_beta1: Any,
                one_minus_beta2: Any, eps: Any, minus_step_size: Any, sign: Any,
                counts: Any) -> int:
    """SparseAdam's step on the chunks of distinct rows this thread claims."""
    done = 0
    while True:
        chunk = _claim(claim)
        if chunk >= bounds.size - 1:
            return done
        done += 1
        _sparse_adam_rows(param, exp_avg, exp_avg_sq, values, unique, starts, order,
                          bounds[chunk], bounds[chunk + 1], one_minus_beta1, one_minus_beta2,
                          eps, minus_step_size, sign, counts)


@jit
def ftrl(param: Any, z: Any, n: Any, values: Any, unique: Any, starts: Any, order: Any,
         bounds: Any, claim: Any, lr: Any, inverse_lr: Any, shift: Any, l1: Any, sign: Any,
         counts: Any) -> int:
    """FTRL's sparse step on the chunks of distinct rows this thread claims."""
    done = 0
    while True:
        chunk = _claim(claim)
        if chunk >= bounds.size - 1:
            return done
        done += 1
        _ftrl_rows(param, z, n, values, unique, starts, order, bounds[chunk],
                   bounds[chunk + 1], lr, inverse_lr, shift, l1, sign, counts)


@jit
def rowwise_adagrad(param: Any, state_sum: Any, values: Any, unique: Any, starts: Any,
                    order: Any, bounds: Any, claim: Any, lr: Any, eps: Any, weight_decay: Any,
                    mode: int, sign: Any, zero: Any, one: Any, row_size: Any,
                    counts: Any) -> int:
    """Row-wise Adagrad's sparse step on the chunks of distinct rows this thread claims."""
    done = 0
    while True:
        chunk = _claim(claim)
        if chunk >= bounds.size - 1:
            return done
        done += 1
        _rowwise_adagrad_rows(param, state_sum, values, unique, starts, order, bounds[chunk],
                              bounds[chunk + 1], lr, eps, weight_decay, mode, sign, zero, one,
                              row_size, counts)
