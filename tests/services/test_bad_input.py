"""Bad input at a live endpoint: never a 5xx, never a crash, nothing lost.

Real Ray, real Serve behind its native ingress on 127.0.0.1, the real MLflow store; one
endpoint for the module serving two models (``churn`` and ``churn-tree``) with the
default 16 MiB body limit. Two fuzzers, each counting the requests it sent:

- schemathesis, pointed at the endpoint's own ``GET /openapi.json`` (its V1 and V2 routes,
  each model's features typed), valid and invalid cases of every operation; every answer
  is checked against the document (status, content type, body schema, headers);
- hypothesis, V2 ``infer`` bodies built from the models' V2 metadata and broken a piece
  at a time, as JSON tensors or with the binary tensor extension
  (``Inference-Header-Content-Length`` and raw tensor bytes).

Then the named bad inputs that ``test_serving.py`` does not already cover (each says its
status, the field its error names, and that a good request is answered right after).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from served import GOOD, offline_outputs, rows_of

from services.deploy import serve_models
from services.serve_config import ServedModel
from services.v2 import NUMERIC_DATATYPES
from training import export
from training.spec import ServeSpec

FUZZ_REQUESTS = 1000  # per fuzzer: the floor
SPEC = ServeSpec(
    min_replicas=1,
    max_replicas=1,
    cpus_per_replica=0.5,
    max_batch_size=16,
    batch_wait_timeout_s=0.0,
)  # the default max_request_bytes (16 MiB): 100,000 rows fit
HEADER = "Inference-Header-Content-Length"
NUMERIC = NUMERIC_DATATYPES  # the V2 datatypes with a numpy type
DATATYPES = ["BYTES", *NUMERIC]


@pytest.fixture(scope="module")
def endpoint(registered, free_port):
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield serve_models(
            [
                ServedModel(name=registered.name, serve=SPEC),
                ServedModel(name=registered.other_name, serve=SPEC),
            ],
            tracking_uri=registered.uri,
            port=free_port(),
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(endpoint):
    with httpx.Client(base_url=endpoint, timeout=60) as client:
        yield client


def replicas() -> dict[str, int]:
    """Replica id → process id of each RUNNING replica (Serve's record): a replica that
    crashed comes back under a new id and pid."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"]["rayship"]["deployments"]["ModelServer"]
    return {r["replica_id"]: r["pid"] for r in deployment["replicas"] if r["state"] == "RUNNING"}


def v2_body(registered, rows: list[dict]) -> dict[str, Any]:
    """A valid V2 JSON infer body of ``rows`` (null: missing)."""
    inputs = []
    for f in registered.schema.features:
        numeric = f.dtype == "float"
        inputs.append(
            {
                "name": f.name,
                "shape": [len(rows), 1],
                "datatype": "FP32" if numeric else "BYTES",
                "data": [r[f.name] if numeric or r[f.name] is not None else "" for r in rows],
            }
        )
    return {"inputs": inputs}


def assert_still_serving(http: httpx.Client, registered) -> None:
    """A good V1 and a good V2 request right after: answered, with the graph's own answer."""
    pred, proba = offline_outputs(registered, GOOD)
    v1 = http.post("/v1/models/churn:predict", json={"instances": [GOOD]})
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == pred.tolist()
    v2 = http.post("/v2/models/churn/infer", json=v2_body(registered, [GOOD]))
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["prediction"] == pred.tolist()
    np.testing.assert_allclose(outputs["probabilities"], proba.ravel(), atol=1e-6)


def assert_names_the_field(response: httpx.Response, field: str) -> dict[str, Any]:
    payload = response.json()
    assert payload["error"], response.text
    fields = [d["field"] for d in payload["details"]]
    assert field in fields, response.text
    return payload


FUZZ = settings(
    max_examples=FUZZ_REQUESTS,
    deadline=None,
    database=None,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)


# -- schemathesis, from the endpoint's own OpenAPI document ------------------------------


