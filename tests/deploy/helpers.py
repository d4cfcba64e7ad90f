"""Shared by the deploy tests: the operations kit's files, promtool, the metric catalogue, PromQL.

The catalogue of exported metric names is derived from the code, never written by hand:
the built-in metrics (``gradguard.watch.METRICS``), every value logged through
``recorder.log`` anywhere in ``src/gradguard`` (found by reading the source), all pushed
through a real ``PrometheusSink`` whose registry then says which sample names it exposes.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "gradguard"
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "gradguard-alerts.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = DEPLOY / "grafana" / "provisioning"
RUNBOOKS = ROOT / "docs" / "runbooks"

REQUIRE_ENV = "GRADGUARD_REQUIRE_PROMETHEUS"

PENDING: dict[str, str] = {}
"""Names the alert rules use before the code exports them (rules only, never dashboards)."""

PROMETHEUS_SERIES = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added", "ALERTS", "ALERTS_FOR_STATE",
})
"""Series Prometheus itself writes for every target and alerting rule."""


def tool(name: str) -> str:
    """The path of a Prometheus binary; skip without it, or fail when it is required."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = (f"{name} is not on PATH (on Debian: apt-get install prometheus; .ci/run installs "
              "it)")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it")
    pytest.skip(reason)


def run(command: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


# ============================================================== the rules
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    """Every rule of gradguard-alerts.yml, each with its group's name under ``"group"``."""
    return [{**rule, "group": group["name"]}
            for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def records() -> list[dict[str, Any]]:
    return [r for r in rules() if "record" in r]


# ============================================================== the dashboards
GRAFANA_VARIABLES = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600",
    "job": ".*", "instance": ".*", "group": ".*",
}
"""Values substituted for Grafana's variables before an expression is parsed."""


@dataclass(frozen=True)
class Query:
    """One PromQL expression in a dashboard: where it is and what it says."""

    where: str
    expr: str

    def promql(self) -> str:
        """The expression with Grafana's ``$var`` / ``${var}`` replaced by plain values."""
        def value(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            if name not in GRAFANA_VARIABLES:
                raise KeyError(f"{self.where}: unknown Grafana variable ${name} in {self.expr!r}")
            return GRAFANA_VARIABLES[name]

        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, self.expr)


LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


def dashboard_queries(path: Path) -> Iterator[Query]:
    """Every query of a dashboard: panel targets, template variables, annotations."""
    board = json.loads(path.read_text(encoding="utf-8"))
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield Query(f"{path.name}: panel {panel.get('title')!r} "
                            f"target {target.get('refId')}", target["expr"])
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = LABEL_VALUES.match(text)
        if match:
            text = match.group(1)
        if text:
            yield Query(f"{path.name}: variable ${variable.get('name')}", text)
    for note in board.get("annotations", {}).get("list", []):
        if note.get("expr"):
            yield Query(f"{path.name}: annotation {note.get('name')!r}", note["expr"])


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows collapse their panels inside


def all_panels(path: Path) -> list[dict[str, Any]]:
    return list(_panels(json.loads(path.read_text(encoding="utf-8")).get("panels", [])))


# ============================================================== PromQL metric names
@dataclass(frozen=True)
class Selector:
    """A vector selector: a metric name, or ``__name__`` matchers (op, value) in braces."""

    name: str | None
    name_matchers: tuple[tuple[str, str], ...] = ()


KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "atan2", "inf", "nan", "Inf", "NaN",
})
AGGREGATORS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
})
_UNIT = r"(?:ms|s|m|h|d|w|y)"
_TOKEN = re.compile(rf"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\d+{_UNIT}(?:\d+{_UNIT})*(?![\w.]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<space>\s+|\#[^\n]*)
  | (?P<other>=~|!~|!=|==|>=|<=|.)
""", re.X)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
    return out


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return str(json.loads('"' + text[1:-1].replace('\\"', '"').replace('"', '\\"') + '"'))


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression (a small tokenizer, not a full parser).

    Skips strings, range and subquery brackets, function and aggregator names, the label
    lists after ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right``, and
    durations after ``offset``. A bare ``{...}`` selector is reported with its ``__name__``
    matchers (none: a selector that names no metric).
    """
    tokens = _tokens(expr)
    found: list[Selector] = []
    i = 0

    def skip_group(start: int, open_: str, close: str) -> int:
        depth = 0
        for j in range(start, len(tokens)):
            if tokens[j][1] == open_:
                depth += 1
            elif tokens[j][1] == close:
                depth -= 1
                if depth == 0:
                    return j + 1
        raise ValueError(f"unbalanced {open_!r} in {expr!r}")

    def matchers(start: int) -> tuple[tuple[tuple[str, str], ...], int]:
        end = skip_group(start, "{", "}")
        inner = tokens[start + 1:end - 1]
        names = []
        for k in range(len(inner) - 2):
            if inner[k] == ("ident", "__name__") and inner[k + 2][0] == "string":
                names.append((inner[k + 1][1], _unquote(inner[k + 2][1])))
        return tuple(names), end

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":
            i = skip_group(i, "[", "]")
        elif text == "{":
            names, i = matchers(i)
            found.append(Selector(None, names))
        elif kind == "ident" and text in KEYWORDS:
            i += 1
            if text in ("by", "without", "on", "ignoring", "group_left", "group_right") \
                    and following == "(":
                i = skip_group(i, "(", ")")
        elif kind == "ident" and (following == "(" or
                                  (text in AGGREGATORS and following in ("by", "without"))):
            i += 1  # a function or an aggregation
        elif kind == "ident":
            i += 1
            names: tuple[tuple[str, str], ...] = ()
            if following == "{":
                names, i = matchers(i)
            found.append(Selector(text, names))
        else:
            i += 1
    return found


# ============================================================== the catalogue
@dataclass(frozen=True)
class Catalogue:
    """Prometheus sample names gradguard exports: exact names and run-time patterns."""

    names: frozenset[str]
    patterns: tuple[str, ...]
    """Full-match regexes for names with a part known only at run time (``eval_<metric>``)."""
    logged: frozenset[str]
    """The value names logged through ``recorder.log`` (exact ones), for reports."""

    def exports(self, name: str) -> bool:
        return name in self.names or any(re.fullmatch(p, name) for p in self.patterns)


_PLACEHOLDER = "\x00"


def _fstring(node: ast.JoinedStr) -> list[str | ast.expr]:
    parts: list[str | ast.expr] = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value))
        elif isinstance(value, ast.FormattedValue):
            parts.append(value.value)
    return parts


