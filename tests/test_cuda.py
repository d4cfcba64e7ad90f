"""The CUDA code paths, held to the CPU reference path and to torch.optim on CUDA.

Every test here needs a CUDA device and is skipped (with the reason) without one,
so the CPU CI skips this file and a GPU machine runs it:

1. every registered optimizer, with each implementation it has, on CUDA: float32
   equals the same optimizer's ``impl="reference"`` on CUDA and torch.optim's
   CUDA implementation (fused where torch has it, else foreach); float64 on CUDA
   equals the float64 CPU reference; ``grad_scale`` / ``found_inf`` divide and
   skip; sparse embedding gradients equal torch's sparse path or the dense
   update they stand for, and the CPU path;
2. the guard's device path (``sync=False``): a NaN step is skipped on the device,
   bit for bit, and audited, with no host synchronisation in the step; a clean
   guarded run is the unguarded run;
3. the flight recorder on CUDA records what it records on the CPU;
4. a checkpoint saved on CUDA restores into fresh CUDA objects: the same next
   steps, bit for bit, and the CUDA RNG where it was;
5. the runner on ``run.device = "cuda"``: digits reaches its target in fp32 and
   bf16, and a run stopped and resumed ends where the uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import gradguard.optim as go
from gradguard.ckpt import Checkpointer
from gradguard.guard import Guard
from gradguard.watch import Recorder
from gradguard.watch.record import Record
from gradguard.watch.sinks.base import Sink
from tests.optim.harness import GradientStream, make_params, rel_err, step_pair
from tests.optim.test_sparse_adagrad import TABLES, ZipfLookups, make_tables

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
    # torch's own sparse paths build tensors without invariant checks
    pytest.mark.filterwarnings("ignore:Sparse invariant checks"),
]

CUDA = torch.device("cuda")
NAMES = go.available()
STEPS = 50
FLOAT32_TOL = 1e-5
FLOAT32_STATE_TOL = 5e-5
"""Second moments square the gradients, whose differences carry the parameters' (the
gradients depend on the trajectory): their relative error is about twice as large."""
FLOAT64_TOL = 1e-10

# One configuration per algorithm, away from the defaults, exercising its options
# (weight decay, momentum, amsgrad, ...). Where torch.optim has the algorithm the
# arguments are torch's, so the same dict builds both.
CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    "adagrad": {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                "initial_accumulator_value": 0.1},
    "rowwise_adagrad": {"lr": 0.1, "weight_decay": 0.01, "initial_accumulator_value": 0.1},
    "rmsprop": {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
    "adadelta": {"lr": 1.0, "rho": 0.8, "weight_decay": 0.01},
    "adam": {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True},
    "adamw": {"lr": 0.01, "weight_decay": 0.1},
    "adamax": {"lr": 0.02, "weight_decay": 0.01},
    "nadam": {"lr": 0.01, "weight_decay": 0.01, "momentum_decay": 0.004},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "lars": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "ftrl": {"lr": 0.1, "l1": 0.01, "l2": 0.01},
}

TORCH_PEERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
    "adadelta": torch.optim.Adadelta, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
    "adamax": torch.optim.Adamax, "nadam": torch.optim.NAdam,
}
"""The registered algorithms torch.optim has under the same name and arguments."""


def impl_cases() -> list[tuple[str, str]]:
    return [(name, impl) for name in NAMES
            for impl in ("auto", *go.registry.get(name).supported_impls)]


# ----------------------------------------------------------------- helpers
class DeviceStream(GradientStream):
    """The harness's gradient stream for parameters on any device.

    The gradient is computed on the CPU in float64 from the parameters' current
    values (as the harness does) and moved to the parameters' device and dtype, so
    two runs with bit-identical parameters get bit-identical gradients, wherever
    they live.
    """

    def apply(self, params: Sequence[Tensor], t: int) -> None:
        proxies = [p.detach().cpu() for p in params]
        super().apply(proxies, t)
        for p, proxy in zip(params, proxies, strict=True):
            p.grad = None if proxy.grad is None else proxy.grad.to(p.device)


def device_params(dtype: torch.dtype, device: torch.device = CUDA, seed: int = 0,
                  ) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().to(device)) for p in make_params(seed, dtype)]


Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def run_lockstep(make_a: Factory, make_b: Factory, *, dtype: torch.dtype,
                 device_a: torch.device = CUDA, device_b: torch.device = CUDA,
                 steps: int = STEPS) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer,
                                              list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Two optimizers from the same start, each on its own device, same gradient stream."""
    params_a = device_params(dtype, device_a)
    return step_pair(params_a, device_params(dtype, device_b), make_a, make_b, DeviceStream,
                     steps)


