"""The pieces of gradguard.dist that need no second process (one rank, or none)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.dist import (
    DataParallel,
    DistEnv,
    DistributedConfigError,
    checksums,
    compare,
    consolidated_view,
    launched,
    setup,
    tensor_checksum,
)
from gradguard.dist.env import DistributedSetupError, choose_backend
from gradguard.run import ConfigError, RunDirectoryError, Trainer, config
from gradguard.run.loop import DataStream, guard_policy
from gradguard.run.workload import TensorData


def _data(n: int) -> TensorData:
    return TensorData((torch.arange(n), torch.arange(n) * 10))


@pytest.mark.parametrize("n", [64, 67, 65])
def test_rank_shards_of_a_global_batch_are_the_single_process_batch(n: int) -> None:
    single = DataStream(_data(n), 16, seed=5)
    ranks = [DataStream(_data(n), 8, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch
    for _ in range(3 * single.batches_per_epoch):
        whole = single.next()[0]
        shards = [s.next()[0] for s in ranks]
        weights = [s.weight for s in ranks]
        if all(w > 0 for w in weights):
            assert sorted(torch.cat(shards).tolist()) == sorted(whole.tolist())
            # each rank's mean, weighted, averages to the global batch's mean
            means = sum(w * s.double().mean() for w, s in zip(weights, shards, strict=True)) / 2
            assert float(means) == pytest.approx(float(whole.double().mean()))
        else:  # a last batch of one sample: rank 1 takes it again with weight 0
            assert whole.tolist() == shards[0].tolist() == shards[1].tolist()
            assert weights == [1.0 * 2, 0.0]
        assert ranks[0].position() == ranks[1].position() == single.position()
        assert ranks[0].last_global_size == len(whole)


def test_checksums_see_one_changed_bit_and_name_the_tensor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    optimizer = go.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    before = checksums(model, optimizer)
    assert len(before.names) == 4 + 4 * 3 and before.values.dtype == torch.int64
    assert compare([before.names] * 2, [before.values, before.values.clone()]) is None
    with torch.no_grad():
        weight = model[1].weight
        weight.view(torch.int32)[0, 0] ^= 1  # the lowest mantissa bit
    after = checksums(model, optimizer)
    mismatch = compare([before.names, after.names], [before.values, after.values])
    assert mismatch is not None and mismatch.ranks == [1]
    assert mismatch.tensors == {1: ["model.1.weight"]}
    assert "rank 1: 1 tensor(s) differ (model.1.weight)" in mismatch.message()
    missing = compare([before.names, before.names[:-1]], [before.values, before.values[:-1]])
    assert missing is not None and "missing optimizer.state[3]" in missing.structure[1]
    assert torch.equal(tensor_checksum(torch.tensor([1.0, -0.0])),
                       tensor_checksum(torch.tensor([1.0, -0.0])))
    assert not torch.equal(tensor_checksum(torch.tensor([0.0])),
                           tensor_checksum(torch.tensor([-0.0])))  # bits, not values


def test_without_torchrun_nothing_is_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched() and setup("cpu") is None
    assert launched({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert choose_backend("cpu") == "gloo" and choose_backend("cuda:0") == "nccl"
    with pytest.raises(DistributedSetupError, match=r"nccl.*needs run\.device"):
        choose_backend("cpu", "nccl")


def test_sparse_gradients_under_nccl_are_refused_naming_the_alternatives() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
    env = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, backend="nccl",
                  device=torch.device("cpu"), owns_group=False)
    with pytest.raises(DistributedConfigError) as err:
        DataParallel(env, model, go.SGD(model.parameters(), lr=0.1))
    assert err.value.key == "dist.backend"
    assert "sparse embedding gradients (0) cannot be all-reduced by NCCL" in str(err.value)
    assert 'dist.backend = "gloo"' in str(err.value) and "sparse=False" in str(err.value)


def _digits(**dist_section: object) -> dict[str, object]:
    return {"workload": {"name": "digits"}, "optimizer": {"name": "adam", "lr": 0.01},
            "train": {"steps": 10}, "dist": dist_section}


def test_the_dist_section_is_validated_with_key_paths() -> None:
    cfg = config.parse(_digits())
    assert cfg.dist.check_every == 100 and cfg.dist.on_mismatch == "resync_from_rank0"
    assert cfg.dist.zero is False and cfg.dist.local_sgd is None
    with pytest.raises(ConfigError, match=r"dist\.on_mismatch: .*'resync'"):
        config.parse(_digits(on_mismatch="resync"))
    with pytest.raises(ConfigError, match=r"dist\.zero: .*use one of dist\.zero"):
        config.parse(_digits(zero=True, local_sgd={"period": 4}))
    hybrid = _digits(zero=True)
    hybrid["optimizer"] = {"groups": {"all": {"name": "adam", "params": "all"}}}
    with pytest.raises(ConfigError, match=r"dist\.zero: .*hybrid"):
        config.parse(hybrid)
    local = _digits(local_sgd={"period": 4})
    local["guard"] = {"policy": {"detectors": {"grad_spike": {"action": "skip"}}}}
    with pytest.raises(ConfigError, match=r"guard\.policy\.detectors\.grad_spike\.action: "
                                          r"'skip' needs every rank to agree"):
        config.parse(local)
    # unset, the rank-local detectors only alert under post-local SGD
    policy = guard_policy({}, "max", local_sgd=True)
    assert {policy["detectors"][n]["action"] for n in
            ("grad_spike", "starvation", "accumulator_risk")} == {"alert"}
    assert "action" not in guard_policy({}, "max")["detectors"].get("grad_spike", {})


def test_resume_may_change_the_batch_size_only_with_the_global_batch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    started = _digits()
    started["run"] = {"output": str(run)}
    started["train"] = {"steps": 10, "batch_size": 32}
    (run / "config.toml").write_text(config.dumps(config.parse(started).to_dict()))
    (run / "env.json").write_text(json.dumps({"world_size": 2}))
    same_global = config.parse({**started, "train": {"steps": 20, "batch_size": 64}})
    assert Trainer(same_global, resume=True)._prepare_directory(world_size=1) is False
    other = config.parse({**started, "train": {"steps": 20, "batch_size": 48}})
    with pytest.raises(RunDirectoryError, match=r"train\.batch_size"):
        Trainer(other, resume=True)._prepare_directory(world_size=1)


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A gloo process group of one rank in this process (ZeroRedundancyOptimizer needs one)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_zero_checkpoints_hold_the_wrapped_optimizers_state(one_rank: None, tmp_path: Path
                                                           ) -> None:
    from gradguard.dist import make_zero

    def model_and_data() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)), \
            torch.randn(16, 4)

    model, x = model_and_data()
    zero = make_zero(model.parameters(), go.Adam, lr=0.01)
    for _ in range(3):
        zero.zero_grad()
        model(x).pow(2).mean().backward()
        zero.step()
    view = consolidated_view(zero)
    assert type(view).__qualname__ == "Adam" and type(view).__module__ == "gradguard.optim.adam"
    view.consolidate()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, model=model, optimizer=view)
    # restore into a plain Adam in one process: the same state as three plain steps
    plain_model, x = model_and_data()
    plain = go.Adam(plain_model.parameters(), lr=0.01)
    for _ in range(3):
        plain.zero_grad()
        plain_model(x).pow(2).mean().backward()
        plain.step()
    fresh_model, _ = model_and_data()
    fresh = go.Adam(fresh_model.parameters(), lr=0.01)
    ckpt.restore(model=fresh_model, optimizer=fresh)
    for p_fresh, p_plain in zip(fresh_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p_fresh, p_plain)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p_fresh][key], plain.state[p_plain][key])
    # and back into ZeRO
    again_model, _ = model_and_data()
    again = make_zero(again_model.parameters(), go.Adam, lr=0.01)
    ckpt.restore(model=again_model, optimizer=consolidated_view(again))
    assert len(again.optim.state) == 4 and len(again.state) == 0
