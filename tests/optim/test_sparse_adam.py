"""SparseAdam is torch.optim.SparseAdam: lazy Adam on the rows a sparse gradient touches."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from gradguard.optim.sparse_adam import SparseAdam
from tests.optim.harness import config_ids, rel_err, step_pair
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

GRID: list[dict[str, Any]] = [
    {},
    {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
    {"lr": 0.005, "betas": (0.0, 0.9), "maximize": True},
]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_equals_torch_sparse_adam_over_300_zipf_steps(config: dict[str, Any], impl: str) -> None:
    ours, opt, theirs, ref = sparse_lockstep(lambda ps: SparseAdam(ps, impl=impl, **config),
                                             lambda ps: torch.optim.SparseAdam(ps, **config))
    assert_close(ours, theirs, 1e-12)
    assert_state_close(opt, ref, ours, theirs, ["exp_avg", "exp_avg_sq"], 1e-12)
    for a, b in zip(ours, theirs, strict=True):
        assert opt.state[a]["step"].item() == ref.state[b]["step"]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_groups_with_their_own_hyperparameters_equal_torch(impl: str) -> None:
    def groups(ps: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.02, "betas": (0.5, 0.9)}]

    ours, _, theirs, _ = sparse_lockstep(lambda ps: SparseAdam(groups(ps), impl=impl),
                                         lambda ps: torch.optim.SparseAdam(groups(ps)), 50)
    assert_close(ours, theirs, 1e-12)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_untouched_rows_are_bit_identical(impl: str) -> None:
    params = make_tables()
    opt = SparseAdam(params, lr=0.01, impl=impl)
    stream = ZipfLookups(gaps=False)
    params[0].grad = stream.grad(0, 0)
    opt.step()  # the state exists from the first step on
    for t in range(1, 4):
        params[0].grad = stream.grad(0, t)
        assert_lazy(params[0], opt, ["exp_avg", "exp_avg_sq"])


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kernel_equals_torch_ops(dtype: torch.dtype, tol: float) -> None:
    config = {"lr": 0.01, "betas": (0.8, 0.95), "maximize": True}
    ours, opt, ref, ref_opt = sparse_lockstep(lambda ps: SparseAdam(ps, impl="auto", **config),
                                              lambda ps: SparseAdam(ps, impl="reference",
                                                                    **config), 100, dtype=dtype)
    assert_close(ours, ref, tol)
    assert_state_close(opt, ref_opt, ours, ref, ["exp_avg", "exp_avg_sq"], tol)


def test_dense_gradient_is_refused_naming_the_parameter() -> None:
    params = make_tables()
    opt = SparseAdam([{"params": params[:1]}, {"params": params[1:]}])
    params[1].grad = torch.ones_like(params[1])
    with pytest.raises(RuntimeError, match=r"dense gradient for parameter 0 of param group 1 "
                                           r"\(shape \(40, 3\)\).*Adam"):
        opt.step()


def test_empty_gradient_advances_the_step_only() -> None:
    params = make_tables()
    opt = SparseAdam(params[:1])
    stream = ZipfLookups(gaps=False)
    params[0].grad = stream.grad(0, 0)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    weights = params[0].detach().clone()
    params[0].grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                             torch.zeros(0, 6, dtype=torch.float64), (97, 6))
    opt.step()
    state = opt.state[params[0]]
    assert state["step"].item() == 2
    assert torch.equal(params[0], weights)
    assert all(torch.equal(state[k], before[k]) for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("direction", ["torch->gradguard", "gradguard->torch"])
def test_state_dict_round_trip_with_torch(direction: str) -> None:
    def torch_adam(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam(ps, lr=0.01)

    def ours(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return SparseAdam(ps, lr=0.01)

    first, second = (torch_adam, ours) if direction == "torch->gradguard" else (ours, torch_adam)
    params, opt, _, _ = sparse_lockstep(first, first, 20)
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    stayed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other, same = second(moved), first(stayed)
    other.load_state_dict(opt.state_dict())
    same.load_state_dict(opt.state_dict())
    step_pair(moved, stayed, lambda _: other, lambda _: same, lambda _: ZipfLookups(seed=5), 30)
    for a, b in zip(moved, stayed, strict=True):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_row_update_counts_when_asked(impl: str) -> None:
    params = make_tables()
    opt = SparseAdam(params[:1], impl=impl, count_row_updates=True)
    stream = ZipfLookups()
    expected = torch.zeros(TABLES[0][0], dtype=torch.int64)
    for t in range(20):
        params[0].grad = stream.grad(0, t)
        if params[0].grad is not None:
            expected += touched_rows(params[0].grad)
        opt.step()
    assert torch.equal(opt.state[params[0]]["row_update_count"], expected)
    assert "row_update_count" not in SparseAdam(params[1:]).state  # off by default


def test_constructor_matches_torch_names_and_defaults() -> None:
    theirs = inspect.signature(torch.optim.SparseAdam).parameters
    for name, param in inspect.signature(SparseAdam).parameters.items():
        if name in ("impl", "state_dtype", "count_row_updates"):
            continue
        assert name in theirs, f"SparseAdam.{name} not in torch"
        assert param.default == theirs[name].default, name


def test_half_precision_table_keeps_float32_moments() -> None:
    # weights well below 1: a first Adam step (lr 1e-3) is larger than their bfloat16
    # spacing, so every touched row changes (an unseeded randn made this flaky)
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter((0.01 * torch.randn(20, 4, generator=gen)).to(torch.bfloat16))
    opt = SparseAdam([table])
    table.grad = torch.sparse_coo_tensor([[2, 5, 2]], torch.ones(3, 4, dtype=torch.bfloat16),
                                         (20, 4), check_invariants=True)
    before = table.detach().clone()
    opt.step()
    assert opt.state[table]["exp_avg"].dtype == torch.float32
    changed = (table != before).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [2, 5]


def test_steps_count_per_parameter_as_torch() -> None:
    # a parameter without a gradient in a step does not advance its step (bias correction)
    ours, opt, theirs, ref = sparse_lockstep(lambda ps: SparseAdam(ps),
                                             lambda ps: torch.optim.SparseAdam(ps), 40)
    assert [opt.state[p]["step"].item() for p in ours] == [ref.state[p]["step"] for p in theirs]
