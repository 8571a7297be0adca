"""The endpoint's protocols end to end: real Ray, real Serve over HTTP on 127.0.0.1, real
MLflow store, and tritonclient as the stock V2 client.

One Ray instance and one deployed endpoint for the whole module; the route test
redeploys it and runs last.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from served import GOOD, keyed_by_column, offline_outputs, ray_with_metrics, rows_of

from services.deploy import PredictError, predict_http, serve_model
from training import export, registry
from training.spec import ServeSpec

SPEC = ServeSpec(
    min_replicas=1,
    max_replicas=1,
    cpus_per_replica=0.5,
    max_batch_size=16,
    batch_wait_timeout_s=0.02,  # long enough that concurrent requests share a batch
    max_request_bytes=64 * 1024,
)


@pytest.fixture(scope="module")
def metrics_port(free_port):
    return free_port()


@pytest.fixture(scope="module")
def endpoint(registered, free_port, metrics_port):
    with ray_with_metrics(metrics_port):
        url = serve_model(
            registered.name,
            "production",
            tracking_uri=registered.uri,
            serve_spec=SPEC,
            port=free_port(),
        )
        yield url


@pytest.fixture(scope="module")
def offline(registered):
    """The registered production version's own outputs on the holdout, run offline."""
    artifact = registry.load_artifact(registered.uri, registered.name, "production")
    return export.run_onnx(artifact.onnx_bytes, registered.X_test, registered.schema)


def predict_url(url: str, name: str = "churn") -> str:
    return f"{url}/v1/models/{name}:predict"


def test_holdout_predictions_equal_the_registered_graph(endpoint, registered, offline):
    out = predict_http(
        endpoint, registered.name, rows_of(registered.X_test), return_probabilities=True
    )
    pred, proba = offline
    assert out["model_version"] == registered.good_version
    assert out["predictions"] == pred.tolist()
    assert out["classes"] == ["churned", "stayed"]
    np.testing.assert_allclose(np.array(out["probabilities"]), proba, atol=1e-6)


def test_lists_in_feature_order(endpoint, registered, offline):
    names = registered.schema.names
    rows = [[r[n] for n in names] for r in rows_of(registered.X_test[:25])]
    out = predict_http(endpoint, registered.name, rows)
    assert out["predictions"] == offline[0][:25].tolist()
    assert "probabilities" not in out