def on_cuda(tensors: Iterable[Tensor]) -> bool:
    return all(t.device.type == CUDA.type for t in tensors)


def assert_close(actual: Sequence[Tensor], expected: Sequence[Tensor], tol: float,
                 what: str = "parameter") -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape, f"{what} {i}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        err = rel_err(a.cpu(), e.cpu())
        assert err <= tol, f"{what} {i}: relative error {err:.3e} > {tol:.1e}"


def assert_state_close(actual: torch.optim.Optimizer, expected: torch.optim.Optimizer,
                       params_a: Sequence[Tensor], params_b: Sequence[Tensor], tol: float,
                       keys: Sequence[str] | None = None) -> None:
    """Each tensor of ``expected``'s state (or only ``keys``) matches ``actual``'s.

    The error of a state tensor is taken relative to that state's scale over the
    whole model (the largest magnitude of the key in any parameter's state): a
    first moment that averages out near zero in one small tensor is compared with
    the size moments have, not with itself.
    """
    pairs: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    for i, (pa, pb) in enumerate(zip(params_a, params_b, strict=True)):
        sa, sb = actual.state.get(pa, {}), expected.state.get(pb, {})
        for key, value in sb.items():
            if (keys is not None and key not in keys) or not torch.is_tensor(value):
                continue
            assert key in sa, f"parameter {i}: state {key!r} missing"
            pairs.setdefault(key, []).append(
                (i, sa[key].detach().cpu().double(), value.detach().cpu().double()))
    for key, values in pairs.items():
        scale = max((e.abs().max().item() for _, _, e in values if e.numel()), default=0.0)
        for i, a, e in values:
            assert a.shape == e.shape, f"state {key!r} of parameter {i}: shape differs"
            diff = (a - e).abs().max().item() if e.numel() else 0.0
            err = diff / scale if scale > 0 else diff
            assert err <= tol, (f"state {key!r} of parameter {i}: error {err:.3e} > {tol:.1e} "
                                f"(relative to the state's scale {scale:.3e})")


