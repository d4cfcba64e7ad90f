"""A sparse gradient with an id outside its parameter refuses the whole step.

Before anything changes (no parameter, state or step counter of any group, in
either implementation, nor the other optimizers of a ``Hybrid``), the step
raises IndexError naming the parameter, the lookup and the id.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import gradguard.optim as go
from gradguard.optim import _sparse
from gradguard.optim.ftrl import FTRL
from gradguard.optim.hybrid import Hybrid
from gradguard.optim.rowwise import RowWiseAdagrad
from tests.optim.test_sparse_adagrad import KERNEL_IMPLS, one_thread  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def sparse_grad(ids: list[int], shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    values = torch.randn(len(ids), shape[1], generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    return torch.sparse_coo_tensor(torch.tensor([ids]), values, shape, check_invariants=False)


def snapshot(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> Any:
    return copy.deepcopy(([p.detach() for p in params], optimizer.state_dict()))


def assert_same(before: Any, after: Any) -> None:
    (params_a, state_a), (params_b, state_b) = before, after
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    assert state_a["state"].keys() == state_b["state"].keys()
    for key, entry in state_a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, state_b["state"][key][name]), (key, name)


FACTORIES = {
    "adagrad": lambda groups, impl: go.Adagrad(groups, lr=0.1, impl=impl),
    "sparse_adam": lambda groups, impl: go.SparseAdam(groups, lr=0.1, impl=impl),
    "ftrl": lambda groups, impl: FTRL(groups, lr=0.1, impl=impl),
    "rowwise_adagrad": lambda groups, impl: RowWiseAdagrad(groups, lr=0.1, impl=impl),
}


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_bad_id_refuses_the_whole_step_and_names_it(name: str, impl: str) -> None:
    # three tables in two groups, one step taken already (so there is state to keep);
    # the second table of the first group gets id 40 of 40 rows at lookup 2
    shapes = [(30, 3), (40, 2), (50, 4)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    optimizer = FACTORIES[name]([{"params": params[:2]}, {"params": params[2:]}], impl)
    for i, (p, shape) in enumerate(zip(params, shapes, strict=True)):
        p.grad = sparse_grad([0, 3, 3], shape, seed=i)
    optimizer.step()
    before = snapshot(optimizer, params)
    for i, (p, shape) in enumerate(zip(params, shapes, strict=True)):
        p.grad = sparse_grad([5, 1, 40 if i == 1 else 7, 2], shape, seed=10 + i)
    with pytest.raises(IndexError, match=r"row 40 is out of range for 40 rows \(lookup 2 of "
                                         r"the gradient of parameter 1 of param group 0 "
                                         r"\(shape \(40, 2\)\)\); ids must be in \[0, size\); "
                                         r"the step changed nothing"):
        optimizer.step()
    assert_same(before, snapshot(optimizer, params))
    params[1].grad = sparse_grad([5, 1, 39, 2], shapes[1], seed=11)  # fixed: the step runs
    optimizer.step()
    assert not torch.equal(params[1].detach(), before[0][1])


@pytest.mark.parametrize("bad", [-1, 7])
def test_a_bad_index_in_a_later_sparse_dimension_is_refused(bad: int) -> None:
    # a COO gradient over both dims of a 5 x 7 matrix: (1, 7) would flatten to row 1 * 7
    # + 7 = 14, a valid coordinate of the wrong row; it is refused by dimension
    param = torch.nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    optimizer = go.Adagrad([param], lr=0.1)
    param.grad = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [3, bad, 4]]),
                                         torch.ones(3, dtype=torch.float64), (5, 7),
                                         check_invariants=False)
    with pytest.raises(IndexError, match=rf"index {bad} of sparse dimension 1 is out of range "
                                         r"for size 7 \(lookup 1 of the gradient of parameter 0"):
        optimizer.step()
    assert not param.detach().any()
    assert optimizer.state[param]["step"] == 0 and not optimizer.state[param]["sum"].any()


def test_hybrid_refuses_the_step_before_any_optimizer_moves() -> None:
    embedding = torch.nn.Parameter(torch.randn(20, 3, dtype=torch.float64))
    dense = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    hybrid = Hybrid({"dense": go.AdamW([dense], lr=0.1),
                     "embeddings": RowWiseAdagrad([embedding], lr=0.1)})
    dense.grad = torch.ones(4, dtype=torch.float64)
    embedding.grad = sparse_grad([1, 25], (20, 3))
    before = snapshot(hybrid, [embedding, dense])
    with pytest.raises(IndexError, match="row 25 is out of range for 20 rows"):
        hybrid.step()
    assert_same(before, snapshot(hybrid, [embedding, dense]))


def test_the_first_bad_gradient_is_named_whichever_check_finds_it() -> None:
    # embedding gradients are checked in one compiled pass (with the kernels), others
    # (several sparse dims) with torch ops; the error names the first in parameter order
    matrix = torch.sparse_coo_tensor(torch.tensor([[0, 9], [1, 1]]), torch.ones(2), (5, 7),
                                     check_invariants=False)
    table = sparse_grad([3, 2, -4], (6, 2))
    found = _sparse.first_out_of_range([sparse_grad([0, 1], (6, 2)), matrix, table])
    assert found == _sparse.OutOfRange(1, 1, 0, 9, 5)
    found = _sparse.first_out_of_range([table, matrix])
    assert found == _sparse.OutOfRange(0, 2, 0, -4, 6)
    assert _sparse.first_out_of_range([sparse_grad([0, 5], (6, 2)), sparse_grad([], (3, 2))]) \
        is None