def test_unseen_category_and_nulls(endpoint, registered):
    row = {
        "plan": "enterprise",
        "region": None,
        "tenure_months": None,
        "monthly_charges": 80.5,
        "support_tickets": 4,
    }
    out = predict_http(endpoint, registered.name, [row], return_probabilities=True)
    pred, proba = offline_outputs(registered, row)
    assert out["predictions"] == pred.tolist()
    np.testing.assert_allclose(out["probabilities"], proba, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        (
            "POST",
            "churn:predict",
            {"instances": [{k: v for k, v in GOOD.items() if k != "plan"}]},
            400,
            "plan",
        ),
        (
            "POST",
            "churn:predict",
            {"instances": [{**GOOD, "tenure_months": "ten"}]},
            400,
            "tenure_months",
        ),
        ("POST", "churn:predict", {"instances": [{**GOOD, "colour": "red"}]}, 400, "colour"),
        ("POST", "churn:predict", {"instances": [["basic", "north", 3.0]]}, 400, "instances[0]"),
        ("POST", "churn:predict", {"instances": []}, 400, "instances"),
        ("POST", "churn:predict", {"instances": GOOD}, 400, "instances"),
        ("POST", "churn:predict", {"rows": [GOOD]}, 400, "rows"),
        (
            "POST",
            "churn:predict",
            {"instances": [GOOD], "return_probabilities": "yes"},
            400,
            "return_probabilities",
        ),
        ("POST", "churn:predict", b'{"instances": [{"plan": ', 400, "body"),
        ("POST", "churn:predict", b"[1, 2]", 400, "body"),
        ("POST", "nosuch:predict", {"instances": [GOOD]}, 404, "name"),
        ("GET", "nosuch", None, 404, "name"),
        ("GET", "churn:predict", None, 404, "name"),
    ],
    ids=[
        "missing-column",
        "string-in-numeric",
        "unknown-column",
        "short-list",
        "empty",
        "not-a-list",
        "unknown-key",
        "bad-flag",
        "malformed-json",
        "json-not-object",
        "unknown-model",
        "unknown-model-metadata",
        "get-on-predict",
    ],
)
def test_bad_requests_get_json_4xx_and_the_server_goes_on(
    endpoint, method, path, body, status, field
):
    url = f"{endpoint}/v1/models/{path}"
    content = (
        body
        if isinstance(body, bytes)
        else (json.dumps(body).encode() if body is not None else None)
    )
    resp = httpx.request(
        method, url, content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert payload["error"] and payload["details"][0]["field"] == field
    good = httpx.post(predict_url(endpoint), json={"instances": [GOOD]}, timeout=30)
    assert good.status_code == 200 and good.json()["predictions"][0] in ("churned", "stayed")


def test_other_errors_are_json_too(endpoint):
    resp = httpx.get(f"{endpoint}/nowhere", timeout=30)
    assert resp.status_code == 404 and "error" in resp.json()
    resp = httpx.put(predict_url(endpoint), json={"instances": [GOOD]}, timeout=30)
    assert resp.status_code == 405 and "error" in resp.json()


def test_predict_http_raises_the_servers_message(endpoint, registered):
    with pytest.raises(PredictError, match="tenure_months") as info:
        predict_http(endpoint, registered.name, [{**GOOD, "tenure_months": "ten"}])
    assert info.value.status == 400 and info.value.details[0]["row"] == 0


def test_metadata(endpoint, registered):
    resp = httpx.get(f"{endpoint}/v1/models/{registered.name}", timeout=30)
    meta = resp.json()
    assert resp.status_code == 200
    assert (
        meta["name"] == registered.name
        and meta["version"] == registered.good_version
        and meta["ready"]
    )
    assert meta["task"] == "classification" and meta["classes"] == ["churned", "stayed"]
    assert [(f["name"], f["dtype"]) for f in meta["inputs"]] == [
        (f.name, f.dtype) for f in registered.schema.features
    ]
    plan = next(f for f in meta["inputs"] if f["name"] == "plan")
    assert plan["categories"] == ["basic", "plus", "pro"]
    assert [o["name"] for o in meta["outputs"]] == ["predictions", "probabilities"]
    assert httpx.get(f"{endpoint}/v1/models", timeout=30).json() == {"models": [registered.name]}


def test_concurrent_requests_each_get_their_own_rows(endpoint, registered, offline):
    rows = rows_of(registered.X_test[:48])
    chunks = [rows[i : i + 3] for i in range(0, 48, 3)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda c: predict_http(endpoint, registered.name, c, True), chunks))
    assert [p for o in outs for p in o["predictions"]] == offline[0][:48].tolist()
    got = np.array([p for o in outs for p in o["probabilities"]])
    np.testing.assert_allclose(got, offline[1][:48], atol=1e-6)


def test_tampered_version_is_refused_at_load(registered):
    with pytest.raises(registry.RegistryError, match="sha256"):
        registry.load_artifact(registered.uri, registered.name, registered.tampered_version)


# -- Open Inference Protocol (V2) --------------------------------------------------------


def v2_inputs(registered, X) -> list[dict]:
    """The V2 JSON tensors of rows X: one per feature, shape [N, 1] (a missing category is
    '', a missing number null: JSON has no NaN)."""
    inputs = []
    for f in registered.schema.features:
        col = X[f.name]
        if f.dtype == "float":
            data = [None if np.isnan(v) else v for v in col.astype("float32").tolist()]
            datatype = "FP32"
        else:
            data, datatype = col.astype(str).tolist(), "BYTES"
        inputs.append({"name": f.name, "shape": [len(X), 1], "datatype": datatype, "data": data})
    return inputs


