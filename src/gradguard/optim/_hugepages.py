"""Transparent huge pages for large embedding tables and their optimizer state (Linux).

A sparse step reads and writes a few thousand random rows of tables far larger
than the TLB covers with 4 KiB pages: almost every row then costs a page walk
before its memory access (two nested ones in a virtual machine). With 2 MiB
pages a 1 GiB table needs 512 TLB entries instead of 262,144, and the page
walks go. Measured on the benchmark machine (a VM), a sparse Adagrad update of
19,900 random rows of a 2,000,000 x 64 float32 table took 6.5 ms with 4 KiB
pages and 2.7 ms with huge pages, on one thread.

:func:`advise` asks the kernel for huge pages on a CPU tensor's memory once:
``madvise(MADV_HUGEPAGE)``, then ``madvise(MADV_COLLAPSE)`` (Linux >= 6.1),
which moves the memory already written into huge pages now instead of waiting
for ``khugepaged`` (minutes for a large table). The contents do not change;
collapsing costs about 3 ms per MB once (1.5 s for 512 MB here), in the first
sparse step that meets the tensor. Only tensors of at least :data:`MIN_BYTES`
are advised. Anything the kernel refuses (another OS, THP set to ``never``,
file-backed or pinned memory, no free huge pages) leaves the memory as it was;
advice never fails a step. ``GRADGUARD_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import torch

MIN_BYTES = 4 << 20
"""Tensors smaller than this are left alone. A 4 MiB table and its 4 MiB state already
outgrow what a second-level TLB of 1,536-2,048 entries reaches with 4 KiB pages (6-8 MiB),
and a model has many such tables: 26 tables of 100,000 x 16 float32 (6.4 MB each)
took 4.3-4.5 ms per sparse Adagrad step (2,048 uniform lookups each) with 4 KiB pages
and 3.8 ms with huge pages on the development VM (both in one process, alternating).
Collapsing costs ~20 ms per such tensor, once."""

HUGE_PAGE_BYTES = 2 << 20
"""The x86-64 / arm64 (4 KiB base pages) transparent huge page size."""

ENV = "GRADGUARD_HUGE_PAGES"
"""Set to ``0`` to turn the advice off."""

_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25

_lock = threading.Lock()
_advised: set[tuple[int, int]] = set()
collapsed: set[tuple[int, int]] = set()
"""(address, bytes) of the storages whose ``MADV_COLLAPSE`` succeeded: in huge pages now."""


def enabled() -> bool:
    """Whether :func:`advise` will ask: Linux, and not turned off by ``GRADGUARD_HUGE_PAGES=0``."""
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1").strip() != "0"


def advise(tensor: torch.Tensor) -> bool:
    """Ask for huge pages on the memory of ``tensor``'s storage (once per storage).

    Returns whether the kernel took the ``MADV_HUGEPAGE`` advice (also for a storage
    advised before); False for small, non-CPU or refused memory.
    """
    if tensor.device.type != "cpu" or not enabled():
        return False
    storage = tensor.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    key = (start, nbytes)
    if key in _advised:  # each new step frame on a storage asks again: answer without the lock
        return True
    if nbytes < MIN_BYTES:
        return False
    with _lock:
        if key in _advised:
            return True
        first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        last = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if last <= first:
            return False
        madvise = _madvise()
        if madvise is None or madvise(first, last - first, _MADV_HUGEPAGE) != 0:
            return False
        # best effort: kernels before 6.1 refuse it, and it fails without free huge pages
        if madvise(first, last - first, _MADV_COLLAPSE) == 0:
            collapsed.add(key)
        _advised.add(key)
        return True


_LIBC: list[ctypes.CDLL | None] = []


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not _LIBC:
        try:
            loaded = ctypes.CDLL(None, use_errno=True)
            loaded.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            loaded.madvise.restype = ctypes.c_int
            _LIBC.append(loaded)
        except (OSError, AttributeError):
            _LIBC.append(None)
    libc = _LIBC[0]
    return None if libc is None else libc.madvise
