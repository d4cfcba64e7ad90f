"""Retention: keep_last, keep_every, keep_best; the newest checkpoint is never deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradguard.ckpt import Checkpointer, KeepBest
from gradguard.ckpt.checkpointer import KeepBestSpec
from tests.ckpt.helpers import tiny_model


def save_steps(ckpt: Checkpointer, losses: dict[int, float]) -> None:
    model = tiny_model()
    for step, loss in losses.items():
        ckpt.save(step, model=model, metrics={"loss": loss})


def test_keep_last_keeps_the_newest_ones(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    save_steps(ckpt, {s: 1.0 for s in range(1, 6)})
    assert ckpt.steps() == [4, 5]


def test_keep_every_also_keeps_multiples(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1, keep_every=2)
    save_steps(ckpt, {s: 1.0 for s in range(0, 6)})
    assert ckpt.steps() == [0, 2, 4, 5]


@pytest.mark.parametrize(("spec", "kept"), [
    (KeepBest("loss", "min", 2), [2, 4, 6]),
    (("loss", "max"), [5, 6]),
    ("loss", [4, 6]),
], ids=["min-2", "max-tuple", "name-only"])
def test_keep_best_keeps_the_best_by_a_metric(spec: KeepBestSpec, kept: list[int],
                                              tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1, keep_best=spec)
    save_steps(ckpt, {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.1, 5: 2.0, 6: 0.7})
    assert ckpt.steps() == kept


def test_checkpoints_without_the_metric_or_with_nan_are_never_best(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=None, keep_best=("loss", "min", 1))
    model = tiny_model()
    ckpt.save(1, model=model, metrics={"loss": float("nan")})
    ckpt.save(2, model=model)
    ckpt.save(3, model=model, metrics={"loss": 0.5})
    ckpt.save(4, model=model, metrics={"loss": 0.9})
    assert ckpt.steps() == [3, 4]


def test_the_newest_is_kept_even_when_no_rule_keeps_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=None, keep_every=10, keep_best=("loss", "min"))
    save_steps(ckpt, {10: 0.1, 11: 0.5, 12: 0.9})
    assert ckpt.steps() == [10, 12]


def test_without_rules_nothing_is_deleted(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=None)
    save_steps(ckpt, {s: 1.0 for s in range(5)})
    assert ckpt.steps() == [0, 1, 2, 3, 4]
