"""The coordinate sample: fixed size, deterministic, exact when it covers the tensor."""

from __future__ import annotations

import time

import torch

from gradguard.watch import CoordinateSampler
from gradguard.watch.sampling import draw, take, take_sparse


def test_small_tensor_is_covered_completely() -> None:
    sampler = CoordinateSampler(size=64)
    t = torch.randn(5, 7)
    assert torch.equal(sampler.indices((0, 0), t), torch.arange(35))


def test_large_tensor_gets_exactly_size_distinct_sorted_coordinates() -> None:
    for numel in (65, 200, 300, 100_000):  # the permutation and the rejection paths
        index = draw(numel, 64, seed=1)
        assert index.numel() == 64
        assert torch.equal(index, torch.unique(index))  # sorted and distinct
        assert int(index.min()) >= 0 and int(index.max()) < numel


def test_sample_is_deterministic_per_seed_and_tensor_position() -> None:
    t = torch.randn(1000, 10)
    a = CoordinateSampler(size=32, seed=5).indices((0, 1), t)
    b = CoordinateSampler(size=32, seed=5).indices((0, 1), t)
    c = CoordinateSampler(size=32, seed=5).indices((0, 2), t)
    d = CoordinateSampler(size=32, seed=6).indices((0, 1), t)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_sample_is_drawn_once_and_redrawn_only_when_the_shape_changes() -> None:
    sampler = CoordinateSampler(size=16)
    t = torch.randn(100, 4)
    first = sampler.indices((0, 0), t)
    assert sampler.indices((0, 0), t.add(1)) is first  # values change, sample stays
    resized = sampler.indices((0, 0), torch.randn(50, 4))
    assert resized is not first and int(resized.max()) < 200


def test_drawing_costs_the_sample_size_not_the_tensor_size() -> None:
    t0 = time.perf_counter()
    index = draw(10**12, 1024, seed=0)  # a permutation of 10**12 would never finish
    assert index.numel() == 1024 and time.perf_counter() - t0 < 1.0


def test_take_reads_same_shape_row_and_scalar_state() -> None:
    shape = torch.Size((4, 3))
    index = torch.tensor([0, 4, 11])
    full = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(take(full, index, shape), torch.tensor([0.0, 4.0, 11.0]))
    per_row = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert torch.equal(take(per_row, index, shape), torch.tensor([10.0, 20.0, 40.0]))
    scalar = torch.tensor(7.0)
    assert torch.equal(take(scalar, index, shape), torch.tensor([7.0, 7.0, 7.0]))
    assert take(torch.zeros(5), index, shape) is None


def test_take_of_a_sparse_gradient_equals_the_dense_one() -> None:
    shape = torch.Size((8, 3))
    rows = torch.tensor([[6, 1, 6, 3]])  # duplicates, unsorted
    values = torch.randn(4, 3, dtype=torch.float64)
    grad = torch.sparse_coo_tensor(rows, values, shape, check_invariants=True)
    index = torch.arange(24)
    assert torch.equal(take_sparse(grad, index, shape), grad.to_dense().reshape(-1))
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                    torch.zeros(0, 3), shape)
    assert torch.equal(take_sparse(empty, index, shape), torch.zeros(24))
