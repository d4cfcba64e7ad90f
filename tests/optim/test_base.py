"""The base class's shared machinery: CPU blocking and device/dtype grouping."""

from __future__ import annotations

import pytest
import torch

from gradguard.optim import base
from gradguard.optim.base import cpu_blocks, group_by_device_and_dtype


def test_cpu_blocks_cover_every_element_once_with_its_scalar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 16)  # 4 float32 elements
    tensors = [torch.zeros(10), torch.zeros(1), torch.zeros(2), torch.zeros(3, 2).t()]
    states = [torch.zeros_like(t) for t in tensors]
    scalars = [1.0, 2.0, 3.0, 4.0]
    blocks = list(cpu_blocks([tensors, states, []], [scalars]))
    assert len(blocks) > 2  # the 10-element tensor was cut into slices
    for (block, state_block, absent), (values,) in blocks:
        assert absent == []
        assert len(block) == len(state_block) == len(values)
        assert len(block) == 1 or sum(t.numel() for t in block) <= 4
        for t, s, value in zip(block, state_block, values, strict=True):
            assert t.shape == s.shape
            t.add_(value)
            s.add_(1)
    for t, s, value in zip(tensors, states, scalars, strict=True):
        assert torch.equal(t, torch.full_like(t, value))
        assert torch.equal(s, torch.ones_like(s))


def test_non_contiguous_tensors_stay_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CPU_BLOCK_BYTES", 16)
    transposed = torch.zeros(9, 8).t()
    blocks = [tensors for tensors, _ in cpu_blocks([[transposed]])]
    assert blocks == [[[transposed]]]


def test_blocks_of_default_size_leave_small_problems_whole() -> None:
    tensors = [torch.zeros(100), torch.zeros(7)]
    assert [b for b, _ in cpu_blocks([tensors])] == [[tensors]]


def test_group_by_device_and_dtype_keeps_empty_lists_and_order() -> None:
    a, b, c = torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(2)
    groups = group_by_device_and_dtype([a, b, c], [c, a, b], [])
    assert [key[1] for key, _ in groups] == [torch.float32, torch.float64]
    (_, (first, second, empty)), (_, (third, *_)) = groups
    assert first == [a, c] and second == [c, b] and empty == [] and third == [b]
