"""GuardedStep and MetricBuffer with plain torch: the routing the integrations rely on."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.guard import Guard
from gradguard.integrations import GuardedStep, MetricBuffer, flatten
from gradguard.watch import Recorder
from gradguard.watch.record import Record

from .helpers import poison, same, snapshot

torch.set_num_threads(1)


def setup(optimizer: type = go.Adam) -> tuple[torch.nn.Module, torch.optim.Optimizer, Guard]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = optimizer(model.parameters(), lr=0.1)
    return model, opt, Guard(opt)


def closure_for(model: torch.nn.Module, opt: torch.optim.Optimizer, calls: list[int],
                nan: bool = False) -> Any:
    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = model(torch.ones(2, 4)).pow(2).mean()
        loss.backward()
        if nan:
            poison(model.weight)
        return loss.detach()
    return closure


def test_closure_step_is_judged_by_the_guard() -> None:
    """optimizer.step(closure), as Lightning calls it: the closure runs once, then the
    guard decides; a NaN step leaves parameters and optimizer state untouched."""
    model, opt, guard = setup()
    routing = GuardedStep(guard)
    routing.install()
    calls: list[int] = []
    loss = opt.step(closure_for(model, opt, calls))
    assert isinstance(loss, torch.Tensor) and calls == [1]
    assert routing.last_result is not None and routing.last_result.applied
    before, state = snapshot(model.parameters()), opt.state_dict()
    opt.step(closure_for(model, opt, calls, nan=True))
    assert calls == [1, 1]
    assert routing.last_result is not None and not routing.last_result.applied
    assert same(before, model.parameters())
    assert torch.equal(opt.state_dict()["state"][0]["step"], state["state"][0]["step"])
    assert guard.counts == {"skip": 1} and guard.step_count == 2
    routing.remove()
    assert "step" not in opt.__dict__ and "step" not in guard.__dict__


def test_step_without_closure_and_direct_guard_calls() -> None:
    """optimizer.step() after backward (the HF Trainer) and a direct guard.step(loss)
    (Lightning's manual optimization) are one guard step each, never two."""
    model, opt, guard = setup(go.SGD)
    losses: list[Any] = []
    routing = GuardedStep(guard, lambda closure_loss: losses.append(closure_loss) or 0.5)
    routing.install()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert losses == [None] and guard.step_count == 1
    assert routing.last_result is not None and routing.last_result.loss == 0.5
    result = guard.step(torch.tensor(0.25))  # direct: the guard reaches the real step
    assert result.applied and guard.step_count == 2 and len(losses) == 1
    assert routing.pending_loss is not None and float(routing.pending_loss[1]) == 0.25
    with pytest.raises(TypeError, match="no keyword arguments"):
        opt.step(grad_scale=torch.tensor(2.0))
    routing.remove()
    routing.remove()  # idempotent


def test_recorder_hooks_run_for_applied_steps_only() -> None:
    model, opt, guard = setup()
    recorder = Recorder(opt, every=None, full_every=None)
    guard.recorder = recorder
    routing = GuardedStep(guard)
    routing.install()
    calls: list[int] = []
    for nan in (False, True, False):
        opt.step(closure_for(model, opt, calls, nan=nan))
    assert recorder.step == 2 and guard.step_count == 3
    # logged at the step it became: the skipped step did not count
    assert routing.pending_loss is not None and routing.pending_loss[0] == 2
    routing.remove()
    recorder.close()


def test_lr_scheduler_marker_is_kept_and_restored() -> None:
    """An LR scheduler wraps optimizer.step first and warns if it is replaced: the routing
    step carries its marker, and removing the routing puts the scheduler's wrapper back."""
    model, opt, guard = setup()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    wrapped = opt.__dict__["step"]
    routing = GuardedStep(guard)
    routing.install()
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)
    opt.step(closure_for(model, opt, []))
    assert getattr(opt, "_opt_called", False)  # the scheduler's wrapper ran inside
    scheduler.step()
    routing.remove()
    assert opt.__dict__["step"] is wrapped


def test_rollback_through_the_routed_step(tmp_path: Path) -> None:
    """A rollback decided inside a routed step restores the checkpoint; the batches it
    says to skip are dropped by the next routed steps (their closures still run)."""
    model, opt, _ = setup()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(0, model=model, optimizer=opt)
    saved = snapshot(model.parameters())
    guard = Guard(opt, {"actions": {"rollback": {"skip_batches": 1}},
                        "escalation": [{"action": "skip", "count": 1, "then": "rollback"}]},
                  checkpointer=ckpt, model=model)
    routing = GuardedStep(guard)
    routing.install()
    calls: list[int] = []
    opt.step(closure_for(model, opt, calls))
    assert not same(saved, model.parameters())
    opt.step(closure_for(model, opt, calls, nan=True))  # skip -> rollback to step 0
    assert same(saved, model.parameters()) and guard.step_count == 0
    opt.step(closure_for(model, opt, calls))  # dropped: a batch the rollback skips
    assert calls == [1, 1, 1] and routing.dropped == 1 and same(saved, model.parameters())
    assert guard.counts == {"skip": 1, "rollback": 1, "skip_batch": 1}
    opt.step(closure_for(model, opt, calls))
    assert not same(saved, model.parameters()) and guard.step_count == 1
    routing.remove()


def test_metric_buffer_flattens_and_marks_urgent_records() -> None:
    record = Record(3, 0.0, "default", ("step", "sampled"),
                    {"lr": 0.1, "effective_lr": {"p50": 0.2, "max": 1.0}})
    assert flatten(record, "gg/") == {"gg/default/lr": 0.1, "gg/default/effective_lr/p50": 0.2,
                                      "gg/default/effective_lr/max": 1.0}
    buffer = MetricBuffer("gg/")
    buffer.write([Record(3, 0.0, "all", ("step",), {"grad_norm": 1.5})])
    assert not buffer.urgent
    buffer.write([Record(3, 0.0, "all", ("log",), {"guard_skip_total": 1.0})])
    assert buffer.urgent
    assert buffer.drain() == {"gg/grad_norm": 1.5, "gg/guard_skip_total": 1.0}
    assert buffer.drain() == {} and not buffer.urgent
    buffer.write([Record(4, 0.0, "all", ("step",), {"nonfinite_gradients": math.nan})])
    assert buffer.urgent


def test_missing_framework_names_the_extra() -> None:
    """Without lightning / transformers, importing the integration says what to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["lightning"] = None
        sys.modules["transformers"] = None
        import gradguard.integrations  # the package itself needs neither
        for name, extra in (("lightning", "lightning"), ("transformers", "transformers")):
            try:
                __import__(f"gradguard.integrations.{name}")
            except ImportError as err:
                assert f"pip install 'gradguard[{extra}]'" in str(err), str(err)
                print("ok", name)
            else:
                raise SystemExit(f"gradguard.integrations.{name} imported without {name}")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "lightning", "ok", "transformers"]
