"""The PromQL of manifests/monitoring (the Grafana dashboard and the PrometheusRule),
parsed with ``promql-parser`` (the Rust parser Prometheus-compatible servers use), and the
metric names it may use.

Shared by tests/manifests/test_monitoring.py (offline: every query parses, every metric
is in :data:`EXPORTED`) and tests/services/test_monitoring_export.py (a live endpoint's
``/metrics`` really exports each metric with the labels the queries match on).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
RULES = MONITORING / "prometheusrule-rayship.yaml"

# Every metric the dashboard and the alerts may read, with what exports it. Ray's
# exporter (each Ray pod's metrics port): rayship's own (services/metrics.py,
# services/monitor.py; Ray prefixes ``ray_`` and suffixes counters ``_total``,
# histograms ``_bucket``/``_sum``/``_count``) and Serve's. HAProxy's exporter (the
# RayService head's port 9101): the ingress's own view, load shedding included.
RAY = "ray"
HAPROXY = "haproxy"
EXPORTED: dict[str, str] = {
    "ray_rayship_requests_total": RAY,
    "ray_rayship_request_latency_ms_bucket": RAY,
    "ray_rayship_batch_rows_bucket": RAY,
    "ray_rayship_batch_rows_sum": RAY,
    "ray_rayship_batch_rows_count": RAY,
    "ray_rayship_model_version": RAY,
    "ray_rayship_canary_weight": RAY,
    "ray_rayship_feature_drift_psi": RAY,
    "ray_rayship_feature_drift_js": RAY,
    "ray_rayship_feature_drift_threshold": RAY,
    "ray_rayship_feature_drifted": RAY,
    "ray_rayship_model_drift_score": RAY,
    "ray_rayship_drift_window_rows": RAY,
    "ray_serve_deployment_replica_healthy": RAY,
    "ray_serve_autoscaling_target_replicas": RAY,
    "haproxy_frontend_http_responses_total": HAPROXY,
}
DRIFT_GAUGES = {n for n in EXPORTED if "drift" in n}

# Labels Prometheus adds to every scraped series (the PodMonitors' target labels), which a
# query may group or match on although the exporter does not write them.
TARGET_LABELS = {
    "namespace",
    "pod",
    "container",
    "endpoint",
    "instance",
    "job",
    "ray_io_cluster",
    "ray_io_node_type",
    "ray_io_group",
}

# Grafana's variables, as a query sees them once Grafana has filled them in.
_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (panel, variable or alert)."""

    where: str
    expr: str


@dataclass(frozen=True)
class Selector:
    """A metric a query reads and the labels it matches on."""

    metric: str
    labels: frozenset[str]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def rule_object(path: Path = RULES) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out = []
    for panel in board.get("panels", []):
        out.append(panel)
        out += panel.get("panels") or []
    return out


def dashboard_queries(board: dict[str, Any] | None = None) -> list[Query]:
    """The PromQL of every panel target and of every ``label_values`` query variable."""
    board = dashboard() if board is None else board
    queries = [
        Query(f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"])
        for p in panels(board)
        for t in p.get("targets") or []
    ]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        found = _LABEL_VALUES.match(text)
        if found is None:
            raise ValueError(f"variable {var['name']}: not a label_values() query: {text}")
        queries.append(Query(f"variable {var['name']}", found["selector"]))
    return queries


def rules(obj: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    obj = rule_object() if obj is None else obj
    return [r for g in obj["spec"]["groups"] for r in g["rules"]]


def rule_queries(obj: dict[str, Any] | None = None) -> list[Query]:
    return [Query(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in rules(obj)]


def parse(expr: str) -> Any:
    """The AST of ``expr`` with Grafana's interval variables filled in; ValueError (with
    the parser's message) when it is not PromQL."""
    for name, value in _VARIABLES.items():
        expr = expr.replace(name, value)
    return promql_parser.parse(expr)


def selectors(expr: str) -> list[Selector]:
    """Every metric ``expr`` reads, with the label names of its matchers."""
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            found.append(Selector(node.name, frozenset(labels)))

    promql_parser.walk(parse(expr), visit)
    return found


def grouping_labels(expr: str) -> set[str]:
    """Labels the result of ``expr`` keeps: those of its outermost ``by (...)`` found."""
    kept: list[list[str]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                kept.append(list(node.modifier.labels))

    promql_parser.walk(parse(expr), visit)
    return set(kept[0]) if kept else set()


def grouped(expr: str) -> list[Selector]:
    """Each metric under a ``by (...)`` aggregation of ``expr``, with the labels it is
    grouped by (which the metric's series must carry, or the groups are empty)."""
    found: list[Selector] = []

    def visit(node: Any) -> None:
        modifier = getattr(node, "modifier", None)
        if not isinstance(node, promql_parser.AggregateExpr) or modifier is None:
            return
        if modifier.type != promql_parser.AggModifierType.By:
            return
        labels = frozenset(modifier.labels)
        promql_parser.walk(
            node.expr,
            lambda inner: (
                found.append(Selector(inner.name, labels))
                if isinstance(inner, promql_parser.VectorSelector)
                else None
            ),
        )

    promql_parser.walk(parse(expr), visit)
    return found


def used_selectors() -> dict[str, set[str]]:
    """metric → the labels any query of the dashboard or the rule matches or groups it on."""
    out: dict[str, set[str]] = {}
    for q in [*dashboard_queries(), *rule_queries()]:
        for s in [*selectors(q.expr), *grouped(q.expr)]:
            out.setdefault(s.metric, set()).update(s.labels)
    return out


def exported_series(text: str) -> dict[str, set[str]]:
    """metric → label names of its series, from a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, brace, rest = line.partition("{")
        if not brace:
            name = line.split()[0]
            out.setdefault(name, set())
            continue
        labels_text = rest.rpartition("}")[0]
        out.setdefault(name, set()).update(re.findall(r'([A-Za-z_]\w*)="', labels_text))
    return out
