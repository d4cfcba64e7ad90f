"""End to end: a real Prometheus scrapes a live `gradguard train` run and its NaNs raise the alert.

The run trains a user workload (a module this test writes, loaded as ``nanwork:make``) whose
training data has NaN rows; the guard skips those steps and counts their non-finite
gradient elements, the run serves them on ``[recorder] prometheus_port``, and Prometheus
(the Debian package's server, on 127.0.0.1, scraping and evaluating every second with
deploy/prometheus/gradguard-alerts.yml loaded) must show ``GradguardNonFiniteGradients``
pending or firing through its HTTP API. Both processes run in their own process groups,
which the test kills, and it gives up after ``DEADLINE`` seconds.

Skipped without the ``prometheus`` binary unless ``GRADGUARD_REQUIRE_PROMETHEUS=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from gradguard.run import config

from .helpers import ROOT, RULES, catalogue, tool

DEADLINE = 50.0
"""Seconds from the start until the alert must show (the run imports torch first: ~5 s)."""

WORKLOAD = '''
"""A linear regression whose training rows are NaN with probability nan_fraction."""
import time

import torch

from gradguard.run import TensorData, Workload


def make(*, seed: int = 0, n: int = 4096, nan_fraction: float = 0.02,
         sleep: float = 0.003) -> Workload:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = x @ w
    x[torch.rand(n, generator=g) < nan_fraction, 0] = float("nan")
    x_eval = torch.randn(512, 8, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 1)

    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        time.sleep(sleep)  # keeps the run alive long enough to be scraped
        xb, yb = batch
        return torch.nn.functional.mse_loss(model(xb), yb)

    def evaluate(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        xb, yb = batch
        return {"mse": float(torch.nn.functional.mse_loss(model(xb), yb))}

    return Workload(name="nanwork", model=model, train=TensorData((x, y)),
                    eval=TensorData((x_eval, x_eval @ w)), loss=loss, evaluate=evaluate,
                    primary_metric="mse", mode="min")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a foreign process reused the id
        return False
    return True


def stop_group(process: subprocess.Popen[bytes], first: signal.Signals, grace: float) -> None:
    """Signal the process group, wait ``grace`` s, SIGKILL what is left, reap, check it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(process.pid), f"processes of group {process.pid} outlived the test"


@contextlib.contextmanager
def process_group(command: list[str], log: IO[bytes], *, env: dict[str, str] | None = None,
                  stop_signal: signal.Signals = signal.SIGTERM,
                  ) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    try:
        yield process
    finally:
        stop_group(process, stop_signal, grace=10)


def api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_nan_rows_in_a_live_run_raise_the_nonfinite_alert_in_a_real_prometheus(
        tmp_path: Path) -> None:
    prometheus = tool("prometheus")
    started = time.monotonic()
    metrics_port, web_port = free_port(), free_port()
    (tmp_path / "nanwork.py").write_text(WORKLOAD)
    run_config = tmp_path / "nan.toml"
    run_config.write_text(config.dumps({
        "run": {"output": str(tmp_path / "run"), "seed": 0, "threads": 1},
        "workload": {"name": "nanwork:make"},
        "optimizer": {"name": "adagrad", "lr": 0.05},
        "train": {"steps": 20000, "batch_size": 16, "eval_every": 2000, "log_every": 10},
        "recorder": {"every": 10, "full_every": 100, "prometheus_port": metrics_port},
        # the NaN batches keep coming: no escalation to rollbacks and a halt
        "guard": {"policy": {"escalation": []}},
    }))
    server_config = tmp_path / "prometheus.yml"
    server_config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "gradguard",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    train_log, server_log = tmp_path / "train.log", tmp_path / "prometheus.log"
    with train_log.open("wb") as tlog, server_log.open("wb") as slog, \
            process_group([sys.executable, "-m", "gradguard", "train", str(run_config), "-q"],
                          tlog, env=env, stop_signal=signal.SIGKILL) as trainer, \
            process_group([prometheus, f"--config.file={server_config}",
                           f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{web_port}",
                           "--log.level=warn"], slog) as server:

        def diagnosis(why: str) -> str:
            return (f"{why} after {time.monotonic() - started:.1f} s\n--- gradguard train:\n"
                    f"{tail(train_log)}\n--- prometheus:\n{tail(server_log)}")

        found: list[dict[str, Any]] = []
        first_scrape = None
        while not found:
            if time.monotonic() - started > DEADLINE:
                with contextlib.suppress(OSError, AssertionError):
                    targets = api(web_port, "/api/v1/targets")["activeTargets"]
                    pytest.fail(diagnosis(f"no alert; targets: {targets}"))
                pytest.fail(diagnosis("no alert"))
            if trainer.poll() is not None:
                pytest.fail(diagnosis(f"the run ended (exit {trainer.returncode})"))
            if server.poll() is not None:
                pytest.fail(diagnosis(f"prometheus ended (exit {server.returncode})"))
            time.sleep(0.5)
            try:
                if first_scrape is None:
                    up = api(web_port, "/api/v1/query?query=up")["result"]
                    if up and up[0]["value"][1] == "1":
                        first_scrape = time.monotonic() - started
                alerts = api(web_port, "/api/v1/alerts")["alerts"]
            except (OSError, urllib.error.URLError):
                continue  # not listening yet
            found = [a for a in alerts if a["labels"]["alertname"] == "GradguardNonFiniteGradients"]
        seen = time.monotonic() - started

        (alert,) = found
        assert alert["state"] in ("pending", "firing")
        assert alert["labels"] == {"alertname": "GradguardNonFiniteGradients", "severity": "page",
                                   "failure_mode": "F2", "job": "gradguard",
                                   "instance": f"127.0.0.1:{metrics_port}"}
        assert alert["annotations"]["runbook_url"] == "docs/runbooks/nonfinite-gradients.md"
        assert re.match(r"\d+ non-finite gradient elements", alert["annotations"]["description"])

        # the non-finite counter went up between scrapes, in the guard's series (group "all")
        query = "increase(gradguard_nonfinite_gradients_total[5m])"
        result = api(web_port, "/api/v1/query?query=" + urllib.request.quote(query))["result"]
        by_group = {r["metric"]["group"]: float(r["value"][1]) for r in result}
        assert by_group.get("all", 0.0) > 0, by_group

        # every rule evaluated without error against the live series
        broken = [f"{rule['name']}: {rule.get('lastError')}"
                  for group in api(web_port, "/api/v1/rules")["groups"]
                  for rule in group["rules"]
                  if rule["health"] not in ("ok", "unknown") or rule.get("lastError")]
        assert not broken, broken

        # every gradguard series Prometheus scraped is in the catalogue derived from the code
        names = api(web_port, "/api/v1/label/__name__/values")
        scraped = [n for n in names if n.startswith("gradguard_")]
        exported = catalogue()
        assert "gradguard_guard_skip_total" in scraped
        assert [n for n in scraped if not exported.exports(n)] == []
    print(f"\nfirst successful scrape {first_scrape or float('nan'):.1f} s, alert {alert['state']} "
          f"{seen:.1f} s, both process groups stopped {time.monotonic() - started:.1f} s "
          "after the start")
