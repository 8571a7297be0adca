"""The dashboard and the alerts of manifests/monitoring read what a live endpoint really
exports: real Ray with its Prometheus export, Serve over HTTP through the native ingress
(HAProxy and its exporter), a model registered with its drift reference in a real MLflow
store, requests of good and bad rows. Every metric the Grafana dashboard and the
PrometheusRule query (parsed with promql-parser: tests/manifests/monitoring_queries.py)
must be on Ray's or HAProxy's ``/metrics``, with every label the query matches or groups
on (Prometheus' own target labels aside).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import httpx
import pytest
from served import ray_with_metrics, rows_of

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from specs import LOGREG, churn_spec, make_churn  # noqa: E402

NAME = "churn-dashboard"


def _load(path: Path):
    """A module from a file outside this folder (registered under its name, as an import
    from tests/manifests would, so both see the same module)."""
    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


queries = _load(ROOT / "tests" / "manifests" / "monitoring_queries.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory, register_without_search) -> tuple[str, object]:
    """``churn-dashboard`` version 1 (production) with its drift reference, in a store of
    its own; returns the tracking URI and the holdout rows."""
    from training import registry
    from training.spec import parse_spec

    tmp = tmp_path_factory.mktemp("dashboard")
    csv = tmp / "churn.csv"
    make_churn(rows=3000, seed=0).to_csv(csv, index=False)
    raw = churn_spec(csv, name=NAME, metric="accuracy", models=[LOGREG], monitor={"window": 200})
    spec = parse_spec(raw)
    outcome = register_without_search(spec, tmp, production=True)
    assert outcome.version == "1"
    return registry.tracking_uri(tmp), outcome.splits.X_test


def _missing(used: dict[str, set[str]], exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """What the queries read that the exporters do not give (empty: all there)."""
    out = []
    for metric, labels in sorted(used.items()):
        series = exported[queries.EXPORTED[metric]]
        if metric not in series:
            out.append(f"{metric}: not exported")
            continue
        lacking = labels - series[metric] - queries.TARGET_LABELS
        if lacking:
            out.append(f"{metric}: no label {sorted(lacking)} (has {sorted(series[metric])})")
    return out


def test_every_metric_the_dashboard_and_alerts_read_is_exported(model, free_port, native_ingress):
    from services.deploy import deploy, predict_http
    from services.serve_config import ServedModel, serve_config
    from training.spec import ServeSpec

    uri, holdout = model
    used = queries.used_selectors()
    assert set(used) == set(queries.EXPORTED)
    metrics_port = free_port()
    haproxy_port = int(native_ingress["RAY_SERVE_HAPROXY_METRICS_PORT"])
    with ray_with_metrics(metrics_port):
        served = ServedModel(
            name=NAME,
            serve=ServeSpec(min_replicas=1, max_replicas=1, cpus_per_replica=0.5),
        )
        url = deploy(
            serve_config([served], tracking_uri=uri, port=free_port()),
            expect={NAME: ("1", None)},
        )
        rows = rows_of(holdout)
        for i in range(0, len(rows), 20):
            predict_http(url, NAME, rows[i : i + 20])
        bad = httpx.post(
            f"{url}/v1/models/{NAME}:predict", json={"instances": [{"plan": 3}]}, timeout=30
        )
        assert bad.status_code == 400

        exported: dict[str, dict[str, set[str]]] = {}
        missing = ["nothing scraped yet"]
        deadline = time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            exported = {
                queries.RAY: queries.exported_series(
                    httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
                ),
                queries.HAPROXY: queries.exported_series(
                    httpx.get(f"http://127.0.0.1:{haproxy_port}/metrics", timeout=10).text
                ),
            }
            missing = _missing(used, exported)
            time.sleep(1)
        assert missing == []


def test_the_check_names_what_an_exporter_lacks():
    exported = {
        queries.RAY: {"ray_rayship_requests_total": {"model", "version"}},
        queries.HAPROXY: {},
    }
    used = {
        "ray_rayship_requests_total": {"model", "code", "namespace"},
        "haproxy_frontend_http_responses_total": {"proxy"},
    }
    assert _missing(used, exported) == [
        "haproxy_frontend_http_responses_total: not exported",
        "ray_rayship_requests_total: no label ['code'] (has ['model', 'version'])",
    ]
