"""examples/grafana-dashboard.json: valid JSON in Grafana's dashboard shape, and every metric and
label its PromQL names is one docs/OBSERVABILITY.md documents, so the dashboard cannot drift from
the metrics the management endpoint exports.

The doc's metric tables are parsed (a row per metric: its name, type and labels), not copied
here; the PromQL is read by a small extractor (strings, label matchers, ranges and grouping
clauses taken out, then every identifier that is not a function, a keyword or a Grafana
variable is a metric name), itself tested below on the shapes the dashboard uses.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "examples" / "grafana-dashboard.json"
DOC = REPO / "docs" / "OBSERVABILITY.md"
DATASOURCE_UID = "${DS_PROMETHEUS}"
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every scraped series
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
PROMQL_KEYWORDS |= {"group_left", "group_right", "inf", "nan", "atan2"}
# The series the dashboard exists to show: each must be in one of its queries.
REQUIRED_METRICS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "bitfusion_tenant_device_seconds_total",
    "bitfusion_tenant_entitled_ratio",
    "bitfusion_tenant_memory_used_bytes",
    "bitfusion_requests_total",
    "bitfusion_request_duration_seconds_bucket",
    "bitfusion_errors_total",
    "bitfusion_received_bytes_total",
    "bitfusion_sent_bytes_total",
    "bitfusion_connections",
    "bitfusion_reservations",
    "bitfusion_reservations_ended_total",
    "bitfusion_gpu_queue_wait_seconds_bucket",
}


# -- the doc's metric tables ------------------------------------------------------------------
@dataclass(frozen=True)
class DocMetric:
    name: str
    type: str  # "gauge", "counter", "histogram" (the Type cell's first word)
    labels: frozenset[str]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _doc_tables(text: str) -> Iterator[list[list[str]]]:
    """Each Markdown table of the doc as rows of cells, header first, separator dropped."""
    table: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            cells = _cells(line)
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                table.append(cells)
        elif table:
            yield table
            table = []


@functools.cache
def documented_metrics() -> dict[str, DocMetric]:
    text = DOC.read_text()
    # dcgm-exporter's labels, which its table leaves to the sentence above it.
    match = re.search(r"Per GPU, dcgm-exporter's names, units and labels \(([^)]*)\)", text)
    assert match, f"{DOC.name}: no sentence naming the DCGM metrics' labels"
    dcgm_labels = frozenset(re.findall(r"`([^`]+)`", match.group(1)))
    metrics: dict[str, DocMetric] = {}
    for header, *rows in _doc_tables(text):
        if header[0] != "Metric":
            continue
        type_column = header.index("Type")
        labels_column = header.index("Labels") if "Labels" in header else None
        for row in rows:
            names = re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", row[0])
            assert len(names) == 1, f"{DOC.name}: a metric row without one name: {row}"
            name = names[0]
            if labels_column is None:
                labels = dcgm_labels if name.startswith("DCGM_") else frozenset()
            else:
                labels = frozenset(re.findall(r"`([^`]+)`", row[labels_column]))
            kind = row[type_column].split()[0]
            assert kind in ("gauge", "counter", "histogram"), f"{DOC.name}: type of {row}"
            assert name not in metrics, f"{DOC.name}: {name} documented twice"
            metrics[name] = DocMetric(name, kind, labels)
    return metrics


def resolve(series: str) -> tuple[DocMetric, bool] | None:
    """The documented metric a series name belongs to, and whether it is a histogram's
    ``_bucket`` series (which has ``le``); None if the doc does not have it."""
    metrics = documented_metrics()
    if series in metrics:
        return metrics[series], False
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and base in metrics and metrics[base].type == "histogram":
            return metrics[base], suffix == "_bucket"
    return None


# -- PromQL -----------------------------------------------------------------------------------
@dataclass
class Query:
    metrics: set[str]
    labels: set[str]  # named in label matchers and grouping clauses
    grouped_by: set[str] | None  # the outermost-or-only ``by (...)`` labels, if any


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def parse_promql(expr: str) -> Query:
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for matchers in _MATCHERS.findall(text):
        labels |= set(_MATCHER_LABEL.findall(matchers))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    grouped_by: set[str] | None = None
    for keyword, names in _GROUPING.findall(text):
        found = {name.strip() for name in names.split(",") if name.strip()}
        labels |= found
        if keyword.lower() == "by":
            grouped_by = found if grouped_by is None else grouped_by
    text = _GROUPING.sub(" ", text)
    metrics = set()
    for name, call in _IDENTIFIER.findall(text):
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        metrics.add(name)
    return Query(metrics, labels, grouped_by)


def grafana_query_expr(query: str) -> tuple[str, str | None]:
    """A template variable's query as PromQL, and the label ``label_values`` reads, if any."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query)
    if match:
        return match.group(1), match.group(2)
    match = re.fullmatch(r"\s*(?:query_result|metrics)\((.*)\)\s*", query)
    if match:
        return match.group(1), None
    return query, None


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ('DCGM_FI_DEV_FB_USED{instance=~"$instance", gpu=~"$gpu"}', {"DCGM_FI_DEV_FB_USED"},
         {"instance", "gpu"}),
        ("histogram_quantile(0.99, sum by (le, opcode) "
         '(rate(bitfusion_request_duration_seconds_bucket{instance=~"a,b}"}[1m])))',
         {"bitfusion_request_duration_seconds_bucket"}, {"le", "opcode", "instance"}),
        ("time() - max(bitfusion_server_start_time_seconds)",
         {"bitfusion_server_start_time_seconds"}, set()),
        ("rate(a_total[$__rate_interval]) / on (gpu) group_left b_ratio offset 5m > bool 0.5",
         {"a_total", "b_ratio"}, {"gpu"}),
        ('sum without (tenant) (x{tenant!="other"}) or vector(0)', {"x"}, {"tenant"}),
    ],
)  # fmt: skip
def test_the_promql_extractor_finds_metrics_and_labels(
    expr: str, metrics: set[str], labels: set[str]
) -> None:
    query = parse_promql(expr)
    assert query.metrics == metrics
    assert query.labels == labels


