"""FTRL on sparse gradients: Algorithm 1 applied lazily to the touched rows.

From zero weights, lazy FTRL and dense FTRL on the same gradients (densified)
are the same algorithm: a coordinate whose gradient is zero keeps its ``z``
and ``n``, so its closed-form weight does not change, and a never-touched
coordinate has the weight 0 either way. That gives the dense reference to
compare the sparse path with.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradguard.optim.ftrl import FTRL
from tests.optim.harness import config_ids
from tests.optim.test_sparse_adagrad import (
    KERNEL_IMPLS,
    STEPS,
    TABLES,
    ZipfLookups,
    assert_close,
    assert_lazy,
    assert_state_close,
    make_tables,
    needs_kernels,
    one_thread,  # noqa: F401 (autouse fixture)
    sparse_lockstep,
    touched_rows,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

GRID: list[dict[str, Any]] = [
    {},
    {"l1": 0.5, "lr": 0.3},
    {"l1": 0.2, "l2": 0.3, "beta": 0.5, "initial_accumulator_value": 0.1},
    {"maximize": True, "l1": 0.3},
]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_sparse_from_zero_weights_equals_dense_over_300_zipf_steps(config: dict[str, Any],
                                                                   impl: str) -> None:
    sparse = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in TABLES]
    dense = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in TABLES]
    opt = FTRL(sparse, impl=impl, **config)
    ref = FTRL(dense, impl="reference", **config)
    stream = ZipfLookups()
    for t in range(STEPS):
        stream.apply(sparse, t)
        for p, q in zip(sparse, dense, strict=True):
            q.grad = None if p.grad is None else p.grad.to_dense()
        opt.step()
        ref.step()
    assert_close(sparse, dense, 1e-12)
    assert_state_close(opt, ref, sparse, dense, ["z", "n"], 1e-12)
    if config.get("l1"):
        assert (sparse[0] == 0).any() and (sparse[0] != 0).any()  # both branches ran


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_untouched_rows_are_bit_identical(impl: str) -> None:
    params = make_tables()  # random weights: dense FTRL would replace them all
    opt = FTRL(params, l1=0.3, impl=impl)
    stream = ZipfLookups(gaps=False)
    params[0].grad = stream.grad(0, 0)
    opt.step()
    for t in range(1, 4):
        params[0].grad = stream.grad(0, t)
        assert_lazy(params[0], opt, ["z", "n"])


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kernel_equals_torch_ops(dtype: torch.dtype, tol: float) -> None:
    config = {"l1": 0.2, "l2": 0.1, "lr": 0.3, "maximize": True}
    ours, opt, ref, ref_opt = sparse_lockstep(lambda ps: FTRL(ps, impl="auto", **config),
                                              lambda ps: FTRL(ps, impl="reference", **config),
                                              100, dtype=dtype)
    assert_close(ours, ref, tol)
    assert_state_close(opt, ref_opt, ours, ref, ["z", "n"], tol)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_row_update_counts_when_asked(impl: str) -> None:
    params = make_tables()
    opt = FTRL(params[:1], impl=impl, count_row_updates=True)
    stream = ZipfLookups()
    expected = torch.zeros(TABLES[0][0], dtype=torch.int64)
    for t in range(20):
        params[0].grad = stream.grad(0, t)
        if params[0].grad is not None:
            expected += touched_rows(params[0].grad)
        opt.step()
    assert torch.equal(opt.state[params[0]]["row_update_count"], expected)
    assert "row_update_count" not in FTRL(params[1:]).state.get(params[1], {})
