"""The Serve app end to end: real Ray, real Serve over HTTP on 127.0.0.1, real MLflow store.

One Ray instance and one deployed application for the whole module; the hot-swap
test redeploys it and runs last.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from served import GOOD, offline_outputs, rows_of

from services.deploy import PredictError, predict_http, serve_model
from training import export, registry
from training.spec import ServeSpec

SPEC = ServeSpec(
    min_replicas=1,
    max_replicas=1,
    cpus_per_replica=0.5,
    max_batch_size=16,
    batch_wait_timeout_s=0.002,
)


@pytest.fixture(scope="module")
def endpoint(registered, free_port):
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = serve_model(
            registered.name,
            "production",
            tracking_uri=registered.uri,
            serve_spec=SPEC,
            port=free_port(),
        )
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


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


def test_reconfigure_swaps_in_place_and_refuses_a_tampered_version(endpoint, registered):
    """What a user_config change does on a live replica (called here through the handle)."""
    from ray import serve

    handle = serve.get_app_handle(registered.name)
    handle.reconfigure.remote({"ref": registered.swap_version}).result(timeout_s=60)
    assert (
        predict_http(endpoint, registered.name, [GOOD])["model_version"] == registered.swap_version
    )
    with pytest.raises(Exception, match="sha256"):
        handle.reconfigure.remote({"ref": registered.tampered_version}).result(timeout_s=60)
    assert (
        predict_http(endpoint, registered.name, [GOOD])["model_version"] == registered.swap_version
    )
    handle.reconfigure.remote({"version": registered.good_version}).result(timeout_s=60)
    assert (
        predict_http(endpoint, registered.name, [GOOD])["model_version"] == registered.good_version
    )


def test_user_config_ref_wins_over_the_constructor_ref(endpoint, registered):
    """Runs next to last. serve.run gives every deploy a new code version, so this redeploy starts a
    new replica; it loads "production" and Serve's reconfigure(user_config) moves it on."""
    from ray import serve

    from services.app import build_app

    app = build_app(
        registered.name,
        "production",
        registered.uri,
        SPEC,
        user_config={"ref": registered.swap_version},
    )
    serve.run(app, name=registered.name, route_prefix="/")
    out = predict_http(endpoint, registered.name, [GOOD])
    assert out["model_version"] == registered.swap_version
    meta = httpx.get(f"{endpoint}/v1/models/{registered.name}", timeout=30).json()
    assert meta["version"] == registered.swap_version


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