def test_the_doc_tables_parse_into_the_metrics_the_endpoint_exports() -> None:
    metrics = documented_metrics()
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= set(metrics)
    assert metrics["DCGM_FI_DEV_FB_USED"].labels >= {"gpu", "UUID", "Hostname"}
    assert metrics["bitfusion_request_duration_seconds"].type == "histogram"
    assert metrics["bitfusion_tenant_device_seconds_total"].labels == {"gpu", "tenant"}
    assert metrics["bitfusion_received_bytes_total"].labels == set()
    assert len(metrics) >= 25, sorted(metrics)


# -- the dashboard ----------------------------------------------------------------------------
@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # fails the test on invalid JSON


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]  # an object since Grafana 7.x, a string before
    return str(query["query"] if isinstance(query, dict) else query)


def queries() -> Iterator[tuple[str, str, str, str | None]]:
    """(where, PromQL, legend format, label read) for every panel target and template query."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", ""), None
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            expr, label = grafana_query_expr(variable_query(variable))
            yield f"variable {variable['name']!r}", expr, "", label


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for name in ("instance", "gpu"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == DATASOURCE_UID
        query = variable_query(variable)
        assert re.fullmatch(rf"label_values\(DCGM_FI_DEV_FB_USED(\{{.*\}})?, {name}\)", query)

    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_metric_and_label_in_the_dashboard_is_documented() -> None:
    used: set[str] = set()
    problems = []
    for where, expr, legend, read_label in queries():
        query = parse_promql(expr)
        if not query.metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        allowed = set(TARGET_LABELS)
        for series in query.metrics:
            found = resolve(series)
            if found is None:
                problems.append(f"{where}: {series} is not in {DOC.name}'s metric tables")
                continue
            metric, is_bucket = found
            allowed |= metric.labels | ({"le"} if is_bucket else set())
            used.add(series)
        for label in sorted(query.labels - allowed):
            problems.append(f"{where}: label {label!r} is not one of {sorted(allowed)}")
        shown = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
        kept = allowed if query.grouped_by is None else query.grouped_by
        for label in sorted(shown - kept):
            problems.append(f"{where}: legend {legend!r} shows {label!r}, not in {sorted(kept)}")
        if read_label is not None and read_label not in allowed:
            problems.append(f"{where}: label_values reads {read_label!r}, not in {sorted(allowed)}")
    assert not problems, "\n".join(problems)
    missing = REQUIRED_METRICS - used
    assert not missing, f"the dashboard does not show {sorted(missing)}"


def test_a_histogram_is_read_through_its_buckets_and_counters_through_rate() -> None:
    """``histogram_quantile`` over ``rate`` of ``_bucket`` series, grouped by ``le``; a counter
    inside ``rate``/``increase`` (its raw value only says how long the server has run)."""
    problems = []
    for where, expr, _, _ in queries():
        query = parse_promql(expr)
        for series in query.metrics:
            found = resolve(series)
            if found is None:
                continue  # reported by the test above
            metric, is_bucket = found
            if metric.type == "histogram":
                if not (is_bucket and "histogram_quantile" in expr and "le" in query.labels):
                    problems.append(f"{where}: {series} outside histogram_quantile(.. by (le))")
            if metric.type == "counter" or is_bucket:
                if not re.search(rf"\b(rate|irate|increase)\(\s*{re.escape(series)}\b", expr):
                    problems.append(f"{where}: counter {series} not inside rate()/increase()")
    assert not problems, "\n".join(problems)