def snapshot(params: Sequence[Tensor], optimizer: torch.optim.Optimizer,
             ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Copies of the parameters and of every state value, to compare bit for bit."""
    states = [{k: v.clone() if torch.is_tensor(v) else v
               for k, v in optimizer.state.get(p, {}).items()} for p in params]
    return [p.detach().clone() for p in params], states


def assert_bit_identical(params: Sequence[Tensor], optimizer: torch.optim.Optimizer,
                         before: tuple[list[Tensor], list[dict[str, Any]]]) -> None:
    old_params, old_states = before
    for i, (p, old) in enumerate(zip(params, old_params, strict=True)):
        assert torch.equal(p.detach(), old), f"parameter {i} changed"
    for i, (p, old) in enumerate(zip(params, old_states, strict=True)):
        state = optimizer.state.get(p, {})
        assert state.keys() == old.keys(), f"parameter {i}: state keys changed"
        for key, value in old.items():
            if torch.is_tensor(value):
                assert torch.equal(state[key], value), f"parameter {i}: state {key!r} changed"
            else:
                assert state[key] == value, f"parameter {i}: state {key!r} changed"


def create_on_cuda(name: str, params: list[torch.nn.Parameter], impl: str,
                   **config: Any) -> go.Optimizer:
    """``go.create``, skipping the test when ``impl`` is refused for CUDA tensors."""
    optimizer = go.create(name, params, impl=impl, **config)
    try:
        optimizer.resolve_impl(optimizer.param_groups[0], params)
    except ValueError as err:
        pytest.skip(f"{name}: impl={impl!r} is not available on CUDA: {err}")
    return optimizer


def resolved_impl(optimizer: go.Optimizer) -> str:
    group = optimizer.param_groups[0]
    return optimizer.resolve_impl(group, group["params"])


@functools.cache
def torch_cuda_impl(name: str) -> str:
    """``"fused"`` where torch.optim's ``name`` has a fused CUDA kernel, else ``"foreach"``."""
    p = torch.nn.Parameter(torch.zeros(3, device=CUDA))
    try:
        opt = TORCH_PEERS[name]([p], fused=True)  # type: ignore[call-arg]
        p.grad = torch.ones_like(p)
        opt.step()
    except (TypeError, RuntimeError, ValueError, NotImplementedError):
        return "foreach"
    return "fused"


def torch_peer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    impl = torch_cuda_impl(name)
    return TORCH_PEERS[name](params, **CONFIGS[name], **{impl: True})


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Any operation inside that makes the host wait for the device raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_every_registered_optimizer_has_a_cuda_config() -> None:
    assert set(NAMES) <= set(CONFIGS), f"add {set(NAMES) - set(CONFIGS)} to CONFIGS"


# ====================================================== 1. optimizers on CUDA
@pytest.mark.parametrize(("name", "impl"), impl_cases())
def test_float32_each_impl_on_cuda_equals_the_reference_on_cuda(name: str, impl: str) -> None:
    config = CONFIGS[name]
    ours, opt, ref, ref_opt = run_lockstep(
        lambda ps: create_on_cuda(name, ps, impl, **config),
        lambda ps: go.create(name, ps, impl="reference", **config), dtype=torch.float32)
    assert on_cuda(ours)
    assert_close(ours, ref, FLOAT32_TOL)
    assert_state_close(opt, ref_opt, ours, ref, FLOAT32_STATE_TOL)


@pytest.mark.parametrize(("name", "impl"), [c for c in impl_cases() if c[0] in TORCH_PEERS])
def test_float32_on_cuda_equals_torch_optim_on_cuda(name: str, impl: str) -> None:
    """torch.optim with ``fused=True`` where torch supports it on CUDA, else ``foreach=True``."""
    ours, opt, theirs, ref = run_lockstep(
        lambda ps: create_on_cuda(name, ps, impl, **CONFIGS[name]),
        lambda ps: torch_peer(name, ps), dtype=torch.float32)
    assert_close(ours, theirs, FLOAT32_TOL)
    assert_state_close(opt, ref, ours, theirs, FLOAT32_STATE_TOL)


@pytest.mark.parametrize(("name", "impl"), impl_cases())
def test_float64_on_cuda_equals_the_cpu_reference(name: str, impl: str) -> None:
    config = CONFIGS[name]
    ours, opt, ref, ref_opt = run_lockstep(
        lambda ps: create_on_cuda(name, ps, impl, **config),
        lambda ps: go.create(name, ps, impl="reference", **config),
        dtype=torch.float64, device_b=torch.device("cpu"))
    assert on_cuda(ours) and all(p.device.type == "cpu" for p in ref)
    assert_close(ours, ref, FLOAT64_TOL)
    assert_state_close(opt, ref_opt, ours, ref, FLOAT64_TOL)


@pytest.mark.parametrize(("name", "impl"), impl_cases())
def test_found_inf_skips_the_step_bit_for_bit(name: str, impl: str) -> None:
    """``found_inf=1`` (gradients that overflowed) changes no parameter, state or counter:
    inside the kernel for the fused implementations that take it, in the base class
    for the others."""
    params = device_params(torch.float32)
    optimizer = create_on_cuda(name, params, impl, **CONFIGS[name])
    stream = DeviceStream(params)
    for t in range(12):
        stream.apply(params, t)
        if t in (5, 9):
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(math.inf)
            before = snapshot(params, optimizer)
            optimizer.step(grad_scale=torch.tensor(1024.0, device=CUDA),
                           found_inf=torch.ones((), device=CUDA))
            assert_bit_identical(params, optimizer, before)
        else:
            optimizer.step(found_inf=torch.zeros((), device=CUDA))
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(("name", "impl"), impl_cases())
def test_grad_scale_divides_the_gradients(name: str, impl: str) -> None:
    """Stepping on ``1024 * g`` with ``grad_scale=1024`` is stepping on ``g``.

    Bit for bit where the base class divides (a power of two divides exactly); within
    float32 rounding in torch's fused CUDA kernels, whose vectorised path rounds the
    scaled update differently in the last bit (torch.optim.SGD(fused=True) does too).
    """
    scale = 1024.0
    plain = device_params(torch.float32)
    scaled = device_params(torch.float32)
    opt_plain = create_on_cuda(name, plain, impl, **CONFIGS[name])
    opt_scaled = create_on_cuda(name, scaled, impl, **CONFIGS[name])
    exact = resolved_impl(opt_scaled) != "fused"
    grad_scale = torch.tensor(scale, device=CUDA)
    stream = DeviceStream(plain)
    for t in range(20):
        stream.apply(plain, t)
        stream.apply(scaled, t)
        for p in scaled:
            if p.grad is not None:
                p.grad.mul_(scale)
        opt_plain.step()
        opt_scaled.step(grad_scale=grad_scale, found_inf=torch.zeros((), device=CUDA))
        if exact:
            for i, (a, b) in enumerate(zip(scaled, plain, strict=True)):
                assert torch.equal(a, b), f"step {t}: parameter {i} differs"
    assert_close(scaled, plain, 0.0 if exact else FLOAT32_TOL)
    assert_state_close(opt_scaled, opt_plain, scaled, plain,
                       0.0 if exact else FLOAT32_STATE_TOL)


@pytest.mark.parametrize(("name", "impl"), impl_cases())
def test_grad_scale_leaves_the_gradients_divided(name: str, impl: str) -> None:
    """After ``step(grad_scale=s)`` every ``.grad`` holds ``g``, as ``GradScaler.unscale_``
    and torch's fused kernels leave it (Optimizer.step's documented contract)."""
    params = device_params(torch.float32)
    optimizer = create_on_cuda(name, params, impl, **CONFIGS[name])
    stream = DeviceStream(params, gaps=False)
    for t in range(3):
        stream.apply(params, t)
        unscaled = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        for p in params:
            p.grad.mul_(1024.0)  # type: ignore[union-attr]
        optimizer.step(grad_scale=torch.tensor(1024.0, device=CUDA))
        for i, (p, g) in enumerate(zip(params, unscaled, strict=True)):
            assert torch.equal(p.grad, g), (  # type: ignore[arg-type]
                f"step {t}: .grad of parameter {i} ({p.numel()} elements) is not g")


def test_the_fused_kernels_that_take_scaling_are_the_ones_documented() -> None:
    takes = {name for name in NAMES if go.registry.get(name).fused_takes_scaling}
    assert takes >= {"sgd", "adam", "adamw", "adagrad"}
    for name in takes:
        assert "fused" in go.registry.get(name).supported_impls


# ---------------------------------------------------------- sparse gradients
SPARSE_CLASSES = sorted(
    (cls for cls in vars(go).values()
     if isinstance(cls, type) and issubclass(cls, go.Optimizer) and cls.sparse_gradients),
    key=lambda cls: cls.__name__)


def test_the_classes_taking_sparse_gradients_are_the_embedding_optimizers() -> None:
    assert {cls.__name__ for cls in SPARSE_CLASSES} == {
        "Adagrad", "FTRL", "RowWiseAdagrad", "SparseAdam"}


SPARSE_CONFIGS: dict[str, dict[str, Any]] = {
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "FTRL": {"lr": 0.3, "l1": 0.2, "l2": 0.1},
    "RowWiseAdagrad": {"lr": 0.1, "initial_accumulator_value": 0.1},
    "SparseAdam": {"lr": 0.01, "betas": (0.8, 0.99)},
}

SPARSE_PEERS: dict[str, tuple[str, Factory]] = {
    # torch has these two on sparse gradients
    "Adagrad": ("torch", lambda ps: torch.optim.Adagrad(ps, **SPARSE_CONFIGS["Adagrad"])),
    "SparseAdam": ("torch",
                   lambda ps: torch.optim.SparseAdam(ps, **SPARSE_CONFIGS["SparseAdam"])),
    # a lazy update of the touched rows is the dense update on the densified gradient:
    # a zero gradient row keeps its accumulator and weights (FTRL: from zero weights)
    "FTRL": ("dense", lambda ps: go.FTRL(ps, impl="reference", **SPARSE_CONFIGS["FTRL"])),
    "RowWiseAdagrad": ("dense", lambda ps: go.RowWiseAdagrad(
        ps, impl="reference", **SPARSE_CONFIGS["RowWiseAdagrad"])),
}


def cuda_sparse(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.to(CUDA)


@pytest.mark.parametrize("cls", SPARSE_CLASSES, ids=lambda cls: cls.__name__)
def test_sparse_gradients_on_cuda_equal_torch_or_the_dense_update(cls: type[go.Optimizer],
                                                                   ) -> None:
    """100 steps of Zipf-distributed lookups (duplicates, empty and missing gradients)."""
    kind, make_peer = SPARSE_PEERS[cls.__name__]
    if kind == "torch":
        start = [p.detach().float().to(CUDA) for p in make_tables()]
    else:  # FTRL's weights are a function of its state: start where the state says
        start = [torch.zeros(shape, device=CUDA) for shape in TABLES]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt = cls(ours, **SPARSE_CONFIGS[cls.__name__])
    ref = make_peer(theirs)
    stream = ZipfLookups(dtype=torch.float32)
    for t in range(100):
        for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
            p.grad = cuda_sparse(stream.grad(i, t))
            q.grad = (cuda_sparse(stream.grad(i, t)) if kind == "torch" or p.grad is None
                      else p.grad.to_dense())
        opt.step()
        ref.step()
    assert on_cuda(ours)
    assert_close(ours, theirs, FLOAT32_TOL)
    assert_state_close(opt, ref, ours, theirs, FLOAT32_STATE_TOL,
                       keys=["sum", "exp_avg", "exp_avg_sq", "z", "n"])


@pytest.mark.parametrize("cls", SPARSE_CLASSES, ids=lambda cls: cls.__name__)
def test_sparse_embeddings_on_cuda_equal_the_cpu_path_in_float64(cls: type[go.Optimizer]) -> None:
    """``nn.Embedding(sparse=True)`` tables trained on CUDA and on the CPU (reference impl)."""

    def build(device: torch.device) -> tuple[list[torch.nn.Embedding], torch.optim.Optimizer]:
        tables = [torch.nn.Embedding(rows, dim, sparse=True, dtype=torch.float64)
                  for rows, dim in TABLES]
        for table, start in zip(tables, make_tables(), strict=True):
            with torch.no_grad():
                table.weight.copy_(start)
        tables = [t.to(device) for t in tables]
        impl = {"impl": "reference"} if device.type == "cpu" else {}
        return tables, cls([t.weight for t in tables], **impl, **SPARSE_CONFIGS[cls.__name__])

    lookups = ZipfLookups()
    runs = [build(CUDA), build(torch.device("cpu"))]
    for t in range(40):
        for tables, opt in runs:
            device = tables[0].weight.device
            opt.zero_grad()
            loss = torch.zeros((), dtype=torch.float64, device=device)
            for i, table in enumerate(tables):
                rows = table(lookups.ids(i, t).to(device))
                target = torch.linspace(-1, 1, rows.shape[1], dtype=torch.float64,
                                        device=device)
                loss = loss + (rows - target).pow(2).sum() / 2
            loss.backward()
            assert all(table.weight.grad.is_sparse for table in tables)  # type: ignore[union-attr]
            opt.step()
    (cuda_tables, cuda_opt), (cpu_tables, cpu_opt) = runs
    ours, theirs = [t.weight for t in cuda_tables], [t.weight for t in cpu_tables]
    assert on_cuda(ours)
    assert_close(ours, theirs, FLOAT64_TOL)
    assert_state_close(cuda_opt, cpu_opt, ours, theirs, FLOAT64_TOL)


# ============================================================ 2. the guard
def regression_model(seed: int = 0) -> torch.nn.Module:
    """An MLP whose middle weight (65,536 elements) takes the guard's BLAS-dot path."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 1)).to(CUDA)


def regression_batches(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(64, 16, generator=gen)
        batches.append((x.to(CUDA), x.sum(1, keepdim=True).sin().to(CUDA)))
    return batches


def mse(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


GUARDED = {
    "gradguard-adam-fused": lambda ps: go.Adam(ps, lr=3e-3, impl="fused"),
    "gradguard-sgd-momentum-fused": lambda ps: go.SGD(ps, lr=0.05, momentum=0.9, impl="fused"),
    "torch-adam-fused": lambda ps: torch.optim.Adam(ps, lr=3e-3, fused=True),
    "gradguard-adagrad-auto": lambda ps: go.Adagrad(ps, lr=0.05),
    "gradguard-lion-foreach": lambda ps: go.Lion(ps, lr=3e-4, impl="foreach"),
}
SYNC_FREE = {"gradguard-adam-fused", "gradguard-sgd-momentum-fused", "torch-adam-fused"}
"""Optimizers that take ``grad_scale``/``found_inf`` into their kernels: a guarded step
needs no host synchronisation (SGD's fused path reads ``found_inf`` once per
parameter's life, at its first momentum step)."""

NO_POST_STEP_READS = {"detectors": {"starvation": False}}
"""A policy whose every decision stays on the device (starvation reads a sample back)."""


@pytest.mark.parametrize("which", GUARDED)
def test_device_guard_skips_a_nan_step_on_the_device_and_audits_it(which: str) -> None:
    model = regression_model()
    params = list(model.parameters())
    optimizer = GUARDED[which](params)
    guard = Guard(optimizer, NO_POST_STEP_READS, sync=False)
    bad_step = 30  # after the spike detectors' warm-up (20 steps)
    for step, batch in enumerate(regression_batches(40), start=1):
        guard.flush()  # judging the previous step reads its numbers: the one wait, outside
        optimizer.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        if step == bad_step:
            params[2].grad[3, 5] = math.nan  # type: ignore[index]
            before = snapshot(params, optimizer)
        checked = which in SYNC_FREE and step > 1
        with no_host_sync() if checked else contextlib.nullcontext():
            guard.step(loss)
        if step == bad_step:
            assert_bit_identical(params, optimizer, before)
    guard.flush()
    records = [r for r in guard.audit.records if r["step"] == bad_step]
    assert [(r["detector"], r["action"], r["outcome"]) for r in records] == [
        ("nonfinite", "skip", "skipped on the device")]
    assert guard.audit.records == records, "only the NaN step was acted on"
    assert guard.counts == {"skip": 1}
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("which", GUARDED)
def test_a_clean_run_under_the_device_guard_is_the_unguarded_run(which: str) -> None:
    batches = regression_batches(60)
    finals = []
    for guarded in (False, True):
        model = regression_model()
        optimizer = GUARDED[which](list(model.parameters()))
        guard = Guard(optimizer) if guarded else None  # the default policy; sync=False on CUDA
        for batch in batches:
            optimizer.zero_grad()
            loss = mse(model, batch)
            loss.backward()
            guard.step(loss) if guard is not None else optimizer.step()
        if guard is not None:
            guard.flush()
            assert guard.counts == {} and guard.audit.records == []
        finals.append([p.detach().clone() for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*finals, strict=True)):
        assert torch.equal(a, b), f"parameter {i} differs between the guarded and unguarded run"


# ========================================================= 3. the recorder
class ListSink(Sink):
    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)


TIMING = {"step_time", "samples_per_second"}


RECORDED: dict[str, Factory] = {
    "adagrad-auto": lambda ps: go.Adagrad(ps, lr=0.05),
    "adam-auto": lambda ps: go.Adam(ps, lr=0.05),
    "adagrad-foreach": lambda ps: go.Adagrad(ps, lr=0.05, impl="foreach"),
    "adam-reference": lambda ps: go.Adam(ps, lr=0.05, impl="reference"),
    "torch-adam-foreach": lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
}
RECORDED_ON_CPU_STEP = {"adagrad-foreach", "adam-reference", "torch-adam-foreach"}
"""Their step counters stay on the CPU while the parameters and moments are on CUDA."""


def recorded_run(which: str, device: torch.device) -> dict[tuple[int, str], dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 4)).to(device)
    optimizer = RECORDED[which](list(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=5, full_every=10, sample_size=16,
                  batch_size=32) as recorder:
        for step in range(1, 31):
            x = torch.randn(32, 8, generator=gen).to(device)
            optimizer.zero_grad()
            loss = (model(x) - x[:, :4].cos()).pow(2).mean()
            loss.backward()
            optimizer.step()
            recorder.log(step, loss=loss)
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    for r in sink.records:
        merged.setdefault((r.step, r.group), {}).update(
            (k, v) for k, v in r.metrics.items() if k not in TIMING)
    return merged


def close_values(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-9) -> bool:
    if isinstance(a, Mapping):
        return (isinstance(b, Mapping) and a.keys() == b.keys()
                and all(close_values(a[k], b[k], rtol, atol) for k in a))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=atol)


@pytest.mark.parametrize("which", list(RECORDED))
def test_recorder_on_cuda_records_what_it_records_on_the_cpu(which: str) -> None:
    """The same optimizer, model and batches on CUDA and on the CPU: the same records
    (every tier: effective-lr distributions, exact grad_norm, ...) within float32."""
    on_cuda = recorded_run(which, CUDA)
    on_cpu = recorded_run(which, torch.device("cpu"))
    assert on_cuda.keys() == on_cpu.keys()
    sampled = [m for (step, group), m in on_cuda.items() if group == "default" and step % 5 == 0]
    assert len(sampled) == 6 and all("effective_lr" in m for m in sampled)
    assert all(set(m["effective_lr"]) >= {"p01", "p50", "p99"} for m in sampled)
    full = [m for (step, group), m in on_cuda.items() if group == "default" and step % 10 == 0]
    assert len(full) == 3 and all("grad_norm" in m and m["grad_norm"] > 0 for m in full)
    for key, metrics in on_cuda.items():
        assert metrics.keys() == on_cpu[key].keys(), key
        for metric, value in metrics.items():
            assert close_values(value, on_cpu[key][metric]), (key, metric, value,
                                                               on_cpu[key][metric])


# ====================================================== 4. the checkpointer
def dropout_model(seed: int) -> torch.nn.Module:
    """Dropout draws from the CUDA generator: the next steps depend on its restored state."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.Tanh(),
                               torch.nn.Linear(32, 1)).to(CUDA)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_saved_on_cuda_restores_the_same_next_steps_and_the_cuda_rng(
        name: str, tmp_path: Path) -> None:
    batches = regression_batches(10, seed=2)
    batches = [(x[:, :8].contiguous(), y) for x, y in batches]

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              part: Sequence[tuple[Tensor, Tensor]]) -> None:
        for batch in part:
            optimizer.zero_grad()
            mse(model, batch).backward()
            optimizer.step()

    model = dropout_model(seed=0)
    optimizer = go.create(name, model.parameters(), **CONFIGS[name])
    train(model, optimizer, batches[:5])
    ckpt = Checkpointer(tmp_path / "ckpt")
    info = ckpt.save(5, model=model, optimizer=optimizer)
    saved_rng = torch.cuda.get_rng_state()
    train(model, optimizer, batches[5:])

    fresh = dropout_model(seed=1)  # other weights: the restore must replace them
    fresh_optimizer = go.create(name, fresh.parameters(), **CONFIGS[name])
    torch.randn(1000, device=CUDA)  # move the CUDA generator on
    assert not torch.equal(torch.cuda.get_rng_state(), saved_rng)
    restored = ckpt.restore(model=fresh, optimizer=fresh_optimizer)
    assert restored.step == info.step == 5
    assert torch.equal(torch.cuda.get_rng_state(), saved_rng)
    assert on_cuda(fresh.parameters())
    train(fresh, fresh_optimizer, batches[5:])

    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} differs after the same steps from the checkpoint"
    theirs, ours = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert theirs.keys() == ours.keys()
    for pid, state in theirs.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.device == ours[pid][key].device, (pid, key)
                assert torch.equal(value, ours[pid][key]), (pid, key)


# =========================================================== 5. the runner
@pytest.fixture
def restore_determinism(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``run.deterministic`` switches torch's global flag on; give it back afterwards."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def cuda_digits(out: Path, precision: str = "fp32", **train_opts: Any) -> dict[str, Any]:
    from tests.run.test_train import digits_config

    data = digits_config(out, **train_opts)
    data["run"].update(device="cuda", precision=precision)
    return data


@pytest.mark.usefixtures("restore_determinism")
@pytest.mark.parametrize(("precision", "target"), [("fp32", 0.95), ("bf16", 0.9)])
def test_runner_on_cuda_reaches_the_digits_target(precision: str, target: float,
                                                  tmp_path: Path) -> None:
    from gradguard.run import config, rundir, train

    out = tmp_path / "run"
    result = train(config.parse(cuda_digits(out, precision)), progress=False)
    assert result.status == "finished" and result.steps == 300
    assert result.best["value"] >= target, result.summary
    env = json.loads((out / rundir.ENV).read_text())
    assert env["device"].startswith("cuda") and env.get("gpu")


@pytest.mark.usefixtures("restore_determinism")
def test_runner_on_cuda_stopped_and_resumed_ends_with_the_uninterrupted_parameters(
        tmp_path: Path) -> None:
    from gradguard.run import config, train
    from tests.run.test_train import events, final_parameters

    def cfg(out: Path, steps: int) -> Any:
        data = cuda_digits(out, steps=steps, eval_every=50)
        data["run"]["deterministic"] = True
        return config.parse(data)

    stopped = tmp_path / "stopped"
    first = train(cfg(stopped, 150), progress=False)
    assert first.steps == 150
    resumed = train(cfg(stopped, 300), resume=True, progress=False)
    assert resumed.steps == 300
    assert [e["checkpoint_step"] for e in events(stopped) if e["event"] == "resume"] == [150]

    whole = tmp_path / "whole"
    train(cfg(whole, 300), progress=False)
    after, expected = final_parameters(stopped), final_parameters(whole)
    assert after.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(after[name], tensor), name