def test_the_openapi_document_describes_each_served_model(http, registered):
    """Valid OpenAPI 3.0 (the specification's own JSON Schema, as schemathesis ships it),
    with each served model's features typed at its own predict and infer paths."""
    import schemathesis

    doc = http.get("/openapi.json").json()
    assert doc["openapi"] == "3.0.3"
    schemathesis.openapi.from_dict(doc).validate()
    paths = doc["paths"]
    for route in ("/v1/models/{name}:predict", "/v2/models/{name}/infer", "/v1/models/{name}"):
        assert route in paths
    body = paths["/v1/models/churn:predict"]["post"]["requestBody"]["content"]
    row = body["application/json"]["schema"]["properties"]["instances"]["items"]["oneOf"][0]
    assert row["required"] == registered.schema.columns
    assert row["properties"]["plan"]["type"] == "string"
    assert row["properties"]["tenure_months"]["type"] == "number"
    infer = paths["/v2/models/churn-tree/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert HEADER in [p["name"] for p in infer["parameters"]]
    name = next(p for p in infer["parameters"] if p["name"] == HEADER)
    assert name["in"] == "header"
    predict = paths["/v1/models/{name}:predict"]["post"]
    assert {"200", "400", "404", "413", "503"} <= set(predict["responses"])
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "details"]
    params = {
        p["name"]: p
        for p in paths["/v2/models/{name}/versions/{version}/infer"]["post"]["parameters"]
    }
    assert params["name"]["schema"]["enum"] == sorted([registered.name, registered.other_name])
    assert params["version"]["in"] == "path"


