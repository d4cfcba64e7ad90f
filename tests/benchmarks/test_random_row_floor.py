"""The random-row floor of benchmarks/embedding_step.py touches exactly the bytes a sparse
step must touch: every distinct row of table and state, read and written once, every values
row read once, and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gradguard.optim import _sparse

pytestmark = pytest.mark.skipif(not _sparse.kernels_installed(), reason="needs numba")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import random_row_floor  # noqa: E402


def problem(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Four tables of different shapes; ids with duplicates and a run of neighbours; a
    table with no lookups between tables with some; lookups not a multiple of the chunk
    size."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5_000, 7), (300, 64), (40, 3), (60, 5)]
    tables = [torch.randn(rows, dim, generator=gen) for rows, dim in shapes]
    ids = [torch.cat([torch.randint(0, 5_000, (1_000,), generator=gen), torch.full((200,), 17),
                      torch.arange(100, 260)]),
           torch.randint(0, 300, (130,), generator=gen),
           torch.empty(0, dtype=torch.int64),
           torch.randint(0, 60, (90,), generator=gen)]
    values = [torch.randn(i.numel(), t.shape[1], generator=gen)
              for i, t in zip(ids, tables, strict=True)]
    return tables, ids, values


@pytest.mark.parametrize("threads,use_team,row_wise", [(1, True, False), (2, True, False),
                                                      (3, False, False), (2, True, True)])
def test_floor_touches_each_distinct_row_once_and_reads_every_value(
        threads: int, use_team: bool, row_wise: bool) -> None:
    tables, ids, values = problem()
    before = [t.clone() for t in tables]
    floor = random_row_floor.Floor(tables, threads=threads, row_wise=row_wise,
                                   use_team=use_team)
    # Adagrad's state: one value per element; RowWiseAdagrad's: one per row
    assert [s.shape for s in floor.states] == [(t.shape[0], 1 if row_wise else t.shape[1])
                                               for t in tables]
    plan = floor.plan(ids, values)
    for passes in (1, 2):
        assert floor.run(plan) > 0
        for table, old, state, table_ids in zip(tables, before, floor.states, ids, strict=True):
            touched = torch.zeros(table.shape[0], dtype=torch.bool)
            touched[table_ids] = True
            # state: +1 per pass on the touched rows, untouched rows still 0
            assert torch.equal(state[touched], torch.full_like(state[touched], passes))
            assert not state[~touched].any()
            # table: bit-identical outside the touched rows, changed on every one of them
            assert torch.equal(table[~touched], old[~touched])
            assert (table[touched] != old[touched]).all()
        # each values row read once (summed in float64, in chunks of rows)
        expected = sum(v.double().sum() for v in values)
        assert float(floor.sink.sum()) == pytest.approx(float(expected), rel=1e-9)


def test_floor_refuses_what_it_cannot_measure() -> None:
    tables, ids, values = problem()
    floor = random_row_floor.Floor(tables, threads=1)
    with pytest.raises(IndexError, match="out of range for 300 rows"):
        floor.plan([ids[0], torch.tensor([300]), *ids[2:]], [values[0], values[1][:1], *values[2:]])
    with pytest.raises(ValueError, match=r"expected \(130, 64\)"):
        floor.plan(ids, [values[0], values[1][:, :3], *values[2:]])
    with pytest.raises(ValueError, match="one ids and one values tensor per table"):
        floor.plan(ids[:2], values[:2])
    with pytest.raises(ValueError, match="float32 tables"):
        random_row_floor.Floor([torch.zeros(4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one table"):
        random_row_floor.Floor([])