def _receiver(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _literal_args(tree: ast.AST, function: str) -> set[str]:
    """String literals passed as the first argument to calls of ``function`` (or ``.function``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and _receiver(node.func) == function:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.add(arg.value)
    return out


def _placeholder_values(module: Path, tree: ast.AST, expression: str) -> set[str] | None:
    """What a placeholder of a logged name can be, where the code says so; None: anything."""
    if module == SRC / "guard" / "guard.py" and expression == "action":
        # Guard._count(action) logs guard_{action}_total for the actions a policy can name
        # and those the guard counts by literal name (_count("skip_batch"), ...)
        from gradguard.guard import ACTIONS

        return set(ACTIONS) | _literal_args(tree, "_count")
    return None


def logged_names() -> tuple[set[str], set[str]]:
    """Names given to ``...recorder.log(step, name=value, **mapping)`` in src/gradguard.

    Returns (exact names, templates); a template has a placeholder (``\\x00``) where the
    code fills in a value known only at run time (``eval_\\x00``). A ``**mapping`` is read
    from a dict display, a dict comprehension, a local variable assigned one, or the dict
    displays returned by the function or property it calls (``**agreement.spread``).
    """
    modules = {module: ast.parse(module.read_text(encoding="utf-8"), str(module))
               for module in sorted(SRC.rglob("*.py"))}
    functions: dict[str, list[tuple[Path, ast.AST, ast.FunctionDef | ast.AsyncFunctionDef]]] = {}
    for module, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.setdefault(node.name, []).append((module, tree, node))
    exact: set[str] = set()
    templates: set[str] = set()

    def keys_of(value: ast.expr, module: Path, tree: ast.AST, scope: ast.AST,
                depth: int = 0) -> list[tuple[Path, ast.AST, ast.expr | None]] | None:
        """The key expressions of the mapping ``value`` evaluates to; None: unreadable."""
        if depth > 5:
            return None
        if isinstance(value, ast.Dict):
            return [(module, tree, key) for key in value.keys]
        if isinstance(value, ast.DictComp):
            return [(module, tree, value.key)]
        if isinstance(value, ast.IfExp):
            found = [keys_of(v, module, tree, scope, depth + 1) for v in (value.body, value.orelse)]
            return None if None in found else [k for part in found for k in part or []]
        if isinstance(value, ast.Name):
            assigned = [node.value for node in ast.walk(scope) if isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == value.id
                                for t in node.targets)]
            if not assigned:
                return None
            found = [keys_of(v, module, tree, scope, depth + 1) for v in assigned]
            return None if None in found else [k for part in found for k in part or []]
        name = _receiver(value.func if isinstance(value, ast.Call) else value)
        out: list[tuple[Path, ast.AST, ast.expr | None]] = []
        for where, where_tree, function in functions.get(name, []):
            for node in ast.walk(function):
                if isinstance(node, ast.Return) and node.value is not None \
                        and not (isinstance(node.value, ast.Constant) and node.value.value is None):
                    part = keys_of(node.value, where, where_tree, function, depth + 1)
                    if part is None:
                        return None
                    out += part
        return out or None

    for module, tree in modules.items():
        for scope in ast.walk(tree):
            if not isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module):
                continue
            body = scope.body if isinstance(scope, ast.Module) else [scope]
            calls = [node for stmt in body for node in ast.walk(stmt)
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                     and node.func.attr == "log" and "recorder" in _receiver(node.func.value)]
            for node in calls:
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        exact.add(keyword.arg)
                        continue
                    keys = keys_of(keyword.value, module, tree, scope)
                    if keys is None:
                        raise AssertionError(
                            f"{module.relative_to(ROOT)}:{node.lineno}: recorder.log(**"
                            f"{ast.unparse(keyword.value)}) names values the catalogue cannot "
                            "read; teach tests/deploy/helpers.py:logged_names where they come from")
                    for where, where_tree, key in keys:
                        if isinstance(key, ast.Constant) and isinstance(key.value, str):
                            exact.add(key.value)
                        elif isinstance(key, ast.JoinedStr):
                            names, template = _expand(where, where_tree, _fstring(key))
                            exact |= names
                            if template is not None:
                                templates.add(template)
                        else:
                            raise AssertionError(
                                f"{where.relative_to(ROOT)}: a value logged through "
                                f"recorder.log is named by {ast.unparse(key) if key else '**'}, "
                                "which the catalogue cannot read")
    return exact, templates


def _expand(module: Path, tree: ast.AST, parts: list[str | ast.expr],
            ) -> tuple[set[str], str | None]:
    names = [""]
    template = ""
    for part in parts:
        if isinstance(part, str):
            names = [n + part for n in names]
            template += part
            continue
        values = _placeholder_values(module, tree, ast.unparse(part))
        if values is None:
            return set(), template + _PLACEHOLDER + "".join(
                p if isinstance(p, str) else _PLACEHOLDER for p in parts[parts.index(part) + 1:])
        names = [n + v for n in names for v in sorted(values)]
        template += _PLACEHOLDER
    return set(names), None


@functools.cache
def catalogue() -> Catalogue:
    """Every sample name a gradguard run can export, by writing them through PrometheusSink."""
    from prometheus_client import CollectorRegistry

    from gradguard.watch import METRICS, PrometheusSink, Record, prometheus_name
    from gradguard.watch.quantities import QUANTILES

    exact, templates = logged_names()
    metrics: dict[str, Any] = {}
    for name, info in METRICS.items():
        if info.kind == "distribution":
            metrics[name] = {key: 1.0 for key, _ in QUANTILES}
        else:
            metrics[name] = 1.0
    metrics.update({name: 1.0 for name in exact if name not in METRICS})
    registry = CollectorRegistry()
    sink = PrometheusSink(0, registry=registry, serve=False)
    sink.write([Record(1, 0.0, "all", ("log",), metrics)])
    names = {sample.name for family in registry.collect() for sample in family.samples}
    patterns = []
    for template in templates:
        exported = prometheus_name(template.replace(_PLACEHOLDER, "PLACEHOLDER"))
        patterns.append(re.escape(exported).replace("PLACEHOLDER", "[a-zA-Z0-9_]+"))
    return Catalogue(frozenset(names), tuple(sorted(patterns)), frozenset(exact))
