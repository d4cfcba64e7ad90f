"""The workload registry and the built-in workloads, as specifications.

Registry: built-in names and ``"package.module:factory"`` import paths, every
error message, option introspection. Built-ins: determinism under the seed,
data shapes, closed forms of the analytic problems, and short real training
runs that reach the documented targets (digits: 95% test accuracy with Adam;
MNIST-1D logistic regression: the paper's 32% within 3 points; the MLP and
CNN rows of the paper's table in ``slow`` tests; quadratic and Rosenbrock
solved to ``||x - x*|| <= 1e-6`` by gradient descent, nonlinear CG and Newton).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradguard.optim import Adam, GradientDescent, Newton, NonlinearCG
from gradguard.run import workloads
from gradguard.run.workload import Target, Workload
from gradguard.run.workloads.analytic import Objective, Point, Rosenbrock

# --------------------------------------------------------------------------- helpers


def train_minibatch(w: Workload, optimizer: torch.optim.Optimizer, *, steps: int, batch: int,
                    seed: int = 0, eval_every: int = 50,
                    stop_at_target: bool = True) -> tuple[int, dict[str, float]]:
    """A plain training loop; (steps taken, last eval metrics)."""
    g = torch.Generator().manual_seed(seed)
    n, step = len(w.train), 0
    metrics: dict[str, float] = {}
    while step < steps:
        for idx in torch.randperm(n, generator=g).split(batch):
            optimizer.zero_grad()
            w.loss(w.model, w.train.batch(idx)).backward()
            optimizer.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    metrics = w.evaluate(w.model, w.eval.all())
                assert w.target is not None
                if stop_at_target and w.target.reached(metrics[w.primary_metric]):
                    return step, metrics
            if step == steps:
                break
    return step, metrics


def solve_full_batch(w: Workload, make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                     *, max_steps: int, backward: bool = True) -> tuple[int, dict[str, float]]:
    """``optimizer.step(closure)`` until the target is met; (steps, metrics)."""
    assert w.full_batch
    optimizer = make(list(w.model.parameters()))
    batch = w.train.all()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = w.loss(w.model, batch)
        if backward:
            loss.backward()
        return loss

    metrics: dict[str, float] = {}
    for step in range(1, max_steps + 1):
        optimizer.step(closure)
        with torch.no_grad():
            metrics = w.evaluate(w.model, w.eval.all())
        assert w.target is not None
        if w.target.reached(metrics[w.primary_metric]):
            return step, metrics
    return max_steps, metrics


@pytest.fixture
def one_thread() -> Any:
    """Train the small models on one thread: faster than two for them, and immune to the
    oversubscription slowdown when the cores are shared with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


