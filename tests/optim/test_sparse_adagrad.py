"""Adagrad's sparse path is torch.optim.Adagrad's, applied lazily to the touched rows.

Also the shared sparse machinery (``gradguard.optim._sparse``): a Zipf-distributed
stream of embedding lookups with duplicates, the compiled kernels checked
against the torch-ops path, per-row update counts, bad input.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

import gradguard.optim as go
from gradguard.optim import _sparse
from tests.optim.harness import config_ids, rel_err, step_pair

# torch's own sparse paths build tensors without invariant checks
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

STEPS = 300
TABLES = ((97, 6), (40, 3))  # (rows, dim): an embedding table and a smaller one
LOOKUPS = 48

needs_kernels = pytest.mark.skipif(not _sparse.kernels_installed(),
                                   reason="numba not installed: no compiled kernels")
KERNEL_IMPLS = ["reference", pytest.param("auto", marks=needs_kernels)]
"""``reference``: torch ops; ``auto``: the compiled kernel (when numba is installed)."""


class ZipfLookups:
    """Deterministic sparse gradients as ``nn.Embedding(sparse=True)`` gives them.

    At step ``t``, table ``i`` gets ``LOOKUPS`` lookups of Zipf-distributed rows
    (exponent 1.1, hot rows scattered by a fixed permutation, so most steps repeat
    some rows), one gradient row per lookup, uncoalesced; every 9th step a table
    gets an empty gradient, every 7th step none.
    """

    def __init__(self, tables: Sequence[tuple[int, int]] = TABLES, seed: int = 0,
                 exponent: float = 1.1, lookups: int = LOOKUPS,
                 dtype: torch.dtype = torch.float64, gaps: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tables = tables
        self.weights = [torch.arange(1, rows + 1, dtype=torch.float64).pow(-exponent)
                        for rows, _ in tables]
        self.permutations = [torch.randperm(rows, generator=gen) for rows, _ in tables]
        self.seed, self.lookups, self.dtype, self.gaps = seed, lookups, dtype, gaps

    def ids(self, i: int, t: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 31 * t + i)
        ranks = torch.multinomial(self.weights[i], self.lookups, replacement=True, generator=gen)
        return self.permutations[i][ranks]

    def grad(self, i: int, t: int) -> torch.Tensor | None:
        rows, dim = self.tables[i]
        if self.gaps and (t + i) % 7 == 3:
            return None
        if self.gaps and (t + i) % 9 == 5:
            return torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                           torch.zeros(0, dim, dtype=self.dtype), (rows, dim),
                                           check_invariants=True)
        gen = torch.Generator().manual_seed(self.seed * 7_000_003 + 31 * t + i)
        values = torch.randn(self.lookups, dim, generator=gen, dtype=torch.float64)
        return torch.sparse_coo_tensor(self.ids(i, t).unsqueeze(0), values.to(self.dtype),
                                       (rows, dim), check_invariants=True)

    def apply(self, params: Sequence[torch.Tensor], t: int) -> None:
        for i, p in enumerate(params):
            p.grad = self.grad(i, t)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """torch's sparse ``add_`` waits on its thread team for tiny tensors; on a busy
    machine that makes the torch peers 100x slower than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tables(seed: int = 0, dtype: torch.dtype = torch.float64,
                tables: Sequence[tuple[int, int]] = TABLES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
            for shape in tables]


OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def sparse_lockstep(make_a: OptimizerFactory, make_b: OptimizerFactory, steps: int = STEPS,
                    dtype: torch.dtype = torch.float64, seed: int = 0,
                    ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                               list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Two optimizers from the same tables on the same sparse gradients."""
    params_a = make_tables(seed, dtype)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    return step_pair(params_a, params_b, make_a, make_b,
                     lambda _: ZipfLookups(seed=seed, dtype=dtype), steps)


def assert_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                 tol: float, what: str = "parameter") -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err = rel_err(a, e)
        assert err <= tol, f"{what} {i}: relative error {err:.3e} > {tol:.1e}"


def assert_state_close(actual: torch.optim.Optimizer, expected: torch.optim.Optimizer,
                       params_a: Sequence[torch.Tensor], params_b: Sequence[torch.Tensor],
                       keys: Sequence[str], tol: float) -> None:
    for key in keys:
        assert_close([actual.state[p][key] for p in params_a],
                     [expected.state[p][key] for p in params_b], tol, f"state {key!r} of")


def touched_rows(grad: torch.Tensor) -> torch.Tensor:
    rows = torch.zeros(grad.shape[0], dtype=torch.bool)
    rows[grad._indices()[0]] = True
    return rows


def assert_lazy(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer,
                keys: Sequence[str]) -> None:
    """One step changes nothing outside the rows of ``param.grad`` (bitwise)."""
    assert param.grad is not None
    untouched = ~touched_rows(param.grad)
    assert untouched.any()
    before = [param.detach().clone()] + [optimizer.state[param][k].clone() for k in keys]
    optimizer.step()
    after = [param.detach()] + [optimizer.state[param][k] for k in keys]
    for name, old, new in zip(["param", *keys], before, after, strict=True):
        assert torch.equal(old[untouched], new[untouched]), f"{name}: an untouched row changed"
        assert not torch.equal(old[~untouched], new[~untouched]), f"{name}: nothing changed"


GRID: list[dict[str, Any]] = [
    {},
    {"lr": 0.1, "lr_decay": 0.01},
    {"initial_accumulator_value": 0.5, "eps": 1e-3},
    {"maximize": True, "lr": 0.05, "lr_decay": 0.003, "initial_accumulator_value": 0.1},
]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("config", GRID, ids=config_ids(GRID))
def test_sparse_step_equals_torch_over_300_zipf_steps(config: dict[str, Any], impl: str) -> None:
    ours, opt, theirs, ref = sparse_lockstep(lambda ps: go.Adagrad(ps, impl=impl, **config),
                                             lambda ps: torch.optim.Adagrad(ps, **config))
    assert_close(ours, theirs, 1e-12)
    assert_state_close(opt, ref, ours, theirs, ["sum", "step"], 1e-12)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_groups_with_their_own_hyperparameters_equal_torch(impl: str) -> None:
    def groups(ps: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.3, "lr_decay": 0.02}]

    ours, opt, theirs, ref = sparse_lockstep(lambda ps: go.Adagrad(groups(ps), impl=impl),
                                             lambda ps: torch.optim.Adagrad(groups(ps)), 50)
    assert_close(ours, theirs, 1e-12)
    assert_state_close(opt, ref, ours, theirs, ["sum"], 1e-12)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_untouched_rows_are_bit_identical(impl: str) -> None:
    params = make_tables()
    opt = go.Adagrad(params, lr=0.1, initial_accumulator_value=0.2, impl=impl)
    stream = ZipfLookups(gaps=False)
    for t in range(4):
        params[0].grad = stream.grad(0, t)
        assert_lazy(params[0], opt, ["sum"])


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kernel_equals_torch_ops(dtype: torch.dtype, tol: float) -> None:
    config = {"lr": 0.05, "lr_decay": 0.01, "maximize": True, "initial_accumulator_value": 0.1}
    ours, opt, ref, ref_opt = sparse_lockstep(
        lambda ps: go.Adagrad(ps, impl="auto", **config),
        lambda ps: go.Adagrad(ps, impl="reference", **config), 100, dtype=dtype)
    assert_close(ours, ref, tol)
    assert_state_close(opt, ref_opt, ours, ref, ["sum"], tol)


@needs_kernels
@pytest.mark.parametrize("team", ["openmp", "pool"])
def test_kernel_runs_on_several_threads_like_one(team: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # "openmp": torch's own OpenMP team (GOMP_parallel); "pool": the fallback where torch
    # has no OpenMP. The result is bit for bit the one-thread result either way
    if team == "pool":
        monkeypatch.setattr(_sparse, "omp_parallel", lambda: None)
    elif _sparse.omp_parallel() is None:
        pytest.skip("torch runs without an OpenMP runtime here")

    def run(threads: int) -> list[torch.nn.Parameter]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ours, _, ref, _ = sparse_lockstep(lambda ps: go.Adagrad(ps, impl="auto"),
                                              lambda ps: go.Adagrad(ps, impl="reference"), 30)
        finally:
            torch.set_num_threads(before)
        assert_close(ours, ref, 1e-12)
        return ours

    monkeypatch.setattr(_sparse, "ROWS_PER_THREAD", 4)  # 48 lookups: 3 threads
    one, three = run(1), run(3)
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))


@needs_kernels
@pytest.mark.parametrize("team", ["openmp", "pool"])
def test_kernel_refuses_the_first_out_of_range_row_on_several_threads(
        team: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel's own check (the optimizers check the ids before a step; the kernel
    # checks again, so that it never writes outside a table): the threads check the ids
    # slice by slice, together; the error names the first bad lookup's row (not the
    # first one a thread happened to meet) and nothing is written
    if team == "pool":
        monkeypatch.setattr(_sparse, "omp_parallel", lambda: None)
    monkeypatch.setattr(_sparse, "ROWS_PER_THREAD", 100)
    monkeypatch.setattr(_sparse, "LOOKUPS_PER_SLICE", 64)  # 12 slices of 250 lookups
    rows = 1_000
    ids = torch.randint(0, rows, (3_000,), generator=torch.Generator().manual_seed(0))
    ids[2_900], ids[1_234], ids[2_000] = -3, rows + 7, rows  # the first is lookup 1,234
    table = torch.randn(rows, 4, dtype=torch.float64)
    sums = torch.full((rows, 4), 0.5, dtype=torch.float64)
    counts = torch.zeros(rows, dtype=torch.int64)
    before = table.clone()
    grad = _sparse.RowGrad(ids, torch.ones(3_000, 4, dtype=torch.float64), rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(IndexError, match=f"row {rows + 7} is out of range for {rows} rows"):
            _sparse.kernel_update("adagrad", grad, [table, sums], [-0.1, 1e-10, 1.0], counts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(table, before)
    assert torch.equal(sums, torch.full((rows, 4), 0.5, dtype=torch.float64))
    assert not counts.any()


@needs_kernels
def test_kernel_follows_state_replaced_by_load_state_dict() -> None:
    # a step's frame is kept per set of tables (by address): state loaded into new
    # tensors must be what the next steps update
    ours, opt, ref, ref_opt = sparse_lockstep(lambda ps: go.Adagrad(ps, impl="auto"),
                                              lambda ps: go.Adagrad(ps, impl="reference"), 10)
    saved = copy.deepcopy(ref_opt.state_dict())
    opt.load_state_dict(saved)
    ref_opt.load_state_dict(saved)
    step_pair(ours, ref, lambda _: opt, lambda _: ref_opt, lambda _: ZipfLookups(seed=5), 10)
    assert_state_close(opt, ref_opt, ours, ref, ["sum"], 1e-12)
    assert_close(ours, ref, 1e-12)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()
                         and _sparse.kernels_installed()),
                    reason="needs Linux, torch with OpenMP and the compiled kernels")
def test_kernels_find_torchs_openmp_team() -> None:
    # the steps run on torch's OpenMP threads (no extra threads competing for the cores);
    # a silent fall back to the thread pool would show in speed only
    assert _sparse.omp_parallel() is not None


@needs_kernels
@pytest.mark.parametrize("rows,lookups", [(1, 5), (2, 7), (300_000, 500), (5_000, 3_000)])
def test_kernel_groups_any_table_size_like_torch_ops(rows: int, lookups: int) -> None:
    # the kernels split the lookups into row ranges and radix-sort each by row, in
    # digits of at most 11 bits and narrower for tasks of few lookups (no pass for a
    # 2-row table, two for 5,000 rows, three for 300,000); one row looked up 200 times
    # and runs of neighbouring rows included
    gen = torch.Generator().manual_seed(rows)
    ids = torch.cat([torch.randint(0, rows, (lookups,), generator=gen),
                     torch.full((200,), rows // 2), torch.arange(min(rows, 50))])
    values = torch.randn(ids.numel(), 3, generator=gen, dtype=torch.float64)
    start = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    tables = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    for table in tables:
        table.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (rows, 3))
    go.Adagrad([tables[0]], lr=0.1, impl="auto").step()
    go.Adagrad([tables[1]], lr=0.1, impl="reference").step()
    assert rel_err(tables[0], tables[1]) <= 1e-15


@needs_kernels
def test_kernel_frame_fields_are_in_the_order_kernel_update_writes_them() -> None:
    module = _sparse.kernels()
    names = ["KERNEL", "NUM_ROWS", "WIDTH", "STATE_WIDTH", "TABLE0", "TABLE1", "TABLE2",
             "FLOATS", "CLAIMS", "COUNTS", "NUM_COUNTS", "VALUES", "LOOKUPS", "IDS",
             "NUM_PARTS", "SHIFT", "SLICES", "MODE", "PARTS", "PART_ORDER", "TASK_ORDER",
             "SLICE_HIST", "SCRATCH", "HIST", "SLOTS", "STRIDE"]
    assert [getattr(module, n) for n in names] == list(range(module.FRAME_SIZE))


def test_task_split_keeps_sort_keys_in_64_bits() -> None:
    # tasks are row ranges of 2**shift rows; the row's low `shift` bits and the lookup's
    # 32 bits share one int64 sort key
    for num_rows in (1, 2, 97, 2_000_000, 1 << 40):
        for threads in (1, 2, 16):
            bits, shift = _sparse._task_bits(num_rows, threads)
            assert shift <= 31 and (num_rows - 1) >> shift < 1 << bits
            assert bits == 0 or 1 << bits >= min(num_rows, 8 * threads)


def test_embedding_modules_sparse_gradients_equal_torch() -> None:
    def run(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> list[Any]:
        torch.manual_seed(0)
        emb = torch.nn.Embedding(50, 4, sparse=True, dtype=torch.float64)
        bag = torch.nn.EmbeddingBag(30, 4, mode="sum", sparse=True, dtype=torch.float64)
        head = torch.nn.Linear(4, 1, dtype=torch.float64)
        # one group of sparse and dense gradients, as torch.optim.Adagrad allows
        opt = make([*emb.parameters(), *bag.parameters(), *head.parameters()])
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            ids = torch.randint(0, 50, (16, 3), generator=gen)
            bags = torch.randint(0, 30, (16, 5), generator=gen)
            loss = head(emb(ids).sum(1) + bag(bags)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [emb.weight, bag.weight, head.weight, head.bias]

    ours = run(lambda ps: go.Adagrad(ps, lr=0.1))
    theirs = run(lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    assert_close(ours, theirs, 1e-12)


def test_several_sparse_dims_equal_torch() -> None:
    # a COO gradient over both dims of a matrix (single coordinates, not rows)
    def grad(t: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(t)
        idx = torch.stack([torch.randint(0, 7, (10,), generator=gen),
                           torch.randint(0, 5, (10,), generator=gen)])
        return torch.sparse_coo_tensor(idx, torch.randn(10, generator=gen, dtype=torch.float64),
                                       (7, 5), check_invariants=True)

    a = torch.nn.Parameter(torch.ones(7, 5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(7, 5, dtype=torch.float64))
    ours, theirs = go.Adagrad([a], lr=0.1), torch.optim.Adagrad([b], lr=0.1)
    for t in range(20):
        a.grad, b.grad = grad(t), grad(t)
        ours.step()
        theirs.step()
    assert rel_err(a, b) <= 1e-12


def test_coupled_weight_decay_with_a_sparse_gradient_is_refused_naming_it() -> None:
    params = make_tables()
    opt = go.Adagrad([{"params": params[1:], "weight_decay": 0.1}, {"params": params[:1]}])
    ZipfLookups().apply(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"weight_decay=0\.1 cannot be applied lazily to the "
                                           r"sparse gradient of parameter 0 of param group 0 "
                                           r"\(shape \(40, 3\)\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


def test_out_of_range_row_is_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))
    for impl in ("reference", "auto"):
        opt = go.Adagrad([p], impl=impl)
        p.grad = torch.sparse_coo_tensor([[1, 4]], torch.ones(2, 2, dtype=torch.float64), (4, 2),
                                         check_invariants=False)
        with pytest.raises(IndexError, match="row 4 is out of range for 4 rows"):
            opt.step()
    assert torch.equal(p, torch.zeros(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_row_update_counts_when_the_group_asks(impl: str) -> None:
    params = make_tables()
    opt = go.Adagrad([{"params": params[:1], "count_row_updates": True},
                      {"params": params[1:]}], impl=impl)
    stream = ZipfLookups()
    expected = torch.zeros(TABLES[0][0], dtype=torch.int64)
    for t in range(30):
        stream.apply(params, t)
        grad = params[0].grad
        if grad is not None:
            expected += touched_rows(grad)
        opt.step()
    assert torch.equal(opt.state[params[0]]["row_update_count"], expected)
    assert "row_update_count" not in opt.state[params[1]]  # off by default
    params[0].grad = torch.ones_like(params[0])  # a dense gradient updates every row
    opt.step()
    assert torch.equal(opt.state[params[0]]["row_update_count"], expected + 1)


def test_count_row_updates_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="count_row_updates"):
        go.Adagrad([{"params": make_tables()[:1], "count_row_updates": "yes"}])


def test_bfloat16_table_keeps_float32_sum_and_updates_only_its_rows() -> None:
    table = torch.nn.Parameter(torch.randn(30, 4).to(torch.bfloat16))
    opt = go.Adagrad([table], lr=0.1)
    ids = torch.tensor([[3, 7, 3]])
    table.grad = torch.sparse_coo_tensor(ids, torch.ones(3, 4, dtype=torch.bfloat16), (30, 4),
                                         check_invariants=True)
    before = table.detach().clone()
    opt.step()
    state_sum = opt.state[table]["sum"]
    assert state_sum.dtype == torch.float32 and table.dtype == torch.bfloat16
    assert torch.equal(state_sum[3], torch.full((4,), 4.0))
    assert torch.equal(state_sum[7], torch.full((4,), 1.0))
    expected_3 = (before[3].float() - 0.1 * 2 / (2 + 1e-10)).to(torch.bfloat16)
    assert torch.equal(table[3], expected_3)
    others = torch.ones(30, dtype=torch.bool)
    others[[3, 7]] = False
    assert torch.equal(table[others], before[others])


def test_grad_scale_divides_and_found_inf_skips_sparse_gradients() -> None:
    stream = ZipfLookups()
    a, b = make_tables(), make_tables()
    opt_a, opt_b = go.Adagrad(a, lr=0.1), go.Adagrad(b, lr=0.1)
    for t in range(5):
        stream.apply(a, t)
        stream.apply(b, t)
        for p in b:
            if p.grad is not None:
                p.grad = p.grad * 4.0
        opt_a.step()
        opt_b.step(grad_scale=torch.tensor(4.0))
    assert_close(a, b, 1e-15)
    stream.apply(b, 5)
    before = [p.detach().clone() for p in b]
    opt_b.step(found_inf=torch.tensor(1.0))
    assert all(torch.equal(p, q) for p, q in zip(b, before, strict=True))
