"""A step's sparse tables run as one batch of compiled steps (``_sparse.batch``).

An optimizer queues each table's compiled step and runs them all in one parallel
region at the end of ``step()``: tables too small for a thread each run side by
side, a large one on several threads. The result is each table's own step, as
the torch-ops path computes it, whatever the threads. Inside the kernels a bad
id in one table stops that table's step only (the optimizers refuse such a step
before it starts: test_sparse_ids.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import gradguard.optim as go
from gradguard.optim import _sparse
from gradguard.optim.ftrl import FTRL
from gradguard.optim.rowwise import RowWiseAdagrad
from tests.optim.test_sparse_adagrad import (
    ZipfLookups,
    assert_close,
    make_tables,
    needs_kernels,
    one_thread,  # noqa: F401 (autouse fixture)
)

pytestmark = [pytest.mark.filterwarnings("ignore:Sparse invariant checks"), needs_kernels]

# (rows, dim): one row, tiny, small and larger tables, dims from 1 to 9
MANY_TABLES = ((1, 2), (3, 1), (40, 3), (97, 6), (500, 4), (2_000, 9), (5_000, 2), (64, 5))
LOOKUPS = 300

Factory = Callable[[list[torch.nn.Parameter], str], torch.optim.Optimizer]
ALGORITHMS: dict[str, tuple[Factory, list[str]]] = {
    "adagrad": (lambda ps, impl: go.Adagrad(ps, lr=0.1, lr_decay=0.01,
                                            initial_accumulator_value=0.1, impl=impl), ["sum"]),
    "sparse_adam": (lambda ps, impl: go.SparseAdam(ps, lr=0.01, impl=impl),
                    ["exp_avg", "exp_avg_sq"]),
    "ftrl": (lambda ps, impl: FTRL(ps, lr=0.1, l1=0.01, l2=0.1, impl=impl), ["z", "n"]),
    "rowwise_adagrad": (lambda ps, impl: RowWiseAdagrad(ps, lr=0.1, weight_decay=0.01,
                                                        impl=impl), ["sum"]),
}


@pytest.fixture(params=["openmp", "pool"])
def team(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """torch's OpenMP team (GOMP_parallel), or the thread pool used without one."""
    if request.param == "pool":
        monkeypatch.setattr(_sparse, "omp_parallel", lambda: None)
    elif _sparse.omp_parallel() is None:
        pytest.skip("torch runs without an OpenMP runtime here")
    yield request.param


