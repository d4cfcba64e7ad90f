"""gradguard.dist on a GPU: gloo with CUDA tensors on 2 ranks, NCCL on one (skipped without CUDA).

One machine with one GPU cannot run NCCL with two ranks (NCCL refuses two ranks
on one device), so the 2-rank job uses gloo with both ranks' tensors on
``cuda:0``, and NCCL's paths (collectives on the GPU as the communication
device, the consolidation of ZeRO shards, broadcasts of state) run in a
1-rank NCCL group. These tests use the library directly (no ``gradguard
train``: they need nothing but torch, so they run on a bare GPU image).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradguard.optim as go
from gradguard.dist import DataParallel, DistEnv, make_zero
from gradguard.dist.collectives import broadcast_state
from gradguard.guard import AuditLog, Guard
from tests.dist import harness

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 4)).cuda()


def _gloo_on_cuda(rank: int, world_size: int, out: str) -> None:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank,
                  local_world_size=world_size, backend="gloo", device=device, owns_group=False)
    model = _model()
    optimizer = go.Adam(model.parameters(), lr=1e-2)
    parallel = DataParallel(env, model, optimizer, check_every=10, spread_every=5)
    guard = Guard(optimizer, sync=False)  # the device path: decisions judged a step late
    audit = AuditLog()
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(30, 2, 8, 16, generator=generator)
    spreads = []
    for step in range(1, 31):
        x = data[step - 1, rank].to(device)
        optimizer.zero_grad()
        parallel.arm(step)
        loss = (parallel.ddp(x) - x[:, :4]).pow(2).mean()
        loss.backward()
        if rank == 1 and step == 7:
            loss = loss + math.nan  # this rank's loss only
        agreed = parallel.agree(loss.detach(), stop=False)
        if agreed.spread is not None:
            spreads.append(agreed.spread["grad_norm_rank_spread"])
        guard.step(agreed.loss)
        if rank == 1 and step == 15:
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-3
        if parallel.replica_check_due(step):
            parallel.check_replicas(step, audit=audit, guard=guard)
    guard.flush()
    extra = parallel.checkpoint_extra(16)
    harness.save_replica(Path(out), rank, model)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "counts": guard.counts, "spreads": spreads, "rng": len(extra["rng_cuda"]),
        "audit": [(r["step"], r["detector"], r["action"], r["outcome"])
                  for r in audit.records]}))


def test_two_ranks_on_cuda_tensors_agree_skip_and_resync(tmp_path: Path) -> None:
    harness.spawn(_gloo_on_cuda, str(tmp_path), world_size=2, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same decisions, audits and measurements on both
    assert ranks[0]["counts"]["skip"] >= 1  # step 7's NaN on rank 1: skipped everywhere
    assert [a[:3] for a in ranks[0]["audit"]] == [[20, "replica_mismatch",
                                                   "resync_from_rank0"]]
    assert ranks[0]["audit"][0][3] == "resynced from rank 0 (verified)"
    assert len(ranks[0]["spreads"]) == 6 and ranks[0]["rng"] == 2
    assert harness.identical(harness.load_replica(tmp_path, 0), harness.load_replica(tmp_path, 1))


def test_nccl_paths_in_a_one_rank_group(tmp_path: Path) -> None:
    from gradguard.ckpt import Checkpointer

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device)
    try:
        env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, backend="nccl",
                      device=device, owns_group=False)
        model = _model()
        zero = make_zero(model.parameters(), go.AdamW, lr=1e-2)
        parallel = DataParallel(env, model, zero, check_every=1, spread_every=1)
        for step in range(1, 4):
            zero.zero_grad()
            parallel.arm(step)
            loss = parallel.ddp(torch.randn(8, 16, device=device)).pow(2).mean()
            loss.backward()
            agreed = parallel.agree(loss.detach(), stop=False)
            assert agreed.loss.device == device and agreed.grad_norms is not None
            zero.step()
            assert parallel.compare_replicas() is None
        extra = parallel.checkpoint_extra(8)  # consolidates the shards (a collective)
        assert len(extra["rng_cuda"]) == 1
        ckpt = Checkpointer(tmp_path / "ckpt")
        ckpt.save(3, model=model, optimizer=parallel.checkpoint_optimizer(zero))
        fresh = _model()
        plain = go.AdamW(fresh.parameters(), lr=1e-2)
        ckpt.restore(model=fresh, optimizer=plain)
        for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)
        state = broadcast_state({"w": model[0].weight.detach(), "n": 3}, device=device)
        assert state["n"] == 3 and torch.equal(state["w"], model[0].weight)
        parallel.sync_from_rank0(optimizer_state=False)
    finally:
        dist.destroy_process_group()