def test_tritonclient_infers_unchanged(endpoint, registered, offline):
    """tritonclient's HTTP client, as shipped: binary tensors in, binary tensors out."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=endpoint.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(registered.name)
    meta = client.get_model_metadata(registered.name)
    assert meta["versions"] == [registered.good_version]
    X = registered.X_test
    inputs = []
    for tensor in meta["inputs"]:
        col = X[tensor["name"]]
        if tensor["datatype"] == "FP32":
            array = col.to_numpy(dtype=np.float32).reshape(-1, 1)
        else:
            array = col.astype(str).to_numpy(dtype=object).reshape(-1, 1)
        inp = triton.InferInput(tensor["name"], list(array.shape), tensor["datatype"])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer(registered.name, inputs)
    pred, proba = offline
    assert [p.decode() for p in result.as_numpy("prediction")] == pred.tolist()
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba, atol=1e-6)
    assert result.get_response()["model_version"] == registered.good_version

    json_out = client.infer(
        registered.name,
        inputs,
        model_version=registered.good_version,
        outputs=[triton.InferRequestedOutput("prediction", binary_data=False)],
    )
    assert json_out.as_numpy("prediction").tolist() == pred.tolist()  # JSON data: str
    assert json_out.as_numpy("probabilities") is None


def test_v2_json_infer_equals_offline(endpoint, registered, offline):
    X = registered.X_test
    body = {"id": "r1", "inputs": v2_inputs(registered, X)}
    body["inputs"][0]["shape"] = [len(X)]  # [N] is accepted as well as [N, 1]
    resp = httpx.post(f"{endpoint}/v2/models/{registered.name}/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"] == "r1" and out["model_version"] == registered.good_version
    by_name = {o["name"]: o for o in out["outputs"]}
    assert by_name["prediction"]["data"] == offline[0].tolist()
    assert by_name["probabilities"]["shape"] == [len(X), 2]
    proba = np.array(by_name["probabilities"]["data"]).reshape(len(X), 2)
    np.testing.assert_allclose(proba, offline[1], atol=1e-6)


def test_v2_metadata_and_health(endpoint, registered):
    assert httpx.get(f"{endpoint}/v2/health/live", timeout=10).json() == {"live": True}
    assert httpx.get(f"{endpoint}/v2/health/ready", timeout=10).json() == {"ready": True}
    meta = httpx.get(f"{endpoint}/v2/models/{registered.name}", timeout=10).json()
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
        (f.name, "FP32" if f.dtype == "float" else "BYTES") for f in registered.schema.features
    ]
    assert [o["name"] for o in meta["outputs"]] == ["prediction", "probabilities"]
    path = f"{endpoint}/v2/models/{registered.name}/versions/{registered.good_version}/ready"
    assert httpx.get(path, timeout=10).status_code == 200


def _v2_body(registered, **change):
    body = {"inputs": v2_inputs(registered, registered.X_test[:3])}
    for key, value in change.items():
        index, field = key.split("__")
        body["inputs"][int(index)][field] = value
    return body


@pytest.mark.parametrize(
    ("case", "path", "status", "field"),
    [
        ("missing-input", "churn/infer", 400, "plan"),
        ("bytes-for-a-number", "churn/infer", 400, "tenure_months"),
        ("short-data", "churn/infer", 400, "inputs[0].data"),
        ("bad-datatype", "churn/infer", 400, "inputs[0].datatype"),
        ("unknown-output", "churn/infer", 400, "outputs"),
        ("malformed-json", "churn/infer", 400, "body"),
        ("unknown-model", "nosuch/infer", 404, "name"),
        ("unknown-version", "churn/versions/99/infer", 404, "version"),
    ],
)
def test_v2_bad_requests_name_the_field(endpoint, registered, case, path, status, field):
    body = _v2_body(registered)
    numeric = next(i for i, f in enumerate(registered.schema.features) if f.dtype == "float")
    if case == "missing-input":
        body["inputs"] = [t for t in body["inputs"] if t["name"] != "plan"]
    elif case == "bytes-for-a-number":
        body["inputs"][numeric].update(datatype="BYTES", data=["a", "b", "c"])
    elif case == "short-data":
        body["inputs"][0]["data"] = body["inputs"][0]["data"][:2]
    elif case == "bad-datatype":
        body["inputs"][0]["datatype"] = "FLOAT"
    elif case == "unknown-output":
        body["outputs"] = [{"name": "logits"}]
    content = b'{"inputs": [' if case == "malformed-json" else json.dumps(body).encode()
    resp = httpx.post(f"{endpoint}/v2/models/{path}", content=content, timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.json()["details"][0]["field"] == field, resp.text
    good = httpx.post(f"{endpoint}/v2/models/churn/infer", json=_v2_body(registered), timeout=30)
    assert good.status_code == 200


def test_a_body_over_the_limit_gets_413_and_the_server_goes_on(endpoint, registered):
    big = {"instances": [GOOD] * 2000}  # about 200 kB, over the 64 kB limit
    resp = httpx.post(predict_url(endpoint), json=big, timeout=30)
    assert resp.status_code == 413 and resp.json()["details"][0]["field"] == "body"

    def chunks():  # no Content-Length: the limit applies while reading
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    resp = httpx.post(predict_url(endpoint), content=chunks(), timeout=30)
    assert resp.status_code == 413
    assert predict_http(endpoint, registered.name, [GOOD])["model_version"]


def test_metrics_reach_rays_prometheus_endpoint(endpoint, registered, metrics_port):
    import re
    import time

    predict_http(endpoint, registered.name, [GOOD])
    httpx.post(predict_url(endpoint), json={"instances": [{**GOOD, "plan": 3}]}, timeout=30)
    wanted = {
        "ok": r'ray_rayship_requests_total\{[^}]*code="200"[^}]*model="churn"[^}]*protocol="v1"',
        "bad": r'ray_rayship_requests_total\{[^}]*code="400"',
        "latency": r"ray_rayship_request_latency_ms_bucket\{",
        "rows": r"ray_rayship_batch_rows_bucket\{",
        "version": r'ray_rayship_model_version\{[^}]*model="churn"[^}]*role="production"[^}]*\} '
        + registered.good_version,
        "batch": r'ray_serve_batch_queue_length\{[^}]*function_name="infer_churn"',
    }
    missing = set(wanted)
    deadline = time.monotonic() + 60
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        missing = {k for k in missing if not re.search(wanted[k], text)}
        time.sleep(1)
    assert not missing, f"metrics not exported: {sorted(missing)}"


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _histogram(text: str, name: str, le: str) -> tuple[float, float]:
    """(observations at or below ``le``, all observations) of histogram ``name`` for the
    churn model, summed over replicas and versions."""
    import re

    below = count = 0.0
    for line in text.splitlines():
        metric, _, rest = line.partition("{")
        if metric not in (f"{name}_bucket", f"{name}_count"):
            continue
        labels_text, _, value = rest.rpartition("} ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if labels.get("model") != "churn":
            continue
        if metric.endswith("_count"):
            count += float(value)
        elif labels.get("le") == le:
            below += float(value)
    return below, count


def test_requests_of_one_and_many_rows_share_one_graph_run(
    endpoint, registered, offline, metrics_port
):
    """Concurrent 1-row and 25-row requests: each gets its own rows back, and some graph
    run held more than 32 rows, which only a batch of several requests can."""
    import time

    X = registered.X_test
    chunks = [((7 * i) % (len(X) - 25), 1 if i % 2 else 25) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(
            pool.map(
                lambda c: predict_http(endpoint, registered.name, rows_of(X[c[0] : c[0] + c[1]])),
                chunks,
            )
        )
    for (start, n), out in zip(chunks, outs, strict=True):
        assert out["predictions"] == offline[0][start : start + n].tolist()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        below, count = _histogram(_scrape(metrics_port), "ray_rayship_batch_rows", "32.0")
        if count > below:
            break
        time.sleep(1)
    assert count > below, f"no graph run of more than 32 rows among {count}"


def test_rows_keyed_by_the_datas_own_column_names(endpoint, registered, spaced):
    """A model whose columns have spaces ("sales region", "tenure (months)"), added to the
    running endpoint (a user_config change: the replica reconfigures in place). Rows keyed
    by those names get exactly the answers of rows keyed by the ONNX names; metadata shows
    the column names; V2 takes tensors under either name."""
    from services.deploy import serve_models
    from services.serve_config import ServedModel

    url = serve_models(
        [ServedModel(name=registered.name, serve=SPEC), ServedModel(name=spaced.name, serve=SPEC)],
        tracking_uri=registered.uri,
        port=int(endpoint.rsplit(":", 1)[1]),
    )
    X = spaced.X_test
    by_name = rows_of(X)
    by_column = keyed_by_column(by_name, spaced.schema)
    assert "sales region" in by_column[0] and "tenure (months)" in by_column[0]
    for rows in (by_column[:1], by_column):  # one row, and the whole holdout
        out = predict_http(url, spaced.name, rows, return_probabilities=True)
        same = predict_http(url, spaced.name, by_name[: len(rows)], return_probabilities=True)
        assert out == same and out["model_version"] == spaced.version
    pred, proba = export.run_onnx(spaced.onnx_bytes, X, spaced.schema)
    assert out["predictions"] == pred.tolist()
    np.testing.assert_allclose(np.array(out["probabilities"]), proba, atol=1e-6)

    both = {**by_column[0], "sales_region": "north"}
    with pytest.raises(PredictError) as info:
        predict_http(url, spaced.name, [both])
    assert info.value.status == 400 and info.value.details[0]["field"] == "sales region"

    meta = httpx.get(f"{url}/v1/models/{spaced.name}", timeout=30).json()
    assert [(i["name"], i["onnx_name"]) for i in meta["inputs"]] == list(
        zip(spaced.schema.columns, spaced.schema.names, strict=True)
    )
    v2_meta = httpx.get(f"{url}/v2/models/{spaced.name}", timeout=30).json()
    assert [t["name"] for t in v2_meta["inputs"]] == spaced.schema.columns

    tensors = v2_inputs(spaced, X)  # named by ONNX names
    answers = []
    for names in (spaced.schema.names, spaced.schema.columns):
        body = {"inputs": [{**t, "name": n} for t, n in zip(tensors, names, strict=True)]}
        resp = httpx.post(f"{url}/v2/models/{spaced.name}/infer", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        answers.append({o["name"]: o["data"] for o in resp.json()["outputs"]})
    assert answers[0] == answers[1] and answers[1]["prediction"] == pred.tolist()
    assert predict_http(url, registered.name, [GOOD])["model_version"]  # churn serves on


def test_the_spec_route_names_the_model_for_clients(endpoint, registered):
    """Runs last: redeploys with serve.route set; clients use the route, not the name."""
    serve_model(
        registered.name,
        "production",
        tracking_uri=registered.uri,
        serve_spec=SPEC.model_copy(update={"route": "churn-api"}),
        port=int(endpoint.rsplit(":", 1)[1]),
    )
    out = predict_http(endpoint, "churn-api", [GOOD])
    assert out["model_version"] == registered.good_version
    assert httpx.get(f"{endpoint}/v1/models/churn-api", timeout=30).json()["name"] == "churn-api"
    assert httpx.get(f"{endpoint}/v1/models/{registered.name}", timeout=30).status_code == 404
