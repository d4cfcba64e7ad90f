"""The recorder: cadence, what each tier measures, hooks, labels, embeddings, failure handling."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

from gradguard.watch import RUN_GROUP, Recorder, Sink, embedding_params, group_labels

from .helpers import ListSink, assert_distribution_equal, exact_quantiles, make_params, set_grads


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
           steps: int, start: int = 1) -> None:
    for t in range(start, start + steps):
        set_grads(params, t)
        optimizer.step()


def test_tiers_follow_the_cadence() -> None:
    params = make_params()
    optimizer = torch.optim.Adam(params)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=3, full_every=6):
        _train(optimizer, params, 12)
    tiers = {r.step: r.tiers for r in sink.records if r.group == "default"}
    assert sorted(tiers) == list(range(1, 13))
    assert tiers[1] == ("step",)
    assert tiers[3] == ("step", "sampled")
    assert tiers[6] == ("step", "sampled", "full")
    assert tiers[12] == ("step", "sampled", "full")
    assert "effective_lr" not in sink.find(4).metrics
    assert "effective_lr" in sink.find(3).metrics and "param_norm" not in sink.find(3).metrics
    assert "param_norm" in sink.find(6).metrics


def test_every_step_values_are_lr_step_time_and_samples_per_second() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=None, full_every=None, batch_size=32):
        for t in range(1, 4):
            set_grads(params, t)
            optimizer.step()
            scheduler.step()
    assert [sink.find(t).metrics for t in (1, 2, 3)] == [{"lr": 0.1}, {"lr": 0.05},
                                                         {"lr": 0.025}]
    run = [r for r in sink.records if r.group == RUN_GROUP]
    assert [r.step for r in run] == [2, 3]  # a step time needs a previous step
    for r in run:
        assert r.metrics["step_time"] > 0
        assert r.metrics["samples_per_second"] == pytest.approx(32 / r.metrics["step_time"])


def test_cadence_of_none_turns_a_tier_off_and_bad_cadence_is_refused() -> None:
    params = make_params()
    optimizer = torch.optim.Adam(params)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=None, full_every=None):
        _train(optimizer, params, 3)
    assert all(r.tiers == ("step",) for r in sink.records)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="every must be an integer >= 1 or None"):
            Recorder(optimizer, every=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_size"):
        Recorder(optimizer, sample_size=0)


def test_sampled_statistics_are_exact_when_the_sample_covers_the_tensors() -> None:
    params = make_params()
    optimizer = torch.optim.Adagrad(params, lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=2, full_every=None, sample_size=64):
        _train(optimizer, params, 1)
        set_grads(params, 2)
        before = [p.detach().clone() for p in params]
        optimizer.step()
    metrics = sink.find(2).metrics
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)])
    w = torch.cat([b.reshape(-1) for b in before])
    assert metrics["grad_norm_estimate"] == pytest.approx(float(grad.norm()), rel=1e-12)
    assert metrics["update_norm"] == pytest.approx(float(update.norm()), rel=1e-12)
    assert metrics["update_ratio"] == pytest.approx(float(update.norm() / w.norm()), rel=1e-12)
    acc = torch.cat([optimizer.state[p]["sum"].reshape(-1) for p in params])
    assert_distribution_equal(metrics["accumulator"], exact_quantiles(acc))


def test_sampled_statistics_estimate_large_tensors_from_a_fixed_size_sample() -> None:
    big = torch.nn.Parameter(torch.randn(400, 250, dtype=torch.float64))
    small = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    optimizer = torch.optim.Adam([big, small], lr=0.01)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=1, full_every=1, sample_size=2000) as recorder:
        _train(optimizer, [big, small], 2)
        assert recorder._sampler.indices((0, 0), big).numel() == 2000
    sampled_and_exact = sink.find(2).metrics
    grad = math.sqrt(float(big.grad.square().sum() + small.grad.square().sum()))
    # the full tier replaced the estimate by the exact value; the estimate is checked below
    assert sampled_and_exact["grad_norm"] == pytest.approx(grad, rel=1e-12)
    sink2 = ListSink()
    with Recorder(optimizer, [sink2], every=1, full_every=None, sample_size=2000,
                  start_step=2):
        _train(optimizer, [big, small], 1, start=3)
    estimate = sink2.find(3).metrics
    exact = math.sqrt(float(big.grad.square().sum() + small.grad.square().sum()))
    assert estimate["grad_norm_estimate"] == pytest.approx(exact, rel=0.05)
    assert "grad_norm" not in estimate  # exact values and estimates are separate series
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in (big, small)])
    exact_median = float(v.median())
    assert estimate["accumulator"]["p50"] == pytest.approx(exact_median, rel=0.1)


def test_full_tier_counts_nonfinite_values_in_params_gradients_and_state() -> None:
    params = make_params()
    optimizer = torch.optim.Adam(params)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=None, full_every=2):
        _train(optimizer, params, 1)
        set_grads(params, 2)
        params[0].grad[0, 0] = float("nan")
        params[1].grad[3] = float("inf")
        optimizer.step()  # the NaN/Inf spread into params and state
    metrics = sink.find(2).metrics
    assert metrics["nonfinite_gradients"] == 2
    assert metrics["nonfinite_params"] == sum(
        int((~torch.isfinite(p)).sum()) for p in params)
    assert metrics["nonfinite_state"] == sum(
        int((~torch.isfinite(v)).sum()) for p in params for v in optimizer.state[p].values())
    assert metrics["nonfinite_params"] >= 2 and metrics["nonfinite_state"] >= 2
    assert math.isnan(metrics["param_norm"])


def test_accumulator_growth_is_the_mean_change_per_step() -> None:
    params = make_params()
    optimizer = torch.optim.Adagrad(params, lr=0.1)
    sink = ListSink()
    means = {}
    with Recorder(optimizer, [sink], every=None, full_every=2):
        for t in range(1, 7):
            set_grads(params, t)
            optimizer.step()
            acc = torch.cat([optimizer.state[p]["sum"].reshape(-1) for p in params])
            means[t] = float(acc.mean())
    assert "accumulator_growth" not in sink.find(2).metrics  # nothing to compare with yet
    assert sink.find(4).metrics["accumulator_growth"] == pytest.approx(
        (means[4] - means[2]) / 2, rel=1e-12)
    assert sink.find(6).metrics["accumulator_mean"] == pytest.approx(means[6], rel=1e-12)


def test_log_emits_run_wide_user_values_at_once() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink]) as recorder:
        recorder.log(7, loss=torch.tensor(0.25), accuracy=0.5, tokens=1000)
        assert sink.records[-1].step == 7
        assert sink.records[-1].group == RUN_GROUP
        assert sink.records[-1].tiers == ("log",)
        assert sink.records[-1].metrics == {"loss": 0.25, "accuracy": 0.5, "tokens": 1000.0}
        with pytest.raises(TypeError, match="'bad'"):
            recorder.log(8, bad="high")
        with pytest.raises(TypeError, match="'vector'"):
            recorder.log(8, vector=torch.ones(3))


def test_observed_gradients_are_emitted_at_once_and_not_recomputed() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=None, full_every=1) as recorder:
        set_grads(params, 1)
        recorder.observe_gradients(norm=torch.tensor(3.5), nonfinite=0)
        assert sink.records[-1].step == 1 and sink.records[-1].group == RUN_GROUP
        assert sink.records[-1].metrics == {"grad_norm": 3.5, "nonfinite_gradients": 0}
        recorder.observe_gradients(norm=1.25, group="default")
        optimizer.step()
        metrics = sink.find(1).metrics
        assert "grad_norm" not in metrics and "grad_norm_estimate" not in metrics
        set_grads(params, 2)
        optimizer.step()
        assert "grad_norm" in sink.find(2).metrics
        # a skipped step: the guard reports and never calls step()
        recorder.observe_gradients(norm=float("nan"), nonfinite=4)
        assert sink.records[-1].step == 3 and recorder.step == 2


def test_group_labels_come_from_names_else_positions() -> None:
    assert group_labels([{"lr": 1}]) == ["default"]
    assert group_labels([{"lr": 1}, {"lr": 2}]) == ["group0", "group1"]
    assert group_labels([{"name": "embeddings"}, {"lr": 2}]) == ["embeddings", "group1"]
    with pytest.raises(ValueError, match="unique"):
        group_labels([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="reserved"):
        group_labels([{"name": "all"}])


def test_each_group_gets_its_own_record() -> None:
    a, b = make_params(0, [(4, 3)]), make_params(1, [(5,)])
    optimizer = torch.optim.Adam([{"params": a, "name": "dense", "lr": 0.1},
                                  {"params": b, "lr": 0.2}])
    sink = ListSink()
    with Recorder(optimizer, [sink], every=1, full_every=1):
        _train(optimizer, a + b, 2)
    assert sink.find(2, "dense").metrics["lr"] == 0.1
    assert sink.find(2, "group1").metrics["lr"] == 0.2
    assert sink.find(2, "dense").metrics["param_norm"] == pytest.approx(float(a[0].detach().norm()))
    assert sink.config["dense.lr"] == "0.1" and sink.config["group1.lr"] == "0.2"
    assert sink.config["optimizer"] == "torch.optim.adam.Adam"


def test_detach_stops_recording_and_close_closes_sinks_once() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    sink = ListSink()
    recorder = Recorder(optimizer, [sink])
    _train(optimizer, params, 1)
    recorder.detach()
    _train(optimizer, params, 1, start=2)
    assert recorder.step == 1 and max(r.step for r in sink.records) == 1
    recorder.close()
    recorder.close()
    assert sink.closed


def test_start_step_continues_a_resumed_run() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=10, full_every=None, start_step=99):
        _train(optimizer, params, 1)
    assert sink.find(100).tiers == ("step", "sampled")


def test_embedding_rows_touched_and_never_updated_with_dense_gradients() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=None, full_every=2,
                  embeddings=embedding_params(model)):
        for ids in ([1, 2], [2, 5], [5, 6], [6, 6]):
            optimizer.zero_grad()
            model(torch.tensor(ids)).sum().backward()
            optimizer.step()
    first, second = sink.find(2).metrics, sink.find(4).metrics
    assert first["embedding_rows"] == 20
    assert first["embedding_rows_touched"] == 3  # rows 1, 2, 5
    assert first["embedding_rows_never_updated"] == 17
    assert second["embedding_rows_touched"] == 2  # rows 5, 6
    assert second["embedding_rows_never_updated"] == 16


def test_embedding_row_update_counts_from_the_optimizer_state() -> None:
    class Counting(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            super().step(closure)
            for p in self.param_groups[0]["params"]:
                if p.dim() == 2:
                    counts = self.state[p].setdefault(
                        "row_update_count", torch.zeros(p.shape[0], dtype=torch.int64))
                    counts += (p.grad != 0).any(1)

    table = torch.nn.Parameter(torch.randn(10, 2, dtype=torch.float64))
    optimizer = Counting([table], lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=None, full_every=3):
        for rows in ([0, 1], [1], [1, 9], [4], [4], [4, 1]):
            grad = torch.zeros(10, 2, dtype=torch.float64)
            grad[rows] = 1.0
            table.grad = grad
            optimizer.step()
            if optimizer.state[table]["row_update_count"].sum() == 5:  # after step 3
                counts_at_3 = optimizer.state[table]["row_update_count"].clone()
    first, second = sink.find(3).metrics, sink.find(6).metrics
    assert_distribution_equal(first["embedding_row_update_count"], exact_quantiles(counts_at_3))
    assert_distribution_equal(second["embedding_row_update_count"],
                              exact_quantiles(optimizer.state[table]["row_update_count"]))
    assert first["embedding_rows"] == 10
    assert first["embedding_rows_touched"] == 3  # rows 0, 1, 9 since the optimizer started
    assert first["embedding_rows_never_updated"] == 7
    assert second["embedding_rows_touched"] == 2  # rows 4 and 1 since step 3
    assert second["embedding_rows_never_updated"] == 6


def test_a_failing_sink_warns_once_and_training_goes_on() -> None:
    class Broken(Sink):
        def write(self, records: Any) -> None:
            raise OSError("disk full")

    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    good = ListSink()
    with pytest.warns(RuntimeWarning, match="disk full"), \
            Recorder(optimizer, [Broken(), good]) as recorder:
        _train(optimizer, params, 3)
    assert recorder.sink_errors == {0: 3}
    assert len([r for r in good.records if r.group == "default"]) == 3

    strict = Recorder(optimizer, [Broken()], on_sink_error="raise")
    with pytest.raises(OSError, match="disk full"):
        _train(optimizer, params, 1)
    strict.close()


def test_no_warning_and_no_state_entries_for_a_plain_run() -> None:
    params = make_params()
    optimizer = torch.optim.SGD(params, lr=0.1)  # keeps no state without momentum
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Recorder(optimizer, [ListSink()], every=1, full_every=1):
            _train(optimizer, params, 2)
    assert len(optimizer.state) == 0  # the recorder never creates state entries


def test_a_step_that_calls_super_step_counts_once() -> None:
    class Wrapped(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            return super().step(closure)  # torch runs this optimizer's hooks twice

    params = make_params()
    torch.optim.SGD(params, lr=0.1)  # makes sure SGD.step itself is hooked too
    optimizer = Wrapped(params, lr=0.1)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=1, full_every=None) as recorder:
        _train(optimizer, params, 3)
    assert recorder.step == 3
    assert [r.step for r in sink.records if r.group == "default"] == [1, 2, 3]


def test_a_step_that_raised_does_not_stop_the_recording() -> None:
    params = make_params()
    optimizer = torch.optim.Adam(params)
    sink = ListSink()
    with Recorder(optimizer, [sink], every=1, full_every=None) as recorder:
        _train(optimizer, params, 1)
        def failing_closure() -> float:
            raise RuntimeError("bad batch")

        with pytest.raises(RuntimeError, match="bad batch"):  # raised after the pre hooks
            optimizer.step(failing_closure)
        _train(optimizer, params, 2, start=2)
    assert recorder.step == 3
    assert "effective_lr" in sink.find(3).metrics


def test_a_hybrid_is_measured_group_by_group_with_each_inner_optimizers_schema() -> None:
    """Hybrid(Adagrad, AdamW) records what one recorder per inner optimizer records."""
    import gradguard.optim as go

    def run(hybrid: bool) -> dict[str, dict[str, Any]]:
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))
        inner = {"tables": go.Adagrad([a], lr=0.1), "dense": go.AdamW([b], lr=0.01)}
        for name, opt in inner.items():
            opt.param_groups[0]["name"] = name
        sinks = {name: ListSink() for name in inner}
        if hybrid:
            sink = ListSink()
            recorders = [Recorder(go.Hybrid(inner), [sink], every=1, full_every=1)]
        else:
            recorders = [Recorder(opt, [sinks[n]], every=1, full_every=1)
                         for n, opt in inner.items()]
        for _ in range(3):
            a.grad, b.grad = torch.randn(6, 4), torch.randn(5)
            for opt in inner.values():
                opt.step() if not hybrid else None
            if hybrid:
                recorders[0].optimizer.step()
        records = sink.records if hybrid else [r for s in sinks.values() for r in s.records]
        return {r.group: r.metrics for r in records if r.step == 3 and "effective_lr" in r.metrics}

    together, apart = run(True), run(False)
    assert set(together) == {"tables", "dense"}
    for group in ("tables", "dense"):
        assert together[group]["effective_lr"] == apart[group]["effective_lr"]
        assert together[group]["accumulator"] == apart[group]["accumulator"]
