"""RowWiseAdagrad is FBGEMM's EXACT_ROWWISE_ADAGRAD: one accumulator per row.

The reference below is the update written out row by row with Python floats,
from FBGEMM's ``rowwise_adagrad`` (``fbgemm_gpu/codegen/genscript/optimizers.py``).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from gradguard.optim import Adagrad
from gradguard.optim.rowwise import RowWiseAdagrad
from tests.optim.harness import (
    GradientStream,
    assert_params_close,
    config_ids,
    lockstep,
    make_params,
)
from tests.optim.test_sparse_adagrad import (
    KERNEL_IMPLS,
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


def row_step(w: list[float], g: list[float], s: float, *, lr: float, eps: float,
             weight_decay: float, mode: str, maximize: bool) -> tuple[list[float], float]:
    """One row's step: the new (row, accumulator)."""
    if maximize:
        g = [-x for x in g]
    decayed = [x + weight_decay * v for x, v in zip(g, w, strict=True)] if mode == "l2" else g
    s = s + sum(x * x for x in decayed) / len(w)
    multiplier = lr / (math.sqrt(s) + eps)
    correction = {"l2": 1 - multiplier * weight_decay, "decoupled": 1 - lr * weight_decay,
                  "none": 1.0}[mode]
    return [correction * v - multiplier * x for v, x in zip(w, g, strict=True)], s


class PlainRowWise(torch.optim.Optimizer):
    """:func:`row_step` on every row of a dense gradient, or the rows of a sparse one."""

    def __init__(self, params: Any, lr: float = 0.01, eps: float = 1e-8,
                 weight_decay: float = 0.0, weight_decay_mode: str = "l2",
                 initial_accumulator_value: float = 0.0, maximize: bool = False) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay,
                                  "mode": weight_decay_mode, "maximize": maximize,
                                  "initial": initial_accumulator_value})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            args = {k: group[k] for k in ("lr", "eps", "weight_decay", "mode", "maximize")}
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows = p.shape[0] if p.dim() else 1
                state = self.state[p]
                if not state:
                    state["sum"] = [group["initial"]] * rows
                table = p.view(rows, -1)
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()
                    touched = grad.indices()[0].tolist()
                    grads = grad.values().flatten(1).tolist()
                else:
                    touched, grads = list(range(rows)), p.grad.reshape(rows, -1).tolist()
                for r, g in zip(touched, grads, strict=True):
                    row, state["sum"][r] = row_step(table[r].tolist(), g, state["sum"][r],
                                                    **args)
                    table[r] = torch.tensor(row, dtype=p.dtype)


GRID: list[dict[str, Any]] = [
    {},
    {"lr": 0.1, "eps": 1e-3, "initial_accumulator_value": 0.3},
    {"weight_decay": 0.1},
    {"weight_decay": 0.2, "weight_decay_mode": "decoupled", "maximize": True},
    {"weight_decay": 0.2, "weight_decay_mode": "none"},
]


@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_dense_gradients_equal_the_row_formula(config: dict[str, Any]) -> None:
    ours, _, theirs, _ = lockstep(lambda ps: RowWiseAdagrad(ps, **config),
                                  lambda ps: PlainRowWise(ps, **config), 300)
    assert_params_close(ours, theirs, 1e-12)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_sparse_gradients_equal_the_row_formula_over_300_zipf_steps(config: dict[str, Any],
                                                                     impl: str) -> None:
    ours, opt, theirs, ref = sparse_lockstep(lambda ps: RowWiseAdagrad(ps, impl=impl, **config),
                                             lambda ps: PlainRowWise(ps, **config))
    assert_close(ours, theirs, 1e-12)
    assert_close([opt.state[p]["sum"] for p in ours],
                 [torch.tensor(ref.state[p]["sum"], dtype=torch.float64) for p in theirs],
                 1e-12, "state 'sum' of")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_untouched_rows_are_bit_identical(impl: str, mode: str) -> None:
    params = make_tables()
    opt = RowWiseAdagrad(params, lr=0.1, weight_decay=0.1, weight_decay_mode=mode, impl=impl)
    stream = ZipfLookups(gaps=False)
    params[0].grad = stream.grad(0, 0)
    opt.step()  # the state exists from the first step on
    for t in range(1, 4):
        params[0].grad = stream.grad(0, t)
        assert_lazy(params[0], opt, ["sum"])


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", GRID[2:], ids=config_ids(GRID[2:]))
def test_kernel_equals_torch_ops(config: dict[str, Any], dtype: torch.dtype,
                                 tol: float) -> None:
    ours, opt, ref, ref_opt = sparse_lockstep(
        lambda ps: RowWiseAdagrad(ps, impl="auto", **config),
        lambda ps: RowWiseAdagrad(ps, impl="reference", **config), 100, dtype=dtype)
    assert_close(ours, ref, tol)
    assert_state_close(opt, ref_opt, ours, ref, ["sum"], tol)


def test_state_is_one_value_per_row() -> None:
    table = torch.nn.Parameter(torch.zeros(1000, 64))
    rowwise, adagrad = RowWiseAdagrad([table]), Adagrad([table])
    table.grad = torch.ones(1000, 64)
    rowwise.step()
    assert rowwise.state[table]["sum"].shape == (1000,)
    assert rowwise.state[table]["sum"].nbytes * 64 == adagrad.state[table]["sum"].nbytes


def test_weight_decay_mode_is_checked_naming_it() -> None:
    with pytest.raises(ValueError, match=r"weight_decay_mode='L2'.*'none', 'l2', 'decoupled'"):
        RowWiseAdagrad(make_params(), weight_decay_mode="L2")


def test_several_sparse_dims_are_refused_naming_the_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = RowWiseAdagrad([p])
    p.grad = torch.sparse_coo_tensor([[1], [2]], torch.ones(1), (4, 3), check_invariants=True)
    with pytest.raises(RuntimeError, match=r"2 sparse dimensions for parameter 0 of param "
                                           r"group 0 \(shape \(4, 3\)\)"):
        opt.step()


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_row_update_counts_when_asked(impl: str) -> None:
    params = make_tables()
    opt = RowWiseAdagrad(params[:1], impl=impl, count_row_updates=True)
    stream = ZipfLookups()
    expected = torch.zeros(TABLES[0][0], dtype=torch.int64)
    for t in range(20):
        params[0].grad = stream.grad(0, t)
        if params[0].grad is not None:
            expected += touched_rows(params[0].grad)
        opt.step()
    assert torch.equal(opt.state[params[0]]["row_update_count"], expected)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(opt.state[params[0]]["row_update_count"], expected + 1)


def test_non_contiguous_parameters_take_dense_gradients() -> None:
    weight = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64).t())  # (3, 5), strided
    plain = torch.nn.Parameter(weight.detach().clone())
    opt, ref = RowWiseAdagrad([weight], weight_decay=0.1), PlainRowWise([plain], weight_decay=0.1)
    stream = GradientStream([weight])
    for t in range(20):
        stream.apply([weight], t)
        stream.apply([plain], t)
        opt.step()
        ref.step()
    assert_params_close([weight], [plain], 1e-12)
