"""Hybrid: several optimizers behave as one torch.optim.Optimizer."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn

import gradguard.optim as go
from gradguard.optim.hybrid import Hybrid, split_parameters
from gradguard.optim.rowwise import RowWiseAdagrad
from tests.optim.test_sparse_adagrad import one_thread  # noqa: F401 (autouse fixture)


class Recommender(nn.Module):
    """Two sparse embedding tables, a dense tower, a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(50, 4, sparse=True, dtype=torch.float64)
        self.items = nn.EmbeddingBag(30, 4, mode="sum", sparse=True, dtype=torch.float64)
        self.tower = nn.Sequential(nn.Linear(8, 6, dtype=torch.float64), nn.ReLU(),
                                   nn.Linear(6, 1, dtype=torch.float64))
        self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64),
                                        requires_grad=False)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.users(users), self.items(items)], dim=1)
        return self.tower(x).squeeze(1) / self.temperature


def make_model(seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    return Recommender()


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(t)
    users = torch.randint(0, 50, (16,), generator=gen)
    items = torch.randint(0, 30, (16, 3), generator=gen)
    return users, items, torch.randn(16, generator=gen, dtype=torch.float64)


def train(model: Recommender, optimizer: torch.optim.Optimizer, steps: int, start: int = 0,
          scheduler: Any = None) -> None:
    for t in range(start, start + steps):
        users, items, target = batch(t)
        optimizer.zero_grad()
        (model(users, items) - target).pow(2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def make_hybrid(model: Recommender) -> Hybrid:
    embeddings, dense = split_parameters(model)
    return Hybrid({"embeddings": RowWiseAdagrad(embeddings, lr=0.05),
                   "dense": go.AdamW(dense, lr=1e-2)})


def test_split_parameters_finds_the_embedding_tables() -> None:
    model = make_model()
    embeddings, dense = split_parameters(model)
    assert embeddings == [model.users.weight, model.items.weight]
    assert dense == list(model.tower.parameters())  # the frozen parameter is left out


def test_tied_embedding_weight_counts_once_as_an_embedding() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    embeddings, dense = split_parameters(model)
    assert embeddings == [model[0].weight] and dense == []


def test_steps_equal_the_inner_optimizers_stepped_alone() -> None:
    model, alone = make_model(), make_model()
    train(model, make_hybrid(model), 20)
    embeddings, dense = split_parameters(alone)
    pair = [RowWiseAdagrad(embeddings, lr=0.05), go.AdamW(dense, lr=1e-2)]
    for t in range(20):
        users, items, target = batch(t)
        for opt in pair:
            opt.zero_grad()
        (alone(users, items) - target).pow(2).mean().backward()
        for opt in pair:
            opt.step()
    for a, b in zip(model.parameters(), alone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_round_trip_then_identical_steps() -> None:
    model = make_model()
    hybrid = make_hybrid(model)
    train(model, hybrid, 10)
    restored_model = make_model(seed=1)
    restored_model.load_state_dict(model.state_dict())
    restored = make_hybrid(restored_model)
    restored.load_state_dict(copy.deepcopy(hybrid.state_dict()))
    train(model, hybrid, 10, start=10)
    train(restored_model, restored, 10, start=10)
    for a, b in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert hybrid.state_dict()["optimizers"] == [["embeddings", 1], ["dense", 1]]


def test_state_dict_has_torchs_layout_numbered_across_optimizers() -> None:
    model = make_model()
    hybrid = make_hybrid(model)
    train(model, hybrid, 2)
    state = hybrid.state_dict()
    assert [g["params"] for g in state["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    assert set(state["state"]) == {0, 1, 2, 3, 4, 5}
    assert set(state["state"][0]) == {"step", "sum"}
    assert set(state["state"][2]) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_state_dict_of_other_optimizers_is_refused_naming_both_layouts() -> None:
    model = make_model()
    hybrid = make_hybrid(model)
    embeddings, dense = split_parameters(model)
    other = Hybrid({"dense": go.AdamW(dense), "embeddings": go.Adagrad(embeddings)})
    with pytest.raises(ValueError, match=r"\[\['embeddings', 1\], \['dense', 1\]\].*"
                                         r"\[\['dense', 1\], \['embeddings', 1\]\]"):
        other.load_state_dict(hybrid.state_dict())


def test_lr_scheduler_drives_every_group() -> None:
    model, alone = make_model(), make_model()
    hybrid = make_hybrid(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(hybrid, lambda epoch: 0.9**epoch)
    train(model, hybrid, 6, scheduler=scheduler)
    assert [g["lr"] for g in hybrid.param_groups] == pytest.approx([0.05 * 0.9**6,
                                                                     1e-2 * 0.9**6])
    # the same as scheduling each inner optimizer on its own
    embeddings, dense = split_parameters(alone)
    pair = [RowWiseAdagrad(embeddings, lr=0.05), go.AdamW(dense, lr=1e-2)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e) for o in pair]
    for t in range(6):
        users, items, target = batch(t)
        for opt in pair:
            opt.zero_grad()
        (alone(users, items) - target).pow(2).mean().backward()
        for opt, sched in zip(pair, schedulers, strict=True):
            opt.step()
            sched.step()
    for a, b in zip(model.parameters(), alone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_reduce_lr_on_plateau_cuts_every_group() -> None:
    hybrid = make_hybrid(make_model())
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(hybrid, patience=0, factor=0.5)
    for _ in range(3):
        plateau.step(1.0)
    assert [g["lr"] for g in hybrid.param_groups] == [0.05 / 4, 1e-2 / 4]


def test_overlapping_optimizers_are_refused_naming_the_parameter() -> None:
    embeddings = split_parameters(make_model()).embeddings
    with pytest.raises(ValueError, match=r"shape \(30, 4\) is in Hybrid optimizer 'embeddings' "
                                         r"\(param group 0, parameter 1\) and in 'dense' "
                                         r"\(param group 0, parameter 0\)"):
        Hybrid({"embeddings": go.Adagrad(embeddings), "dense": go.AdamW([embeddings[1]])})


def test_step_hooks_closure_and_zero_grad() -> None:
    model = make_model()
    hybrid = make_hybrid(model)
    calls: list[str] = []
    hybrid.register_step_pre_hook(lambda *_: calls.append("pre"))
    hybrid.register_step_post_hook(lambda *_: calls.append("post"))
    hybrid.optimizers["dense"].register_step_post_hook(lambda *_: calls.append("dense"))

    def closure() -> torch.Tensor:
        hybrid.zero_grad()
        users, items, target = batch(0)
        loss = (model(users, items) - target).pow(2).mean()
        loss.backward()
        return loss

    loss = hybrid.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert calls == ["pre", "dense", "post"]
    hybrid.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_hooks_run() -> None:
    hybrid = make_hybrid(make_model())
    seen: list[str] = []
    hybrid.register_state_dict_pre_hook(lambda opt: seen.append("save"))
    hybrid.register_load_state_dict_post_hook(lambda opt: seen.append("load"))
    hybrid.load_state_dict(hybrid.state_dict())
    assert seen == ["save", "load"]


def test_param_groups_and_state_are_the_inner_optimizers() -> None:
    model = make_model()
    hybrid = make_hybrid(model)
    train(model, hybrid, 1)
    inner = hybrid.optimizers
    assert hybrid.param_groups[0] is inner["embeddings"].param_groups[0]
    assert hybrid.state[model.users.weight] is inner["embeddings"].state[model.users.weight]
    late = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    hybrid.add_param_group({"params": [late], "optimizer": "dense", "lr": 0.5})
    assert hybrid.param_groups[-1]["lr"] == 0.5 and len(hybrid.param_groups) == 3
    with pytest.raises(ValueError, match="'optimizer' key"):
        hybrid.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="is in Hybrid optimizer"):
        hybrid.add_param_group({"params": [late], "optimizer": "embeddings"})


def test_grad_scaler_unscales_and_skips_steps_with_inf() -> None:
    model = make_model()
    model.float()
    hybrid = make_hybrid(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    users, items, _ = batch(0)
    scaler.scale(model(users, items).pow(2).mean()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    model.tower[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]
    scaler.step(hybrid)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    hybrid.zero_grad()
    scaler.scale(model(users, items).pow(2).mean()).backward()
    scaler.step(hybrid)
    scaler.update()
    assert not torch.equal(model.users.weight, before[0])


def test_pickle_and_deepcopy_keep_working_optimizers() -> None:
    model = make_model()
    hybrid = make_hybrid(model)
    train(model, hybrid, 2)
    for clone in (pickle.loads(pickle.dumps(hybrid)), copy.deepcopy(hybrid)):
        assert list(clone.optimizers) == ["embeddings", "dense"]
        assert len(clone.param_groups) == 2
        calls: list[int] = []
        clone.register_step_post_hook(lambda *_, calls=calls: calls.append(1))
        clone.step()
        assert calls == [1]


def test_empty_or_wrong_optimizers_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Hybrid({})
    with pytest.raises(ValueError, match="'dense' is a list"):
        Hybrid({"dense": []})  # type: ignore[dict-item]
