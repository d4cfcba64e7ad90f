"""Each sink exercised for real and read back with its own ecosystem's reader."""

from __future__ import annotations

import math
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from gradguard.watch import (
    JsonlSink,
    MlflowSink,
    PrometheusSink,
    Record,
    Recorder,
    Sink,
    TensorBoardSink,
    read_jsonl,
)

from .helpers import make_params, set_grads


def _train_with(sink: Sink, steps: int = 4) -> list[torch.nn.Parameter]:
    params = make_params()
    optimizer = torch.optim.Adagrad(params, lr=0.1)
    with Recorder(optimizer, [sink], every=2, full_every=4, batch_size=8) as recorder:
        for t in range(1, steps + 1):
            set_grads(params, t)
            optimizer.step()
            recorder.log(t, loss=1.0 / t)
    return params


def test_jsonl_lines_parse_back_to_the_documented_schema(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.jsonl"
    _train_with(JsonlSink(path))
    records = read_jsonl(path)
    for r in records:
        assert set(r) == {"schema", "step", "wall_time", "group", "tiers", "metrics"}
        assert r["schema"] == 1 and isinstance(r["step"], int)
    full = next(r for r in records if r["step"] == 4 and r["group"] == "default")
    assert full["tiers"] == ["step", "sampled", "full"]
    assert set(full["metrics"]["effective_lr"]) == {"min", "p01", "p10", "p50", "p90", "p99",
                                                    "max"}
    assert full["metrics"]["lr"] == 0.1
    assert full["metrics"]["nonfinite_params"] == 0
    losses = {r["step"]: r["metrics"]["loss"] for r in records if "loss" in r["metrics"]}
    assert losses == {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25}


def test_jsonl_appends_and_encodes_non_finite_numbers_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    sink.write([Record(1, 0.0, "all", ("log",), {"loss": math.nan, "x": math.inf,
                                                  "d": {"min": -math.inf, "max": 1.0}})])
    sink.close()
    raw = path.read_text()
    assert '"loss":"NaN"' in raw and '"x":"Infinity"' in raw and '"min":"-Infinity"' in raw
    again = JsonlSink(path)  # appends by default
    again.write([Record(2, 0.0, "all", ("log",), {"loss": 1.0})])
    again.close()
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[0]["metrics"]["loss"]) and records[0]["metrics"]["x"] == math.inf
    assert records[0]["metrics"]["d"]["min"] == -math.inf


def test_jsonl_writes_in_the_background_and_reports_its_errors(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path, flush_interval=0.01)
    sink.write([Record(1, 0.0, "all", ("log",), {"loss": 1.0})])
    for _ in range(500):  # written by the background thread, without flush()
        if path.read_text():
            break
        time.sleep(0.01)
    assert read_jsonl(path)[0]["metrics"] == {"loss": 1.0}

    def broken(text: str) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(sink._file, "write", broken)
    sink.write([Record(2, 0.0, "all", ("log",), {"loss": 0.5})])
    with pytest.raises(OSError, match="disk full"):
        for _ in range(500):
            time.sleep(0.01)
            sink.write([])
    monkeypatch.undo()
    sink.write([Record(3, 0.0, "all", ("log",), {"loss": 0.25})])  # synchronous from now on
    sink.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train_with(TensorBoardSink(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0,
                                                                   "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "default/effective_lr/p50" in tags["scalars"]
    assert "all/loss" in tags["scalars"]
    assert [(e.step, e.value) for e in events.Scalars("default/lr")] == [
        (1, pytest.approx(0.1)), (2, pytest.approx(0.1)), (3, pytest.approx(0.1)),
        (4, pytest.approx(0.1))]
    assert [e.step for e in events.Scalars("default/param_norm")] == [4]
    assert [e.step for e in events.Histograms("default/effective_lr")] == [2, 4]
    histogram = events.Histograms("default/effective_lr")[-1].histogram_value
    assert histogram.num == sum(p.numel() for p in make_params())
    assert "gradguard/config/text_summary" in tags["tensors"]


def test_prometheus_endpoint_is_scraped_and_parsed(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    sink = PrometheusSink(port=0)
    assert sink.addr == "127.0.0.1" and sink.port > 0
    params = make_params()
    optimizer = torch.optim.Adagrad(params, lr=0.1)
    with Recorder(optimizer, [sink], every=2, full_every=2) as recorder:
        for t in range(1, 3):
            set_grads(params, t)
            recorder.observe_gradients(norm=2.0, nonfinite=3)
            optimizer.step()
        with urllib.request.urlopen(sink.url, timeout=10) as response:
            text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("gradguard_learning_rate", (("group", "default"),))] == 0.1
    assert samples[("gradguard_last_step", (("group", "default"),))] == 2
    quantile_labels = {dict(labels)["quantile"] for name, labels in samples
                       if name == "gradguard_effective_lr"}
    assert quantile_labels == {"0", "0.01", "0.1", "0.5", "0.9", "0.99", "1"}
    for name, labels in samples:
        assert {k for k, _ in labels} <= {"group", "quantile"}, (name, labels)
    assert families["gradguard_nonfinite_gradients"].type == "counter"
    assert samples[("gradguard_nonfinite_gradients_total", (("group", "all"),))] == 6
    assert samples[("gradguard_nonfinite_gradients_total", (("group", "default"),))] == 0
    assert samples[("gradguard_optimizer_state_bytes", (("group", "default"),))] > 0
    assert ("gradguard_step_seconds", (("group", "all"),)) in samples
    with pytest.raises(OSError):  # closed with the recorder
        urllib.request.urlopen(sink.url, timeout=2)


def test_mlflow_run_reads_back_through_the_client(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MlflowSink(experiment="watch-test", run_name="adagrad", tracking_uri=uri)
    _train_with(sink)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer"] == "torch.optim.adagrad.Adagrad"
    assert run.data.params["default.lr"] == "0.1"
    assert run.data.params["watch.every"] == "2"
    history = client.get_metric_history(sink.run_id, "default/effective_lr/p50")
    assert sorted(m.step for m in history) == [2, 4]
    loss = {m.step: m.value for m in client.get_metric_history(sink.run_id, "all/loss")}
    assert loss == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3), 4: 0.25}
    assert [m.step for m in client.get_metric_history(sink.run_id, "default/param_norm")] == [4]


@pytest.mark.parametrize(("module", "extra", "make"), [
    ("tensorboard", "tensorboard", lambda p: TensorBoardSink(p)),
    ("prometheus_client", "prometheus", lambda p: PrometheusSink(0)),
    ("mlflow.tracking", "mlflow", lambda p: MlflowSink(tracking_uri=f"sqlite:///{p}/x.db")),
])
def test_a_missing_extra_names_the_package_to_install(
        module: str, extra: str, make: object, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ImportError, match=rf"pip install 'gradguard\[{extra}\]'"):
        make(tmp_path)  # type: ignore[operator]
