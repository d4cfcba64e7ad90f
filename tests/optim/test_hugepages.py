"""Huge-page advice for large embedding tables: contents untouched, opt-out, best effort."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import gradguard.optim as go
from gradguard.optim import _hugepages, _sparse

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_available = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are off (or not Linux)")

# a float32 table of 4x the threshold: its 2 MiB-aligned interior (what is advised) is
# most of it
ROWS = 4 * _hugepages.MIN_BYTES // (16 * 4)


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s storage backed by huge pages now (``/proc/self/smaps``)."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    total = 0
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            low = high = 0
            for line in smaps:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    low, high = (int(x, 16) for x in head.split("-"))
                    inside = low < end and high > start
                elif inside and head == "AnonHugePages:":
                    # the VMA's huge pages; an advised range is its own VMA (madvise splits it)
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return min(total, end - start)


@thp_available
def test_large_table_is_advised_and_keeps_its_contents() -> None:
    table = torch.randn(ROWS, 16)
    before = table.clone()
    assert _hugepages.advise(table)
    assert torch.equal(table, before)
    # MADV_COLLAPSE (Linux >= 6.1, with huge pages free) moves the memory into huge pages
    # now; otherwise khugepaged does it later, so only the advice is asserted then
    if storage_key(table) in _hugepages.collapsed:
        assert huge_page_bytes(table) >= table.numel() * 4 // 2
    assert _hugepages.advise(table)  # once per storage: a second call is a no-op


def test_small_tensors_are_left_alone() -> None:
    assert not _hugepages.advise(torch.zeros(1000, 16))


def test_opt_out_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_hugepages.ENV, "0")
    assert not _hugepages.enabled()
    assert not _hugepages.advise(torch.zeros(ROWS, 16))


@pytest.mark.skipif(not _sparse.kernels_installed(), reason="numba not installed")
@thp_available
def test_sparse_step_on_an_advised_table_equals_torch() -> None:
    """The compiled Adagrad step on a table above the threshold (advised on its first
    sparse step) gives torch.optim.Adagrad's numbers, and leaves other rows alone."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(ROWS, 16, generator=gen)
    ours = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    opt, ref_opt = go.Adagrad([ours], lr=0.1), torch.optim.Adagrad([ref], lr=0.1)
    for _ in range(3):
        ids = torch.randint(0, 5000, (300,), generator=gen) * (ROWS // 5000)
        values = torch.randn(300, 16, generator=gen)
        for p, o in ((ours, opt), (ref, ref_opt)):
            p.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (ROWS, 16))
            o.step()
    state_sum = opt.state[ours]["sum"]
    if storage_key(state_sum) in _hugepages.collapsed:
        assert huge_page_bytes(state_sum) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(ROWS, dtype=torch.bool)
    untouched[torch.arange(0, 5000) * (ROWS // 5000)] = False
    assert torch.equal(ours.detach()[untouched], start[untouched])