def test_schemathesis_fuzzing_from_openapi_json_gets_no_5xx(endpoint, http, registered):
    """Valid and invalid cases of every documented operation, each answer checked against
    the document: no 5xx, every status and body as documented, the replica never restarts."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{endpoint}/openapi.json")
    operations = [op.ok().label for op in schema.get_all_operations()]
    assert "POST /v1/models/churn:predict" in operations
    assert "POST /v2/models/{name}/versions/{version}/infer" in operations
    before = replicas()
    sent: Counter[tuple[str, int]] = Counter()
    session = requests.Session()

    @FUZZ
    @given(
        schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    )
    def fuzz(case):
        response = case.call(base_url=endpoint, session=session, timeout=60)
        sent[case.operation.label, response.status_code] += 1
        case.validate_response(response, checks=checks)

    fuzz()
    total = sum(sent.values())
    by_status = Counter()
    for (_, status), count in sent.items():
        by_status[status] += count
    print(f"\nschemathesis: {total} requests, by status {dict(sorted(by_status.items()))}")
    assert total >= FUZZ_REQUESTS
    assert not [k for k in sent if k[1] >= 500]
    assert by_status[200] >= 50  # valid cases reached the models, not only their checks
    assert sent["POST /v1/models/churn:predict", 200] > 0
    assert replicas() == before
    assert_still_serving(http, registered)


# -- hypothesis: V2 infer bodies, JSON and binary ------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
ANY_TEXT = st.text(max_size=10) | SURROGATES
ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=4)


def broken(draw, bad: int) -> bool:
    """Whether to break the next part of a request: ``bad`` percent of the time."""
    return bad > 0 and draw(st.integers(0, 99)) < bad


def often(draw, bad: int, valid: Any, other: st.SearchStrategy) -> Any:
    """``valid``, or a draw of ``other`` ``bad`` percent of the time."""
    return draw(other) if broken(draw, bad) else valid


def numeric_cell(draw, bad: int) -> Any:
    valid = draw(
        st.floats(width=32, allow_nan=False, allow_infinity=False)
        | st.integers(-100, 100)
        | st.none()
    )
    return often(draw, bad, valid, st.one_of(st.floats(), st.integers(), ANY_TEXT, JUNK))


def category_cell(draw, bad: int, categories: list[str]) -> Any:
    valid = draw(st.sampled_from(categories) | st.text(max_size=8))
    return often(draw, bad, valid, st.one_of(SURROGATES, st.integers(), st.floats(), JUNK))


@st.composite
def tensors(draw, feature: dict[str, Any], n: int, bad: int) -> dict[str, Any]:
    """One input tensor for ``feature`` (V2 metadata + categories) with ``n`` rows, each
    part broken ``bad`` percent of the time."""
    numeric = feature["datatype"] != "BYTES"
    cells = [
        numeric_cell(draw, bad) if numeric else category_cell(draw, bad, feature["categories"])
        for _ in range(n)
    ]
    shape = draw(st.sampled_from([[n], [n, 1]]))
    nested = shape == [n, 1] and draw(st.booleans())
    tensor = {
        "name": often(draw, bad, feature["name"], ANY_TEXT | JUNK),
        "shape": often(draw, bad, shape, st.lists(st.integers(), max_size=4) | JUNK),
        "datatype": often(
            draw, bad, feature["datatype"], st.sampled_from(DATATYPES) | ASCII | JUNK
        ),
        "data": [[c] for c in cells] if nested else cells,
    }
    if broken(draw, bad):
        tensor[draw(st.sampled_from(["data", "shape", "name", "datatype"]))] = draw(JUNK)
    if broken(draw, bad // 2):
        tensor[draw(st.text(max_size=6))] = draw(JUNK)
    return tensor


def binary_blob(draw, tensor: dict[str, Any], bad: int) -> bytes:
    """Move ``tensor``'s data to the binary part, encoded as the extension encodes its
    datatype; its ``parameters.binary_data_size`` is wrong ``bad`` percent of the time."""
    data = tensor.pop("data", None)
    flat = (
        [v for row in data for v in (row if isinstance(row, list) else [row])]
        if isinstance(data, list)
        else []
    )
    datatype = tensor.get("datatype")
    blob = draw(st.binary(max_size=24))
    if datatype == "BYTES":
        raw = [str(v).encode("utf-8", "surrogatepass") for v in flat]
        blob = b"".join(struct.pack("<I", len(r)) + r for r in raw)
    elif isinstance(datatype, str) and datatype in NUMERIC:
        try:
            with np.errstate(all="ignore"):
                values = np.asarray([np.nan if v is None else v for v in flat])
                blob = values.astype(np.dtype(NUMERIC[datatype]).newbyteorder("<")).tobytes()
        except (TypeError, ValueError, OverflowError):
            pass  # not representable: the random bytes stand
    size = often(draw, bad, len(blob), st.integers(-2, 64) | JUNK)
    tensor["parameters"] = {"binary_data_size": size}
    return blob


@st.composite
def infer_requests(draw, models: dict[str, list[dict]], versions: dict[str, list[str]]):
    """(path, headers, body bytes, rows) of a V2 infer request for one of ``models``
    (route → its features): a valid request (a third of them), or one with each part
    broken 3 or 15 percent of the time; ``rows`` is the batch size it was built for."""
    bad = draw(st.sampled_from([0, 3, 15]))
    route = draw(st.sampled_from(sorted(models)))
    n = draw(st.integers(1, 5))
    inputs = draw(st.permutations([draw(tensors(f, n, bad)) for f in models[route]]))
    if broken(draw, bad):
        inputs.pop(draw(st.integers(0, len(inputs) - 1)))
    if broken(draw, bad):
        inputs.append(dict(draw(st.sampled_from(inputs))))
    body: Any = {"inputs": inputs}
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=8) | st.integers().map(str))
    if draw(st.booleans()):
        output = st.fixed_dictionaries(
            {"name": st.sampled_from(["prediction", "probabilities"])},
            optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
        )
        body["outputs"] = draw(st.lists(output, min_size=1, max_size=2, unique_by=str))
    if draw(st.booleans()):
        body["parameters"] = draw(st.fixed_dictionaries({"binary_data_output": st.booleans()}))
    for key in ("id", "outputs", "parameters"):
        if broken(draw, bad // 3):
            body[key] = draw(JUNK | st.lists(JUNK, max_size=2))
    if broken(draw, bad // 3):
        body[draw(st.text(max_size=6))] = draw(JUNK)
    if broken(draw, bad // 5):
        body = draw(JUNK)
    headers: dict[str, str] = {}
    blobs = b""
    binary = isinstance(body, dict) and draw(st.booleans())
    if binary:
        blobs = b"".join(
            binary_blob(draw, t, bad) if isinstance(t, dict) and draw(st.booleans()) else b""
            for t in inputs
        )
    content = json.dumps(body).encode()  # NaN/Infinity tokens and \\udXXX escapes included
    if binary:
        wrong = st.integers(-5, len(content) + 40).map(str) | ASCII
        headers[HEADER] = often(draw, bad, str(len(content)), wrong)
        content += blobs
    path = f"/v2/models/{route}/infer"
    if draw(st.integers(0, 4)) == 0:
        version = often(draw, bad, draw(st.sampled_from(versions[route])), st.text(min_size=1))
        path = f"/v2/models/{route}/versions/{quote(version, safe='')}/infer"
    if broken(draw, bad // 3):
        path = "/v2/models/no-such-model/infer"
    return path, headers, content, n


def v2_answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON part of an infer answer (binary or not)."""
    length = response.headers.get(HEADER)
    return json.loads(response.content[: int(length)] if length else response.content)


