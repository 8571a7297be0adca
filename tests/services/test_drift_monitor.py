"""The drift monitor on a live endpoint: real Ray, Serve over HTTP (native ingress), the
real MLflow store, the merger actor and Ray's Prometheus export.

One Ray instance for the module. The model, ``churn-monitored``, is the churn table
(two categorical columns, ``plan`` and ``region``) fitted once, registered three times:
versions 1 and 2 with their drift reference (``drift.json``, window 1000), version 3
without one (as versions registered before drift monitoring are). The tests run in
order on one endpoint and build on its state: undrifted traffic, a shifted window, the
gauges, two replicas, a hot swap, a version without reference, 100,000 requests.
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from served import ray_with_metrics, rows_of

from services.deploy import deploy, predict_http
from services.monitor import NAMESPACE, MonitorSettings, RingBuffer, merger_name, settings_for
from services.serve_config import ServedModel, serve_config
from training.spec import ServeSpec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from specs import LOGREG, churn_spec, make_churn  # noqa: E402

NAME = "churn-monitored"
WINDOW = 1000
FEATURES = ["plan", "region", "tenure_months", "monthly_charges", "support_tickets"]


def _spec(replicas: int = 1) -> ServeSpec:
    return ServeSpec(
        min_replicas=replicas,
        max_replicas=replicas,
        cpus_per_replica=0.5,
        max_batch_size=16,
        batch_wait_timeout_s=0.0,
    )


# -- without Ray ------------------------------------------------------------------------


def test_ring_buffer_keeps_the_last_window_rows_in_fixed_memory():
    ring = RingBuffer(5, 2)
    nbytes = ring.nbytes
    ring.push(np.array([[1, 1], [2, 2], [3, 3]], dtype=np.int16))
    assert sorted(ring.view()[:, 0]) == [1, 2, 3]
    ring.push(np.array([[4, 4], [5, 5], [6, 6], [7, 7]], dtype=np.int16))
    assert sorted(ring.view()[:, 0]) == [3, 4, 5, 6, 7]
    ring.push(np.arange(40, dtype=np.int16).reshape(20, 2))  # more than a window at once
    assert sorted(ring.view()[:, 0]) == [30, 32, 34, 36, 38]
    assert ring.nbytes == nbytes == 5 * 2 * 2


def test_settings_come_from_the_reference_the_spec_and_the_override():
    reference = {"window": 500, "features": []}
    spec = "name: x\nmonitor:\n  window: 500\n  sample_rate: 0.25\n"
    assert settings_for(reference, spec, None) == MonitorSettings(0.25, 500)
    assert settings_for(reference, spec, {"sample_rate": 1.0}) == MonitorSettings(1.0, 500)
    assert settings_for(reference, "", None) == MonitorSettings(1.0, 500)
    assert settings_for(reference, spec, {"sample_rate": 0.0}) is None  # off
    assert settings_for(None, spec, None) is None  # no reference


def test_user_config_monitor_override_is_checked():
    from services.app import parse_models

    entry = {"name": "m", "ref": "1"}
    assert parse_models({"models": [entry]})[0]["monitor"] is None
    parsed = parse_models({"models": [{**entry, "monitor": {"sample_rate": 0.5}}]})
    assert parsed[0]["monitor"] == {"sample_rate": 0.5}
    with pytest.raises(ValueError, match=r"models\[0\]\.monitor\.sample_rate: expected"):
        parse_models({"models": [{**entry, "monitor": {"sample_rate": 2}}]})
    with pytest.raises(ValueError, match=r"models\[0\]\.monitor: expected"):
        parse_models({"models": [{**entry, "monitor": {"window": 5}}]})


# -- live endpoint --------------------------------------------------------------------


@dataclass
class Monitored:
    uri: str
    name: str
    columns: list[str]


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> Monitored:
    """``churn-monitored`` in its own MLflow store: versions 1, 2 with drift.json, 3 without."""
    from training import export, registry
    from training.data import load_splits, profile
    from training.models import make_estimator
    from training.pipeline import drift_reference
    from training.preprocess import fit_preprocessor
    from training.spec import parse_spec, spec_to_yaml

    tmp = tmp_path_factory.mktemp("monitor")
    csv = tmp / "churn.csv"
    make_churn(6000, 0).to_csv(csv, index=False)
    raw = churn_spec(csv, name=NAME, metric="accuracy", models=[LOGREG], monitor={"window": WINDOW})
    spec = parse_spec(raw)
    splits = load_splits(spec.data, spec.task)
    schema = splits.schema
    pre = fit_preprocessor(spec.preprocess, schema, splits.X_train)
    feats = pre.transform(splits.X_train)
    y = np.array([schema.classes.index(c) for c in splits.y_train])
    est = make_estimator("sklearn.linear_model.LogisticRegression", {"max_iter": 500}, 0)
    est.fit(feats, y)
    onnx_bytes = export.assemble(
        pre, export.sklearn_model_graph(est, feats.shape[1], spec.task), schema
    )
    files = {
        "schema.json": schema.to_dict(),
        "metrics.json": {"accuracy": 0.0},
        "profile.json": profile(splits.X_train, schema),
        "spec.yaml": spec_to_yaml(spec),
        "lineage.json": {"data_hash": splits.content_hash},
    }
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sha = registry.sha256(onnx_bytes)
    reference = drift_reference(spec, splits, onnx_bytes)
    for with_reference in (True, True, False):
        extra = {"drift.json": reference} if with_reference else {}
        run_id, source = registry.log_winner(
            uri,
            NAME,
            onnx_bytes=onnx_bytes,
            files={**files, **extra},
            params={},
            metrics={},
            tags={"rayship.test": "monitor"},
        )
        registry.register_version(uri, NAME, source, run_id, tags={"onnx_sha256": sha})
    registry.set_alias(uri, NAME, registry.PRODUCTION, "1")
    return Monitored(uri, NAME, [f.column for f in schema.features])


@pytest.fixture(scope="module")
def metrics_port(free_port):
    return free_port()


@pytest.fixture(scope="module")
def port(free_port, metrics_port):
    with ray_with_metrics(metrics_port):
        yield free_port()


def serve(monitored, port, version: str, replicas: int = 1, sample_rate=None) -> str:
    model = ServedModel(
        name=monitored.name, ref=version, serve=_spec(replicas), sample_rate=sample_rate
    )
    config = serve_config([model], tracking_uri=monitored.uri, port=port)
    return deploy(config, expect={monitored.name: (version, None)})


def merger_stats() -> dict:
    import ray

    return ray.get(ray.get_actor(merger_name(NAME), namespace=NAMESPACE).stats.remote())


def wait_seen(rows: int, version: str, timeout: float = 60) -> dict:
    """Poll the merger until it has seen ``rows`` sampled rows of ``version``."""
    deadline = time.monotonic() + timeout
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = merger_stats()
        if stats["version"] == version and stats["seen"] >= rows:
            return stats
        time.sleep(0.2)
    raise AssertionError(f"the merger did not see {rows} rows of version {version}: {stats}")


def send(url: str, frame: pd.DataFrame, per_request: int = 50, threads: int = 4) -> int:
    rows = rows_of(frame)
    chunks = [rows[i : i + per_request] for i in range(0, len(rows), per_request)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda chunk: predict_http(url, NAME, chunk), chunks))
    return len(rows)


def drift(url: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models/{NAME}/drift", timeout=30)


def fresh(rows: int, seed: int) -> pd.DataFrame:
    """New rows from the training distribution (the generator, another seed)."""
    return make_churn(rows, seed).drop(columns=["churn"])


def test_traffic_from_the_training_distribution_flags_no_feature(monitored, port):
    url = serve(monitored, port, "1")
    empty = drift(url).json()
    assert (empty["version"], empty["window_rows"], empty["drifted"]) == ("1", 0, [])
    sent = send(url, fresh(2000, 11))
    wait_seen(sent, "1")
    report = drift(url).json()
    assert report["model"] == NAME and report["version"] == "1"
    assert report["window_rows"] == WINDOW
    assert [f["name"] for f in report["features"]] == monitored.columns
    assert report["drifted"] == [], report
    assert not any(f["drifted"] for f in report["features"])
    assert set(report["features"][0]) == {
        "name", "kind", "psi", "js", "missing", "out_of_range", "unseen", "threshold",
        "importance", "drifted",
    }  # fmt: skip


def test_a_shifted_numeric_and_categorical_feature_are_flagged_exactly(monitored, port):
    url = f"http://127.0.0.1:{port}"
    before = merger_stats()["seen"]
    shifted = fresh(WINDOW, 12)
    rng = np.random.default_rng(12)
    shifted["plan"] = rng.choice(["basic", "plus", "pro"], size=WINDOW, p=[0.15, 0.15, 0.7])
    shifted["monthly_charges"] = shifted["monthly_charges"] + 25.0
    send(url, shifted)
    wait_seen(before + WINDOW, "1")
    report = drift(url).json()
    assert report["window_rows"] == WINDOW
    assert sorted(report["drifted"]) == ["monthly_charges", "plan"], report
    by_name = {f["name"]: f for f in report["features"]}
    assert by_name["plan"]["kind"] == "categorical"
    assert by_name["monthly_charges"]["kind"] == "numeric"
    assert by_name["plan"]["psi"] > by_name["plan"]["threshold"]
    assert report["score"] > 0


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(metric, labels, value) of every sample on Ray's metrics port."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        metric, _, rest = line.partition("{")
        labels_text, _, value = rest.rpartition("} ")
        samples.append((metric, dict(re.findall(r'(\w+)="([^"]*)"', labels_text)), float(value)))
    return samples


def gauges(port: int, version: str) -> dict[tuple[str, str], float]:
    """The drift gauges of the model at ``version``: (metric, feature or "") -> value."""
    out = {}
    for metric, labels, value in scrape(port):
        if "drift" in metric and labels.get("model") == NAME and labels.get("version") == version:
            out[(metric, labels.get("feature", ""))] = value
    return out


def expected_gauges(report: dict) -> dict[tuple[str, str], float]:
    want = {
        ("ray_rayship_model_drift_score", ""): report["score"],
        ("ray_rayship_drift_window_rows", ""): report["window_rows"],
    }
    for f in report["features"]:
        want[("ray_rayship_feature_drift_psi", f["name"])] = f["psi"]
        want[("ray_rayship_feature_drift_js", f["name"])] = f["js"]
        want[("ray_rayship_feature_drift_threshold", f["name"])] = f["threshold"]
        want[("ray_rayship_feature_drifted", f["name"])] = 1.0 if f["drifted"] else 0.0
    return want


def wait_gauges(port: int, version: str, want: dict, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    got: dict = {}
    while time.monotonic() < deadline:
        got = gauges(port, version)
        # "drifted" gauges match the name filter through "drift"; keep the compared keys
        if all(k in got and np.isclose(got[k], v, rtol=1e-6, atol=1e-9) for k, v in want.items()):
            return got
        time.sleep(1)
    wrong = {k: (got.get(k), v) for k, v in want.items() if k not in got or got[k] != v}
    raise AssertionError(f"gauges differ from the report (got, want): {wrong}")


def test_the_report_and_the_exported_gauges_agree(monitored, port, metrics_port):
    report = drift(f"http://127.0.0.1:{port}").json()
    want = expected_gauges(report)
    assert len(want) == 2 + 4 * len(FEATURES)
    wait_gauges(metrics_port, "1", want)
    got = gauges(metrics_port, "1")
    flagged = sorted(f for (m, f), v in got.items() if m == "ray_rayship_feature_drifted" and v)
    assert flagged == sorted(report["drifted"])


def test_two_replicas_traffic_lands_in_one_report(monitored, port):
    """Version 2 on two replicas (a new version: the window starts empty); 600 rows sent
    concurrently reach both replicas and all count in the one report."""
    url = serve(monitored, port, "2", replicas=2)
    sent = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sent += send(url, fresh(300, 20 + sent), per_request=10, threads=8)
        stats = wait_seen(sent, "2")
        if len([s for s, n in stats["sources"].items() if n > 0]) >= 2:
            break
    assert len(stats["sources"]) == 2, stats
    assert sum(stats["sources"].values()) == sent
    report = drift(url).json()
    assert report["version"] == "2"
    assert report["window_rows"] == min(sent, WINDOW)


def test_a_hot_swap_restarts_the_window_against_the_new_version(monitored, port, metrics_port):
    """Only the ref changes (Serve reconfigures the running replicas): the report names the
    new version with an empty window; the old version's series read 0 rows."""
    url = serve(monitored, port, "1", replicas=2)
    report = drift(url).json()
    assert (report["version"], report["window_rows"], report["drifted"]) == ("1", 0, [])
    send(url, fresh(100, 30))
    wait_seen(100, "1")
    assert drift(url).json()["window_rows"] == 100
    wait_gauges(metrics_port, "2", {("ray_rayship_drift_window_rows", ""): 0.0})


