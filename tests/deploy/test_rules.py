"""The Prometheus rules: promtool checks and unit-tests them; every alert can be operated.

``promtool`` comes with the Debian package ``prometheus`` (``.ci/run`` installs it). Without
it the promtool tests skip, unless ``GRADGUARD_REQUIRE_PROMETHEUS=1`` turns the skip into a
failure. The other tests read the YAML and the code only.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from .helpers import (
    PENDING,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    ROOT,
    RULE_TESTS,
    RULES,
    RUNBOOKS,
    alerts,
    catalogue,
    load_yaml,
    records,
    rules,
    run,
    selectors,
    tool,
)

ALERT_NAMES = [a["alert"] for a in alerts()]
RECORD_NAMES = {r["record"] for r in records()}


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool")


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_checks_the_example_configuration(promtool: str) -> None:
    result = run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gradguard-alerts.yml" in result.stdout  # the rules are loaded from beside it


def test_promtool_unit_tests_of_the_rules_pass(promtool: str) -> None:
    assert RULE_TESTS, "no promtool test files in deploy/prometheus/tests"
    result = run([promtool, "test", "rules", *map(str, RULE_TESTS)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def _rule_tests() -> list[dict[str, Any]]:
    return [test for path in RULE_TESTS for test in load_yaml(path)["tests"]]


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_every_alert_is_unit_tested_firing_and_not_firing(name: str) -> None:
    cases = [case for test in _rule_tests() for case in test.get("alert_rule_test", [])
             if case["alertname"] == name]
    assert any(case.get("exp_alerts") for case in cases), f"{name}: no test where it fires"
    assert any(not case.get("exp_alerts") for case in cases), \
        f"{name}: no test where it stays quiet"


@pytest.mark.parametrize("name", sorted(RECORD_NAMES))
def test_every_recording_rule_is_unit_tested(name: str) -> None:
    tested = {s.name for test in _rule_tests() for case in test.get("promql_expr_test", [])
              for s in selectors(case["expr"])}
    assert name in tested, f"{name}: no promql_expr_test evaluates it"


@pytest.mark.parametrize("alert", alerts(), ids=ALERT_NAMES)
def test_every_alert_has_a_severity_a_failure_mode_and_its_annotations(
        alert: dict[str, Any]) -> None:
    labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
    assert labels.get("severity") in ("page", "ticket")
    assert re.fullmatch(r"F([1-9]|10)", labels.get("failure_mode", ""))
    # the dashboards list ALERTS{alertname=~"Gradguard.*"}
    assert alert["alert"].startswith("Gradguard")
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key), f"{alert['alert']}: no {key} annotation"


@pytest.mark.parametrize("alert", alerts(), ids=ALERT_NAMES)
def test_every_alert_has_a_runbook_page_that_is_about_it(alert: dict[str, Any]) -> None:
    url = alert["annotations"]["runbook_url"]
    assert url.startswith("docs/runbooks/") and url.endswith(".md"), url
    page = ROOT / url
    assert page.is_file(), f"{alert['alert']}: {url} does not exist"
    text = page.read_text(encoding="utf-8")
    assert alert["alert"] in text
    for section in ("## What it means", "## Confirm", "## What gradguard already did",
                    "## What to do"):
        assert section in text, f"{url}: no {section!r} section"


def test_every_runbook_page_belongs_to_an_alert() -> None:
    linked = {alert["annotations"]["runbook_url"] for alert in alerts()}
    pages = {f"docs/runbooks/{p.name}" for p in RUNBOOKS.glob("*.md") if p.name != "README.md"}
    assert pages == linked
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    for name in ALERT_NAMES:
        assert name in index, f"docs/runbooks/README.md does not list {name}"


def test_the_operations_guide_lists_every_alert() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for alert in alerts():
        assert re.search(rf"\|\s*`{alert['alert']}`\s*\|\s*{alert['labels']['severity']}\s*\|",
                         guide), f"docs/operations.md: no table row for {alert['alert']}"


def test_rules_read_only_exported_metrics() -> None:
    exported = catalogue()
    problems = []
    for rule in rules():
        name = rule.get("alert") or rule.get("record")
        for selector in selectors(rule["expr"]):
            if selector.name is None:
                if not selector.name_matchers:
                    problems.append(f"{name}: a selector that names no metric")
                for op, regex in selector.name_matchers:
                    if op != "=~" or not any(re.fullmatch(regex, n) for n in exported.names):
                        problems.append(f"{name}: __name__{op}{regex!r} matches no exported metric")
            elif not (exported.exports(selector.name) or selector.name in RECORD_NAMES
                      or selector.name in PROMETHEUS_SERIES or selector.name in PENDING):
                problems.append(f"{name}: {selector.name} is not exported by gradguard")
    assert not problems, "\n".join(problems)


def test_recording_rules_follow_the_naming_convention() -> None:
    for name in RECORD_NAMES:
        # level:metric:operations
        assert re.fullmatch(r"gradguard:[a-z0-9_]+:[a-z0-9_]+", name), name