def test_hypothesis_fuzzing_of_v2_infer_gets_no_5xx(http, registered):
    """V2 infer bodies from the models' own metadata, each part valid four times in five:
    every answer a 200 with one prediction a row, or a 4xx JSON error naming a field; the
    replica never restarts."""
    features, versions = {}, {}
    for route in (registered.name, registered.other_name):
        meta = http.get(f"/v2/models/{route}").json()
        v1 = http.get(f"/v1/models/{route}").json()
        categories = {i["name"]: i["categories"] or ["a"] for i in v1["inputs"]}
        features[route] = [{**t, "categories": categories[t["name"]]} for t in meta["inputs"]]
        versions[route] = meta["versions"]
    before = replicas()
    sent: Counter[int] = Counter()
    binary_sent = 0

    @FUZZ
    @given(infer_requests(features, versions))
    def fuzz(request):
        nonlocal binary_sent
        path, headers, content, n = request
        response = http.post(path, content=content, headers=headers)
        sent[response.status_code] += 1
        binary_sent += HEADER in headers
        assert response.status_code < 500, (path, headers, content[:2000], response.text)
        if response.status_code == 200:
            outputs = {o["name"]: o for o in v2_answer(response)["outputs"]}
            assert all(o["shape"][0] == n for o in outputs.values()), response.content[:500]
        else:
            assert response.status_code in (400, 404), response.text
            assert isinstance(response.json()["details"][0]["field"], str), response.text

    fuzz()
    total = sum(sent.values())
    print(
        f"\nhypothesis V2 infer: {total} requests ({binary_sent} with {HEADER}), "
        f"by status {dict(sorted(sent.items()))}"
    )
    assert total >= FUZZ_REQUESTS and binary_sent >= FUZZ_REQUESTS // 4
    assert not [s for s in sent if s >= 500]
    assert sent[200] >= FUZZ_REQUESTS // 10  # the generator reaches the models
    assert replicas() == before
    assert_still_serving(http, registered)


# -- named cases test_serving.py does not cover -------------------------------------------

DEEP = 5000


@pytest.mark.parametrize(
    ("path", "content", "field"),
    [
        ("/v1/models/churn:predict", b"[" * DEEP, "body"),
        ("/v1/models/churn:predict", b"[" * DEEP + b"]" * DEEP, "body"),
        ("/v1/models/churn:predict", b'{"instances": ' + b"[" * DEEP + b"]" * DEEP + b"}", "body"),
        # as deep as the JSON parser takes (1,024): the rows' own check refuses it
        (
            "/v1/models/churn:predict",
            b'{"instances": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "instances[0]",
        ),
        ("/v2/models/churn/infer", b"[" * DEEP, "body"),
        ("/v2/models/churn/infer", b'{"inputs": ' + b"[" * DEEP + b"]" * DEEP + b"}", "body"),
    ],
    ids=[
        "v1-unclosed",
        "v1-closed",
        "v1-instances",
        "v1-instances-1000",
        "v2-unclosed",
        "v2-inputs",
    ],
)
def test_deeply_nested_json_gets_400(http, registered, path, content, field):
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert_names_the_field(response, field)
    assert_still_serving(http, registered)


def test_v2_data_nested_1000_deep_is_read_like_any_nesting(http, registered):
    """The protocol allows nested data; nested as deep as the JSON parser takes, it was a
    500 (RecursionError while flattening it). Now: the same answer as flat data."""
    body = v2_body(registered, [GOOD])
    plan = body["inputs"][0]
    assert plan["name"] == "plan"
    content = json.dumps(body).replace('["basic"]', "[" * 1000 + '"basic"' + "]" * 1000)
    response = http.post("/v2/models/churn/infer", content=content.encode())
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["prediction"] == offline_outputs(registered, GOOD)[0].tolist()
    assert_still_serving(http, registered)


