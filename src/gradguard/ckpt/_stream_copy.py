"""A memory copy with non-temporal (streaming) stores, compiled with numba.

Imported on first use by :mod:`gradguard.ckpt.checkpointer` for large async
snapshots, never by ``import gradguard``. An ordinary copy (``memcpy``,
``np.copyto``) reads each destination cache line before overwriting it (a
read-for-ownership), so copying N bytes moves 3N bytes over the memory bus.
Streaming stores write whole cache lines past the caches: 2N bytes, which
measured 12 ms instead of 18 ms for a 200 MB snapshot on two cores
(``benchmarks/checkpoint.py``). The snapshot is written to disk by another
thread soon after, from memory either way: the buffers are larger than the caches.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

LINE = 64
"""Bytes per streaming store: one cache line (one AVX-512 register, or two AVX)."""


@intrinsic
def _stream_line(typingctx: Any, dst: Any, src: Any, offset: Any) -> Any:
    """``dst[offset:offset + 64] = src[offset:offset + 64]``, the store non-temporal.

    ``dst + offset`` must be 64-byte aligned; ``src`` may have any alignment.
    """

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dst_array = context.make_array(signature.args[0])(context, builder, args[0])
        src_array = context.make_array(signature.args[1])(context, builder, args[1])
        at = context.cast(builder, args[2], signature.args[2], types.intp)
        line = ir.VectorType(ir.IntType(64), LINE // 8).as_pointer()
        value = builder.load(builder.bitcast(builder.gep(src_array.data, [at]), line), align=1)
        store = builder.store(value, builder.bitcast(builder.gep(dst_array.data, [at]), line),
                              align=LINE)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.void(dst, src, offset), codegen


@intrinsic
def _store_fence(typingctx: Any) -> Any:
    """A full memory fence: streaming stores are weakly ordered, and the thread that
    writes the snapshot to disk must see them."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(cache=True, nogil=True)
def stream_copy(dst: np.ndarray, src: np.ndarray) -> None:  # pragma: no cover - compiled
    """``dst[:] = src`` for equal-length 1-D uint8 arrays (not overlapping).

    Bytes before ``dst``'s first 64-byte boundary and after its last whole line
    are copied with ordinary stores; the rest with streaming stores.
    """
    n = dst.shape[0]
    head = (-dst.ctypes.data) % LINE
    if head > n:
        head = n
    for i in range(head):
        dst[i] = src[i]
    i = head
    while i + LINE <= n:
        _stream_line(dst, src, i)
        i += LINE
    for j in range(i, n):
        dst[j] = src[j]
    _store_fence()