def replicas() -> dict[str, str]:
    """replica id -> actor name of the endpoint's running replicas."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"]["rayship"]["deployments"]["ModelServer"]
    return {
        r["replica_id"]: r["actor_name"] for r in deployment["replicas"] if r["state"] == "RUNNING"
    }


def test_a_replica_restart_keeps_the_window_and_a_merger_restart_recovers(monitored, port):
    """Serve replaces a killed replica: the window (version 1, 100 rows from the hot swap
    test) stays, and the new replica's rows join it. A killed merger is restarted by Ray
    with an empty window; the replicas register again and the report goes on."""
    import ray

    url = f"http://127.0.0.1:{port}"
    before = replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    assert victim not in now and len(now) == 2, now
    report = drift(url).json()
    assert (report["version"], report["window_rows"]) == ("1", 100)
    sent, new = 0, set(now) - set(before)
    for _ in range(20):
        sent += send(url, fresh(50, 60 + sent), per_request=5, threads=8)
        if new & set(wait_seen(100 + sent, "1")["sources"]):
            break
    assert new & set(merger_stats()["sources"]), (new, merger_stats())
    assert drift(url).json()["window_rows"] == 100 + sent

    merger = ray.get_actor(merger_name(NAME), namespace=NAMESPACE)
    ray.kill(merger, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        resp = drift(url)
        if resp.status_code == 200:
            break
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["version"], resp.json()["window_rows"]) == ("1", 0)
    send(url, fresh(40, 70), per_request=5, threads=8)
    wait_seen(40, "1")
    assert drift(url).json()["window_rows"] == 40


def test_a_version_without_a_reference_answers_409_and_serves_on(monitored, port):
    url = serve(monitored, port, "3", replicas=2)
    resp = drift(url)
    assert resp.status_code == 409
    body = resp.json()
    assert "no drift reference" in body["error"]
    assert body["details"][0]["field"] == "version" and body["details"][0]["got"] == "3"
    assert predict_http(url, NAME, rows_of(fresh(3, 40)))["model_version"] == "3"
    assert httpx.get(f"{url}/v1/models/nosuch/drift", timeout=10).status_code == 404


def test_the_mergers_memory_stays_flat_over_100k_requests(monitored, port):
    """100,000 real one-row requests (wrk, or the asyncio client without it): the merger's
    ring buffer keeps its size and its resident memory grows by less than 8 MiB between
    the first 10,000 requests and the end."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.serving_load import closed_loop

    url = serve(monitored, port, "1", replicas=1)
    body = httpx.Request("POST", "/", json={"instances": rows_of(fresh(1, 50))}).read()
    predict_url = f"{url}/v1/models/{NAME}:predict"
    done = 0
    while done < 10_000:
        out = closed_loop(predict_url, body, concurrency=8, duration=5)
        assert out["errors"] == 0
        done += out["requests"]
    first = wait_seen(done, "1")
    rss_first = _rss(first["pid"])
    while done < 100_000:
        out = closed_loop(predict_url, body, concurrency=8, duration=10)
        assert out["errors"] == 0
        done += out["requests"]
    last = wait_seen(done, "1")
    assert last["pid"] == first["pid"]
    assert last["buffer_bytes"] == first["buffer_bytes"] == WINDOW * len(FEATURES) * 2
    assert last["window_rows"] == WINDOW
    growth = _rss(last["pid"]) - rss_first
    print(f"{done} requests, merger seen {last['seen']}, RSS growth {growth / 2**20:.2f} MiB")
    assert growth < 8 * 2**20, f"merger RSS grew {growth / 2**20:.1f} MiB over {done} requests"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