def test_a_misspelled_feature_is_named_with_the_one_it_misses(http, registered):
    row = {k: v for k, v in GOOD.items() if k != "tenure_months"} | {"tenure_month": 3.0}
    response = http.post("/v1/models/churn:predict", json={"instances": [row]})
    assert response.status_code == 400, response.text
    payload = assert_names_the_field(response, "tenure_month")
    problems = {d["field"]: d["got"] for d in payload["details"]}
    assert problems == {"tenure_month": "unknown column", "tenure_months": "no such key"}
    assert_still_serving(http, registered)


def _v1_with(value: str) -> bytes:
    """A V1 body with ``value`` (a JSON token, e.g. NaN) as tenure_months."""
    row = json.dumps({**GOOD, "tenure_months": 0.125}).replace("0.125", value)
    return b'{"instances": [' + row.encode() + b"]}"


def _v2_with(registered, value: str) -> bytes:
    body = v2_body(registered, [{**GOOD, "tenure_months": 0.125}])
    return json.dumps(body).replace("0.125", value).encode()


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_nan_is_a_missing_value_and_infinities_are_refused(http, registered, protocol, token):
    """Python's json writes NaN/Infinity tokens by default. NaN is a missing number, as
    null is (the same answer); an infinity is no value a row can have: 400 naming it."""
    if protocol == "v1":
        path, content = "/v1/models/churn:predict", _v1_with(token)
    else:
        path, content = "/v2/models/churn/infer", _v2_with(registered, token)
    assert token.encode() in content
    response = http.post(path, content=content)
    if token == "NaN":
        assert response.status_code == 200, response.text
        missing = offline_outputs(registered, {**GOOD, "tenure_months": None})[0].tolist()
        answer = response.json()
        got = answer.get("predictions") or next(
            o["data"] for o in answer["outputs"] if o["name"] == "prediction"
        )
        assert got == missing
    else:
        assert response.status_code == 400, response.text
        assert_names_the_field(response, "tenure_months")
    assert_still_serving(http, registered)


def test_v2_null_is_a_missing_value_in_json_tensors(http, registered):
    """null in a JSON tensor: a missing number, or the missing category '' — the answer
    of the V1 row with those nulls."""
    row = {**GOOD, "plan": None, "tenure_months": None}
    body = v2_body(registered, [row])
    by_name = {t["name"]: t for t in body["inputs"]}
    by_name["plan"]["data"] = [None]  # v2_body writes '' for a missing category
    response = http.post("/v2/models/churn/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    v1 = http.post("/v1/models/churn:predict", json={"instances": [row]}).json()
    assert (
        outputs["prediction"] == v1["predictions"] == offline_outputs(registered, row)[0].tolist()
    )


def test_an_infinity_in_binary_fp32_data_is_refused(http, registered):
    body = v2_body(registered, [GOOD])
    blobs = b""
    for tensor in body["inputs"]:
        if tensor["name"] == "tenure_months":
            blob = np.asarray([np.inf], dtype="<f4").tobytes()
            tensor.pop("data")
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs += blob
    header = json.dumps(body).encode()
    response = http.post(
        "/v2/models/churn/infer", content=header + blobs, headers={HEADER: str(len(header))}
    )
    assert response.status_code == 400, response.text
    assert_names_the_field(response, "tenure_months")
    assert_still_serving(http, registered)


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"instances": [{**GOOD, "plan": "\ud800"}]}),
        json.dumps({"instances": [{**GOOD, "\udfff": 1}]}),
        json.dumps(
            {"inputs": [{"name": "plan", "shape": [1], "datatype": "BYTES", "data": ["\udc00"]}]}
        ),
    ],
    ids=["v1-category", "v1-key", "v2-bytes"],
)
def test_a_lone_surrogate_in_a_string_gets_400(http, registered, content):
    """A lone UTF-16 surrogate escape (``"\\ud800"``, which json.dumps writes for one) is
    no character: onnxruntime cannot encode it, nor orjson an error naming it; it was a 500
    (for its whole batch)."""
    assert "\\ud" in content
    path = "/v2/models/churn/infer" if "inputs" in content else "/v1/models/churn:predict"
    response = http.post(path, content=content.encode())
    assert response.status_code == 400, response.text
    assert_names_the_field(response, "body")
    assert_still_serving(http, registered)