USER_MODULE = '''
"""A user's workloads."""
import torch
from gradguard.run.workload import Target, TensorData, Workload

CONSTANT = 3


def make(*, seed: int, n: int = 10, scale: float = 1.0) -> Workload:
    """Noisy line fit, n samples.

    Second paragraph, not part of the summary.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    y = scale * x + 0.1 * torch.randn(n, 1, generator=g)
    model = torch.nn.Linear(1, 1)
    return Workload(
        name="line", model=model, train=TensorData((x, y)), eval=TensorData((x, y)),
        loss=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
        evaluate=lambda m, b: {"mse": float(((m(b[0]) - b[1]) ** 2).mean())},
        primary_metric="mse", mode="min", target=Target("mse", 0.02, "min"))


def anything(*, seed, **options):
    return make(seed=seed, n=options.get("n", 4))


def declared(*, seed: int = 0, **options):
    return make(seed=seed, **options)


declared.DEFAULTS = {"n": 4, "scale": 1.0}


def no_seed(*, n: int = 3):
    return make(seed=0, n=n)


def required(*, seed, n):
    return make(seed=seed, n=n)


def returns_dict(*, seed: int = 0):
    return {"not": "a workload"}


def bad_option_value(*, seed: int = 0, n: int = 3):
    raise ValueError(f"n must be even, got {n}")


class Factories:
    @staticmethod
    def create(*, seed: int):
        return make(seed=seed)
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh module holding USER_MODULE, importable for this test only."""
    name = f"user_workloads_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, f"{name}_broken"):
        sys.modules.pop(mod, None)


# --------------------------------------------------------------------------- registry


def test_available_lists_the_builtins() -> None:
    assert workloads.available() == ["ctr", "digits", "mnist1d", "quadratic", "rosenbrock"]
    assert set(workloads.BUILTIN) == set(workloads.available())
    assert all(isinstance(d, str) and d and "\n" not in d for d in workloads.BUILTIN.values())


def test_unknown_name_suggests_the_nearest_and_lists_the_forms() -> None:
    with pytest.raises(ValueError, match="unknown workload 'digit'") as err:
        workloads.load("digit")
    message = str(err.value)
    assert "Did you mean 'digits'?" in message
    for name in workloads.available():
        assert name in message
    assert "package.module:factory" in message

    with pytest.raises(ValueError) as err:
        workloads.load("zzzzzz")
    assert "Did you mean" not in str(err.value)
    assert "quadratic" in str(err.value) and "package.module:factory" in str(err.value)

    with pytest.raises(ValueError, match="non-empty string"):
        workloads.load("  ")


def test_user_import_path_loads_with_seed_and_options(user_module: str) -> None:
    path = f"{user_module}:make"
    w = workloads.load(path, seed=3, options={"n": 7, "scale": 2.0})
    assert isinstance(w, Workload)
    assert len(w.train) == 7
    again = workloads.load(path, seed=3, options={"n": 7, "scale": 2.0})
    assert w.train.fingerprint() == again.train.fingerprint()
    assert workloads.load(path, seed=4, options={"n": 7}).train.fingerprint() != \
        w.train.fingerprint()
    assert workloads.options(path) == {"n": 10, "scale": 1.0}
    assert workloads.describe(path) == "Noisy line fit, n samples."
    # dotted attributes and **options factories
    assert len(workloads.load(f"{user_module}:Factories.create").train) == 10
    assert len(workloads.load(f"{user_module}:anything", options={"n": 5, "x": 1}).train) == 5
    assert workloads.options(f"{user_module}:anything") == {}
    # a **options factory declaring its options in DEFAULTS
    assert workloads.options(f"{user_module}:declared") == {"n": 4, "scale": 1.0}
    assert len(workloads.load(f"{user_module}:declared", options={"n": 3}).train) == 3
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'x'; allowed options: "
                                         r"n \(default 4\), scale \(default 1\.0\)"):
        workloads.load(f"{user_module}:declared", options={"x": 1})


def test_user_import_path_errors(user_module: str) -> None:
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_gg'.*"
                                         r"ModuleNotFoundError.*sys\.path"):
        workloads.load("no_such_module_gg:make")
    with pytest.raises(ValueError, match=rf"cannot import module '{user_module}_broken'.*"
                                         r"RuntimeError: boom at import"):
        workloads.load(f"{user_module}_broken:make")
    with pytest.raises(ValueError, match=rf"'{user_module}' has no attribute 'nope'.*"
                                         r"expected a callable factory"):
        workloads.load(f"{user_module}:nope")
    with pytest.raises(ValueError, match=r"'CONSTANT' is a int, not callable"):
        workloads.load(f"{user_module}:CONSTANT")
    with pytest.raises(ValueError, match=r"returned a dict; expected a "
                                         r"gradguard\.run\.workload\.Workload"):
        workloads.load(f"{user_module}:returns_dict")
    for malformed in (f"{user_module}:", ":make", f"{user_module}:a:b", "not a module:make"):
        with pytest.raises(ValueError, match=r"must have the form 'package\.module:factory'"):
            workloads.load(malformed)
    with pytest.raises(ValueError, match="must accept the keyword argument 'seed'"):
        workloads.load(f"{user_module}:no_seed")
    with pytest.raises(ValueError, match=r"missing required option\(s\) 'n'"):
        workloads.load(f"{user_module}:required")
    assert len(workloads.load(f"{user_module}:required", options={"n": 2}).train) == 2
    with pytest.raises(ValueError, match=rf"workload '{user_module}:bad_option_value': "
                                         r"n must be even, got 3"):
        workloads.load(f"{user_module}:bad_option_value")


def test_unknown_option_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as err:
        workloads.load("digits", options={"hiden": [32]})
    message = str(err.value)
    assert "unknown option(s) 'hiden'" in message
    assert "allowed options: test_fraction (default 0.25), hidden (default (128,)), " \
           "standardize (default False)" in message
    with pytest.raises(ValueError, match="'seed' is not an option"):
        workloads.load("quadratic", options={"seed": 1})
    with pytest.raises(ValueError, match=r"unknown option.*'dimension'.*allowed options: dim"):
        workloads.load("quadratic", options={"dimension": 3})


def test_factory_value_errors_are_prefixed_with_the_workload() -> None:
    with pytest.raises(ValueError, match="workload 'mnist1d': model must be one of 'logreg', "
                                         "'mlp', 'cnn', got 'rnn'"):
        workloads.load("mnist1d", options={"model": "rnn"})
    with pytest.raises(ValueError, match="workload 'quadratic': condition must be"):
        workloads.load("quadratic", options={"condition": 0.5})
    with pytest.raises(ValueError, match="workload 'digits': test_fraction must be in"):
        workloads.load("digits", options={"test_fraction": 1.5})
    with pytest.raises(ValueError, match="seed must be an int"):
        workloads.load("quadratic", seed="1")  # type: ignore[arg-type]


def test_options_and_describe_of_the_builtins() -> None:
    assert workloads.options("digits") == {"test_fraction": 0.25, "hidden": (128,),
                                           "standardize": False}
    assert workloads.options("mnist1d") == {
        "model": "cnn", "num_samples": 5000, "train_split": 0.8, "shuffle_seq": False,
        "data_seed": None, "hidden": 100, "channels": 25}
    assert workloads.options("quadratic") == {"dim": 50, "condition": 100.0, "dtype": "float64"}
    assert workloads.options("rosenbrock") == {"dim": 2, "a": 1.0, "b": 100.0,
                                               "variant": "chained", "dtype": "float64"}
    for name in ("digits", "mnist1d", "quadratic", "rosenbrock"):
        summary = workloads.describe(name)
        assert summary and "\n" not in summary
        # every option is a keyword-only parameter with a default (introspectable)
        params = inspect.signature(workloads.factory(name)).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert workloads.describe("digits").startswith("Handwritten 8x8 digits")


def test_ctr_is_registered_and_imported_lazily() -> None:
    """Loading one workload imports neither the others nor their dependencies."""
    code = textwrap.dedent("""
        import sys
        from gradguard.run import workloads
        assert "ctr" in workloads.available()
        workloads.load("quadratic", options={"dim": 3})
        loaded = [m for m in ("gradguard.run.workloads.ctr", "gradguard.run.workloads.digits",
                              "gradguard.run.workloads.mnist1d", "sklearn", "mnist1d")
                  if m in sys.modules]
        assert not loaded, loaded
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_deterministic_and_scaled() -> None:
    w = workloads.load("digits", seed=0)
    assert (len(w.train), len(w.eval)) == (1347, 450)
    x, y = w.train.all()
    ye = w.eval.all()[1]
    assert x.dtype == torch.float32 and x.shape[1] == 64 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    all_y = torch.cat([y, ye])
    counts, test_counts = torch.bincount(all_y), torch.bincount(ye)
    assert torch.equal(test_counts, torch.round(0.25 * counts.double()).long())
    assert w.primary_metric == "accuracy" and w.mode == "max"
    assert w.target == Target("accuracy", 0.95, "max")

    again = workloads.load("digits", seed=0)
    assert w.train.fingerprint() == again.train.fingerprint()
    assert w.eval.fingerprint() == again.eval.fingerprint()
    assert same_state(state(w.model), state(again.model))
    other = workloads.load("digits", seed=1)
    assert other.eval.fingerprint() != w.eval.fingerprint()
    assert not same_state(state(w.model), state(other.model))

    standard = workloads.load("digits", options={"standardize": True, "hidden": [32, 16]})
    xs = standard.train.all()[0]
    assert torch.allclose(xs.mean(0), torch.zeros(64), atol=1e-5)
    assert [m.out_features for m in standard.model if isinstance(m, torch.nn.Linear)] == \
        [32, 16, 10]


def test_digits_metrics_are_per_sample_means_and_follow_the_model_dtype() -> None:
    w = workloads.load("digits", seed=0)
    with torch.no_grad():
        whole = w.evaluate(w.model, w.eval.all())
        idx = torch.arange(len(w.eval))
        a, b = w.evaluate(w.model, w.eval.batch(idx[:100])), \
            w.evaluate(w.model, w.eval.batch(idx[100:]))
    assert set(whole) == {"accuracy", "loss"}
    for key in whole:
        chunked = (100 * a[key] + (len(w.eval) - 100) * b[key]) / len(w.eval)
        assert chunked == pytest.approx(whole[key], rel=1e-5)
    w.model.double()
    loss = w.loss(w.model, w.train.batch(torch.arange(8)))
    assert loss.dtype == torch.float64 and loss.dim() == 0


@pytest.mark.usefixtures("one_thread")
def test_digits_reaches_95_percent_with_adam_in_a_few_hundred_steps() -> None:
    w = workloads.load("digits", seed=0)
    steps, metrics = train_minibatch(w, Adam(w.model.parameters(), lr=1e-3), steps=2000,
                                     batch=64)
    assert metrics["accuracy"] >= 0.95, metrics
    assert steps <= 1000  # measured: 650 (seed 0), 300, 325 (seeds 1, 2)


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_data_shapes_classes_and_determinism() -> None:
    np_state = np.random.get_state()
    w = workloads.load("mnist1d", seed=0, options={"model": "logreg"})
    # the generator's global seeding does not leak into the caller's RNG
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    x, y = w.train.all()
    xe, ye = w.eval.all()
    assert tuple(x.shape) == (4000, 40) and tuple(xe.shape) == (1000, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) and set(ye.tolist()) <= set(range(10))
    assert torch.bincount(torch.cat([y, ye])).tolist() == [500] * 10
    assert w.info["paper_accuracy"] == 0.32
    assert w.target == Target("accuracy", 0.29, "max")
    assert w.primary_metric == "accuracy" and w.mode == "max"

    again = workloads.load("mnist1d", seed=0, options={"model": "logreg"})
    assert w.train.fingerprint() == again.train.fingerprint()
    assert same_state(state(w.model), state(again.model))
    assert workloads.load("mnist1d", seed=1, options={"model": "logreg"}).train.fingerprint() \
        != w.train.fingerprint()
    fixed = workloads.load("mnist1d", seed=1, options={"model": "logreg", "data_seed": 0})
    assert fixed.train.fingerprint() == w.train.fingerprint()


@pytest.mark.parametrize(("model", "paper", "parameters"),
                         [("logreg", 0.32, 410), ("mlp", 0.68, 15210), ("cnn", 0.94, 5210)])
def test_mnist1d_models(model: str, paper: float, parameters: int) -> None:
    w = workloads.load("mnist1d", seed=0, options={"model": model})
    assert w.info["paper_accuracy"] == paper
    assert w.target is not None and w.target.value == pytest.approx(paper - 0.03)
    assert sum(p.numel() for p in w.model.parameters()) == parameters
    with torch.no_grad():
        logits = w.model(w.eval.all()[0][:5])
    assert tuple(logits.shape) == (5, 10)


def paper_protocol(model: str, steps: int, seed: int = 0) -> dict[str, float]:
    """The paper's training: Adam lr 1e-2, batch 100, no weight decay; final eval."""
    w = workloads.load("mnist1d", seed=seed, options={"model": model})
    _, metrics = train_minibatch(w, Adam(w.model.parameters(), lr=1e-2), steps=steps,
                                 batch=100, seed=seed, eval_every=steps, stop_at_target=False)
    return metrics


@pytest.mark.usefixtures("one_thread")
def test_mnist1d_logreg_reproduces_the_paper_within_3_points() -> None:
    metrics = paper_protocol("logreg", steps=500)  # measured: 31.7% (seeds 1, 42: 33.6%, 31.4%)
    assert abs(metrics["accuracy"] - 0.32) <= 0.03, metrics


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_mnist1d_mlp_and_cnn_reproduce_the_paper_within_3_points(model: str) -> None:
    paper = {"mlp": 0.68, "cnn": 0.94}[model]
    metrics = paper_protocol(model, steps=6000)  # measured: MLP 68.4%, CNN 93.2% (seed 0)
    assert abs(metrics["accuracy"] - paper) <= 0.03, metrics


# --------------------------------------------------------------------------- quadratic


def test_quadratic_closed_form() -> None:
    w = workloads.load("quadratic", seed=0, options={"dim": 20, "condition": 1e3})
    assert isinstance(w.model, Point)
    assert w.model.x.dtype == torch.float64 and w.model.x.shape == (20,)
    assert w.full_batch and len(w.train) == 0 and w.train.all() == ()
    assert w.primary_metric == "distance" and w.mode == "min"
    assert w.target == Target("distance", 1e-6, "min")

    A, x_star = _problem(w).A, _problem(w).x_star
    assert torch.allclose(A, A.T)
    eig = torch.linalg.eigvalsh(A)
    assert float(eig.min()) == pytest.approx(1.0, rel=1e-10)
    assert float(torch.linalg.cond(A)) == pytest.approx(1e3, rel=1e-8)
    assert torch.allclose(torch.log(eig), torch.linspace(0.0, np.log(1e3), 20,
                                                         dtype=torch.float64), atol=1e-9)
    # gradient by autograd equals A (x - x*); f(x*) = 0
    loss = w.loss(w.model, ())
    (grad,) = torch.autograd.grad(loss, w.model.x)
    assert torch.allclose(grad, A @ (w.model.x.detach() - x_star), rtol=1e-12, atol=1e-12)
    assert torch.allclose(_problem(w).gradient(w.model.x.detach()), grad, rtol=1e-12)
    with torch.no_grad():
        assert w.evaluate(w.model, ())["grad_norm"] == pytest.approx(float(grad.norm()))
    with torch.no_grad():
        w.model.x.copy_(x_star)
        at_opt = w.evaluate(w.model, ())
    assert at_opt == {"objective": 0.0, "distance": 0.0, "grad_norm": 0.0}
    assert w.loss(w.model, ()).item() == 0.0
    assert 1.0 <= w.info["start_distance"] <= 10.0


def _problem(w: Workload) -> Any:
    """The analytic problem behind a workload's loss."""
    assert isinstance(w.loss, Objective)
    return w.loss.problem


def test_quadratic_determinism_and_dtype() -> None:
    a, b = workloads.load("quadratic", seed=5), workloads.load("quadratic", seed=5)
    assert torch.equal(a.model.x, b.model.x) and torch.equal(_problem(a).A, _problem(b).A)
    c = workloads.load("quadratic", seed=6)
    assert not torch.equal(a.model.x, c.model.x)
    f32 = workloads.load("quadratic", seed=5, options={"dtype": "float32"})
    assert f32.model.x.dtype == torch.float32
    assert f32.loss(f32.model, ()).dtype == torch.float32
    f32.model.double()  # the loop may change the dtype: the closed forms follow it
    assert f32.loss(f32.model, ()).dtype == torch.float64
    assert f32.loss(f32.model, ()).item() == pytest.approx(a.loss(a.model, ()).item(), rel=1e-6)


# --------------------------------------------------------------------------- Rosenbrock


def test_rosenbrock_closed_form() -> None:
    w = workloads.load("rosenbrock")
    assert w.model.x.tolist() == [-1.2, 1.0]
    assert w.loss(w.model, ()).item() == pytest.approx(24.2)  # f(-1.2, 1)
    assert w.target == Target("distance", 1e-6, "min")
    problem = _problem(w)
    one = torch.ones(2, dtype=torch.float64)
    assert float(problem.value(one)) == 0.0
    assert problem.gradient(one).abs().max() == 0.0

    x0, x1 = -1.2, 1.0
    expected = [-400 * x0 * (x1 - x0**2) - 2 * (1 - x0), 200 * (x1 - x0**2)]
    (grad,) = torch.autograd.grad(w.loss(w.model, ()), w.model.x)
    assert grad.tolist() == pytest.approx(expected)
    assert problem.gradient(w.model.x.detach()).tolist() == pytest.approx(expected)

    four = workloads.load("rosenbrock", options={"dim": 5})
    assert four.model.x.tolist() == [-1.2, 1.0, -1.2, 1.0, -1.2]
    assert four.info["optimum"] == [1.0] * 5


@pytest.mark.parametrize("variant", ["chained", "extended"])
def test_rosenbrock_gradient_matches_autograd(variant: str) -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    problem = Rosenbrock(6, 1.0, 100.0, variant)
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    (grad,) = torch.autograd.grad(problem.value(x), x)
    assert torch.allclose(problem.gradient(x.detach()), grad, rtol=1e-12)
    xn = x.detach().numpy()
    if variant == "chained":
        assert float(problem.value(x.detach())) == pytest.approx(scipy_optimize.rosen(xn))
        assert np.allclose(problem.gradient(x.detach()).numpy(), scipy_optimize.rosen_der(xn))
    else:
        pairs = sum(scipy_optimize.rosen(xn[i:i + 2]) for i in (0, 2, 4))
        assert float(problem.value(x.detach())) == pytest.approx(pairs)
    assert float(problem.value(torch.ones(6, dtype=torch.float64))) == 0.0


def test_rosenbrock_option_errors() -> None:
    with pytest.raises(ValueError, match="even dim"):
        workloads.load("rosenbrock", options={"dim": 3, "variant": "extended"})
    with pytest.raises(ValueError, match="only for a = 1"):
        workloads.load("rosenbrock", options={"dim": 3, "a": 2.0})
    w = workloads.load("rosenbrock", options={"a": 2.0})
    assert w.info["optimum"] == [2.0, 4.0]


# --------------------------------------------------------------------------- solvers

GTOL = 1e-12  # the targets, not the optimizers' own tests, end these runs


def gd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return GradientDescent(params, line_search="wolfe", gtol=GTOL)


def cg(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return NonlinearCG(params, gtol=GTOL)


def newton(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return Newton(params, gtol=GTOL)


def newton_hf(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return Newton(params, hessian_free=True, gtol=GTOL)


# (workload, optimizer, steps measured at seeds 0-4 with 1 / 2 torch threads, bound asserted).
# Gradient descent's count moves with the floating-point summation order (thread count);
# its bound is the exact-line-search rate ((k-1)/(k+1))^2 per step from f(x0) <= 5000 down to
# f <= 0.5e-12 (k = 100). Newton's closure does not call backward().
SOLVES = [
    ("quadratic", gd, "193-281 / 222-342", 1000),
    ("quadratic", cg, "53-83", 150),
    ("quadratic", newton, "1", 1),
    ("quadratic", newton_hf, "10-13", 25),
    ("rosenbrock", cg, "36", 60),
    ("rosenbrock", newton, "24", 40),
    ("rosenbrock", newton_hf, "77", 120),
]


@pytest.mark.parametrize(("name", "make", "measured", "bound"), SOLVES,
                         ids=[f"{s[0]}-{s[1].__name__}" for s in SOLVES])
def test_full_batch_optimizers_reach_the_target(name: str, make: Any, measured: str,
                                                bound: int) -> None:
    w = workloads.load(name, seed=0)
    steps, metrics = solve_full_batch(w, make, max_steps=bound,
                                      backward=not make.__name__.startswith("newton"))
    assert metrics["distance"] <= 1e-6, (steps, metrics)
    assert metrics["objective"] < 1e-10 and metrics["grad_norm"] < 1e-3


@pytest.mark.slow
def test_gradient_descent_reaches_the_rosenbrock_target() -> None:
    w = workloads.load("rosenbrock")
    steps, metrics = solve_full_batch(w, gd, max_steps=12_000)
    assert metrics["distance"] <= 1e-6, (steps, metrics)  # measured: 9703 steps


def test_chained_rosenbrock_has_a_second_local_minimum() -> None:
    """Documented: dense Newton from (-1.2, 1, ...) stops at the local minimum near (-1, 1, ...)."""
    w = workloads.load("rosenbrock", options={"dim": 10})
    optimizer = newton(list(w.model.parameters()))
    for _ in range(200):
        optimizer.step(lambda: w.loss(w.model, ()))
        if optimizer.diagnostics.done:
            break
    with torch.no_grad():
        metrics = w.evaluate(w.model, ())
    assert metrics["objective"] == pytest.approx(3.99, abs=0.01)
    assert metrics["grad_norm"] < 1e-6 and w.model.x[0] < -0.9

    extended = workloads.load("rosenbrock", options={"dim": 10, "variant": "extended"})
    steps, metrics = solve_full_batch(extended, newton, max_steps=40, backward=False)
    assert metrics["distance"] <= 1e-6, (steps, metrics)