def threads(count: int) -> Callable[[], None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    return lambda: torch.set_num_threads(before)


def run_steps(make: Factory, impl: str, steps: int, count: int = 1,
              dtype: torch.dtype = torch.float64,
              ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = make_tables(seed=3, dtype=dtype, tables=MANY_TABLES)
    optimizer = make(params, impl)
    stream = ZipfLookups(MANY_TABLES, seed=3, lookups=LOOKUPS, dtype=dtype)
    restore = threads(count)
    try:
        for t in range(steps):
            stream.apply(params, t)
            optimizer.step()
    finally:
        restore()
    return params, optimizer


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_many_tables_in_one_step_equal_the_torch_ops_on_any_threads(
        name: str, team: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 tables of 300 lookups (some steps with empty gradients or none); with one
    # thread per 128 lookups each table is given up to 2 of the 3 threads, and the
    # tables share the threads of the step
    monkeypatch.setattr(_sparse, "ROWS_PER_THREAD", 128)
    make, keys = ALGORITHMS[name]
    ref, ref_opt = run_steps(make, "reference", 20)
    one, one_opt = run_steps(make, "auto", 20, count=1)
    three, three_opt = run_steps(make, "auto", 20, count=3)
    tol = 1e-12 if name != "rowwise_adagrad" else 1e-11  # the mean square sums in another order
    assert_close(one, ref, tol)
    for key in keys:
        assert_close([one_opt.state[p][key] for p in one],
                     [ref_opt.state[p][key] for p in ref], tol, f"state {key!r} of")
    # the threads change nothing: each row is summed and updated by one thread, in order
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))
    for key in keys:
        assert all(torch.equal(one_opt.state[a][key], three_opt.state[b][key])
                   for a, b in zip(one, three, strict=True))


def test_optimizers_stepping_from_two_python_threads_each_get_their_own_steps(
        team: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the threads' scratch and the team's batch list serve one batch at a time: two
    # optimizers stepping their own tables from two Python threads at once (the
    # parallel region releases the GIL, so the other thread queues its tables then)
    # get what each gets alone, bit for bit
    monkeypatch.setattr(_sparse, "ROWS_PER_THREAD", 128)
    names = ["adagrad", "sparse_adam", "ftrl", "rowwise_adagrad"]
    alone = {name: run_steps(ALGORITHMS[name][0], "auto", 20)[0] for name in names}
    together: dict[str, list[torch.nn.Parameter]] = {}
    errors: list[BaseException] = []

    def train(name: str) -> None:
        try:
            params = make_tables(seed=3, dtype=torch.float64, tables=MANY_TABLES)
            optimizer = ALGORITHMS[name][0](params, "auto")
            stream = ZipfLookups(MANY_TABLES, seed=3, lookups=LOOKUPS, dtype=torch.float64)
            for t in range(20):
                stream.apply(params, t)
                optimizer.step()
            together[name] = params
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    workers = [threading.Thread(target=train, args=(name,)) for name in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    for name in names:
        assert all(torch.equal(a, b) for a, b in zip(together[name], alone[name], strict=True))


def test_float32_and_float64_tables_in_one_step(team: str) -> None:
    # one batch per dtype (the compiled code is typed by the tables' dtype)
    def mixed(seed: int) -> list[torch.nn.Parameter]:
        tables = make_tables(seed=seed, tables=MANY_TABLES[2:6])
        return [torch.nn.Parameter(p.detach().float()) if i % 2 else p
                for i, p in enumerate(tables)]

    ours, ref = mixed(1), mixed(1)
    opt = go.Adagrad(ours, lr=0.1)
    ref_opt = go.Adagrad(ref, lr=0.1, impl="reference")
    stream = ZipfLookups(MANY_TABLES[2:6], seed=1, lookups=LOOKUPS, gaps=False)
    restore = threads(2)
    try:
        for t in range(10):
            for params, optimizer in ((ours, opt), (ref, ref_opt)):
                for i, p in enumerate(params):
                    grad = stream.grad(i, t)
                    assert grad is not None
                    p.grad = grad.to(p.dtype)
                optimizer.step()
    finally:
        restore()
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= (1e-5 if a.dtype == torch.float32 else 1e-12)


def test_a_bad_id_in_a_batch_stops_its_own_table(team: str) -> None:
    # the kernel's check, under the optimizers' (which refuse the whole step first): a
    # table with a bad id is left as it was, the batch's other tables take their step
    tables = make_tables(seed=2, tables=MANY_TABLES[2:5])
    sums = [torch.full_like(t, 0.5).detach() for t in tables]
    ref = [t.detach().clone() for t in tables]
    ref_sums = [s.clone() for s in sums]
    gen = torch.Generator().manual_seed(2)
    grads = [_sparse.RowGrad(torch.randint(0, rows, (LOOKUPS,), generator=gen),
                             torch.randn(LOOKUPS, dim, generator=gen, dtype=torch.float64), rows)
             for rows, dim in MANY_TABLES[2:5]]
    rows = MANY_TABLES[3][0]
    bad = grads[1].rows.clone()
    bad[17] = rows + 4
    grads[1] = grads[1]._replace(rows=bad)
    for i in (0, 2):
        _sparse.kernel_update("adagrad", grads[i], [ref[i], ref_sums[i]], [-0.1, 1e-10, 1.0],
                              None)
    before = tables[1].detach().clone()
    restore = threads(2)
    try:
        with (pytest.raises(IndexError, match=f"row {rows + 4} is out of range for {rows} "
                                              "rows"),
              _sparse.batch()):
            for table, state, grad in zip(tables, sums, grads, strict=True):
                _sparse.kernel_update("adagrad", grad, [table.detach(), state],
                                      [-0.1, 1e-10, 1.0], None)
    finally:
        restore()
    assert torch.equal(tables[1], before)
    assert torch.equal(sums[1], torch.full_like(before, 0.5))
    for i in (0, 2):
        assert torch.equal(tables[i].detach(), ref[i]) and torch.equal(sums[i], ref_sums[i])


def test_the_same_tables_twice_in_a_batch_step_one_after_the_other() -> None:
    # a batch runs the steps queued so far before it queues the same tables again
    table = make_tables(seed=4, tables=[(200, 3)])[0].detach()
    sums = torch.full_like(table, 0.1)
    twice = [table.clone(), sums.clone()]
    gen = torch.Generator().manual_seed(4)
    grads = [_sparse.RowGrad(torch.randint(0, 200, (500,), generator=gen),
                             torch.randn(500, 3, generator=gen, dtype=torch.float64), 200)
             for _ in range(2)]
    for grad in grads:
        _sparse.kernel_update("adagrad", grad, [table, sums], [-0.1, 1e-10, 1.0], None)
    with _sparse.batch():
        for grad in grads:
            _sparse.kernel_update("adagrad", grad, twice, [-0.1, 1e-10, 1.0], None)
    assert torch.equal(twice[0], table)
    assert torch.equal(twice[1], sums)


def test_a_batch_block_that_raises_still_runs_its_queued_steps() -> None:
    # as the steps would have run one by one before the error
    table = make_tables(seed=5, tables=[(50, 2)])[0].detach()
    sums = torch.zeros_like(table)
    grad = _sparse.RowGrad(torch.tensor([3, 7, 3]), torch.ones(3, 2, dtype=torch.float64), 50)
    before = table.clone()
    with pytest.raises(RuntimeError, match="after the first table"), _sparse.batch():
        _sparse.kernel_update("adagrad", grad, [table, sums], [-0.1, 1e-10, 1.0], None)
        assert torch.equal(table, before)  # queued, not run yet
        raise RuntimeError("after the first table")
    changed = (table != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 7]
    assert sums[3].tolist() == [4.0, 4.0]


def test_frames_are_kept_per_table_set_least_recently_used_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a step's frame (its fields, counters and shared buffers) is made once per set of
    # tables: a model with many tables must not make them anew every step
    monkeypatch.setattr(_sparse, "_FRAMES", type(_sparse._FRAMES)())
    monkeypatch.setattr(_sparse, "MAX_FRAMES", 3)
    tables = [torch.zeros(30, 2, dtype=torch.float64) for _ in range(4)]
    sums = [torch.zeros(30, 2, dtype=torch.float64) for _ in range(4)]
    grad = _sparse.RowGrad(torch.tensor([1, 2, 2]), torch.ones(3, 2, dtype=torch.float64), 30)

    def step(i: int) -> Any:
        _sparse.kernel_update("adagrad", grad, [tables[i], sums[i]], [-0.1, 1e-10, 1.0], None)
        return next(reversed(_sparse._FRAMES.values()))  # the frame just used

    first = [step(i) for i in range(3)]
    assert step(0) is first[0]  # kept, and now the most recently used
    step(3)  # evicts table 1's frame, the least recently used
    assert step(0) is first[0] and step(2) is first[2]
    assert step(1) is not first[1]
    assert sums[0][2].tolist() == [12.0, 12.0]  # three steps of 2 lookups of row 2: 3 * 2**2


def queued(monkeypatch: pytest.MonkeyPatch, step: Callable[[], Any]) -> list[Any]:
    """The compiled steps ``step`` queues in a batch (not run)."""
    steps: list[Any] = []
    with monkeypatch.context() as patch:
        patch.setattr(_sparse, "_run_steps", steps.extend)
        with _sparse.batch():
            step()
    return steps


@pytest.mark.parametrize("case", ["embedding", "reference", "float16", "strided", "state_dtype",
                                  "state_strided", "three_dims"])
def test_the_embedding_fast_path_takes_exactly_the_tables_the_kernels_take(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # table_step (an embedding gradient, little Python per table) must queue a step
    # where the general path (row_grad, use_kernel, kernel_update) would run the
    # kernel, and do nothing elsewhere: the caller then takes the general path
    shape = (50, 2, 2) if case == "three_dims" else (50, 4)
    dtype = torch.float16 if case == "float16" else torch.float32
    param = torch.zeros(4, 50).t() if case == "strided" else torch.zeros(shape, dtype=dtype)
    state = (torch.zeros(50, 8)[:, ::2] if case == "state_strided" else
             torch.zeros(shape, dtype=torch.float64 if case == "state_dtype" else dtype))
    ids = torch.tensor([[3, 7, 3]])
    grad = torch.sparse_coo_tensor(ids, torch.ones(3, *param.shape[1:], dtype=param.dtype),
                                   param.shape)
    group = {"impl": "reference" if case == "reference" else "auto"}
    scalars = [-0.1, 1e-10, 1.0]
    fast: list[bool] = []
    steps = queued(monkeypatch, lambda: fast.append(
        _sparse.table_step("adagrad", group, param, grad, [state], scalars, None)))
    rows = _sparse.row_grad(param, grad)
    general = _sparse.use_kernel(group, _sparse.rows_of(param, rows.num_rows),
                                 _sparse.rows_of(state, rows.num_rows))
    assert fast == [case == "embedding"] and len(steps) == fast.count(True)
    assert general == (case in ("embedding", "three_dims"))  # a 3-D table: the general path


def test_the_embedding_fast_path_steps_as_the_general_path_does() -> None:
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(300, 5, dtype=torch.float64, generator=gen)
    tables = [start.clone() for _ in range(2)]
    sums = [torch.full((300, 5), 0.1, dtype=torch.float64) for _ in range(2)]
    counts = [torch.zeros(300, dtype=torch.int64) for _ in range(2)]
    for _ in range(3):
        ids = torch.randint(0, 300, (1, 700), generator=gen)
        grad = torch.sparse_coo_tensor(ids, torch.randn(700, 5, dtype=torch.float64,
                                                        generator=gen), (300, 5))
        assert _sparse.table_step("adagrad", {"impl": "auto"}, tables[0], grad, [sums[0]],
                                  [-0.1, 1e-10, 1.0], counts[0])
        _sparse.kernel_update("adagrad", _sparse.row_grad(tables[1], grad),
                              [tables[1], sums[1]], [-0.1, 1e-10, 1.0], counts[1])
    for pair in (tables, sums, counts):
        assert torch.equal(pair[0], pair[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_advancing_a_step_counter_equals_adding_one(dtype: torch.dtype) -> None:
    # on the CPU a step counter is written as fill_(item + 1): the same number as += 1,
    # also where float32 stops counting (2**24 + 1 rounds to 2**24)
    for start in (0, 1, 2**24 - 1, 2**24, 2**24 + 2, 2**53 - 1):
        step = torch.tensor(start, dtype=dtype)
        reference = step.clone()
        _sparse.advance(step)
        reference += 1
        assert step.dtype == dtype and torch.equal(step, reference), start


def test_a_frame_lays_out_its_steps_again_when_the_threads_or_tuning_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the task split is kept per frame for the last step's lookups, threads and tuning
    table, sums = torch.zeros(1_000, 2), torch.zeros(1_000, 2)
    ids = torch.arange(1_000).repeat(4).unsqueeze(0)
    grad = torch.sparse_coo_tensor(ids, torch.ones(4_000, 2), (1_000, 2))

    def threads_given() -> int:
        steps = queued(monkeypatch, lambda: _sparse.table_step(
            "adagrad", {"impl": "auto"}, table, grad, [sums], [-0.1, 1e-10, 1.0], None))
        return int(steps[0].threads)

    restore = threads(4)
    try:
        assert threads_given() == 1  # 4,000 lookups: one thread per 2,048 rounds down to 1
        monkeypatch.setattr(_sparse, "ROWS_PER_THREAD", 1_000)
        assert threads_given() == 4
        torch.set_num_threads(2)
        assert threads_given() == 2
    finally:
        restore()