def test_100000_rows_in_one_request_are_all_answered(http, registered):
    X = registered.X_test
    repeat = -(-100_000 // len(X))
    rows = [[r[n] for n in registered.schema.names] for r in rows_of(X)] * repeat
    rows = rows[:100_000]
    response = http.post("/v1/models/churn:predict", json={"instances": rows})
    assert response.status_code == 200, response.text[:500]
    pred, _ = export.run_onnx(registered.onnx_bytes, X, registered.schema)
    expected = (pred.tolist() * repeat)[:100_000]
    assert response.json()["predictions"] == expected
    assert_still_serving(http, registered)


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("shape-n-by-2", "tenure_months"),
        ("batch-sizes-differ", "inputs"),
        ("negative-dim", "inputs[2].shape"),
        ("shape-beyond-numpy", "inputs[2].shape"),
        ("shape-product-beyond-int64", "inputs[2].data"),
        ("int64-for-a-category", "plan"),
        ("strings-in-fp32", "inputs[2].data"),
        ("null-in-int64", "inputs[2].data"),  # was a 500: the check took None for "none bad"
        ("outputs-parameters-not-an-object", "outputs[0].parameters"),
    ],
)
def test_v2_wrong_tensor_shape_or_datatype_gets_400(http, registered, case, field):
    body = v2_body(registered, [GOOD, GOOD])
    by_name = {t["name"]: t for t in body["inputs"]}
    assert body["inputs"][2]["name"] == "tenure_months"
    tenure = by_name["tenure_months"]
    if case == "shape-n-by-2":
        tenure.update(shape=[1, 2], data=[3.0, 4.0])
    elif case == "batch-sizes-differ":
        tenure.update(shape=[3], data=[3.0, 4.0, 5.0])
    elif case == "negative-dim":
        tenure["shape"] = [-1, 1]
    elif case == "shape-beyond-numpy":
        tenure.update(shape=[0, 2**70], data=[])
    elif case == "shape-product-beyond-int64":
        tenure.update(shape=[2**32, 2**32], data=[])  # numpy's product wraps to 0
    elif case == "int64-for-a-category":
        by_name["plan"].update(datatype="INT64", data=[1, 2])
    elif case == "strings-in-fp32":
        tenure["data"] = ["3", "4"]
    elif case == "null-in-int64":
        tenure.update(datatype="INT64", data=[None, 4])
    elif case == "outputs-parameters-not-an-object":
        body["outputs"] = [{"name": "prediction", "parameters": [1]}]
    response = http.post("/v2/models/churn/infer", json=body)
    assert response.status_code == 400, response.text
    assert_names_the_field(response, field)
    assert_still_serving(http, registered)


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("not-a-number", HEADER.lower()),
        ("negative", HEADER.lower()),
        ("beyond-the-body", HEADER.lower()),
        ("cuts-the-json", "body"),
        ("leaves-bytes-unclaimed", "binary data"),
        ("size-beyond-the-bytes", "inputs[2].parameters.binary_data_size"),
    ],
)
def test_a_wrong_inference_header_content_length_gets_400(http, registered, case, field):
    def binary(extra_size: int = 0) -> bytes:
        """The JSON header of a body sending tenure_months as binary FP32."""
        body = v2_body(registered, [GOOD])
        tenure = body["inputs"][2]
        assert tenure["name"] == "tenure_months"
        tenure.pop("data")
        tenure["parameters"] = {"binary_data_size": len(blob) + extra_size}
        return json.dumps(body).encode()

    blob = np.asarray([GOOD["tenure_months"]], dtype="<f4").tobytes()
    header = binary()
    good = http.post(
        "/v2/models/churn/infer", content=header + blob, headers={HEADER: str(len(header))}
    )
    assert good.status_code == 200, good.text  # the right length: answered
    if case == "size-beyond-the-bytes":
        header = binary(extra_size=4)
    content, length = header + blob, str(len(header))
    if case == "not-a-number":
        length = "twelve"
    elif case == "negative":
        length = "-1"
    elif case == "beyond-the-body":
        length = str(len(content) + 1)
    elif case == "cuts-the-json":
        length = str(len(header) - 2)
    elif case == "leaves-bytes-unclaimed":
        content += b"\0\0\0\0"
    response = http.post("/v2/models/churn/infer", content=content, headers={HEADER: length})
    assert response.status_code == 400, response.text
    assert_names_the_field(response, field)
    assert_still_serving(http, registered)
