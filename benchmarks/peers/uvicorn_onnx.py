"""The ``uvicorn-onnx`` reference: rayship's request code as a bare ASGI app, no Ray Serve.

    PYTHONPATH=. RAYSHIP_BENCH_ONNX=FILE RAYSHIP_BENCH_SCHEMA=FILE RAYSHIP_BENCH_ROUTE=NAME \
        uvicorn benchmarks.peers.uvicorn_onnx:app --workers 2 --no-access-log --lifespan off

What a rayship replica does for one V1 request, and nothing else: ``parse_v1``,
``OnnxPredictor.check_options``/``feeds``, one ``run_many`` (the lone request's batch),
``respond``, JSON out with the endpoint's codec (``services.http.dumps``, orjson). The
same ONNX graph, the same onnxruntime session options (``OnnxPredictor``'s). No
framework (a plain ASGI callable, as the replica's ``__call__`` is a plain handler),
no access log (rayship's replicas write none by default). It is the reference of issue
8's "rayship >= 0.5x the throughput of a bare uvicorn app running the same ONNX graph"
(one worker per core, like the peers), and, with one worker, the time split's "same
code under plain uvicorn".

Routes: ``POST /v1/models/{RAYSHIP_BENCH_ROUTE}:predict`` (V1, answers as rayship does;
bad input gets rayship's JSON 400), ``POST /trivial`` (reads the body, answers
``{"ok":1}``: the HTTP stack alone), ``GET /health``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.predictor import BadInput, OnnxPredictor

try:
    from services.http import dumps
except ImportError:  # before the endpoint's orjson codec

    def dumps(value) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


try:
    from services.v1 import parse_v1
except ImportError:  # before the V1 module was split out
    from services.app import parse_v1

ROUTE = os.environ["RAYSHIP_BENCH_ROUTE"]
PREDICT = f"/v1/models/{ROUTE}:predict"
predictor = OnnxPredictor(
    Path(os.environ["RAYSHIP_BENCH_ONNX"]).read_bytes(),
    json.loads(Path(os.environ["RAYSHIP_BENCH_SCHEMA"]).read_text()),
    ROUTE,
    "1",
)


def predict(body: bytes) -> tuple[int, bytes]:
    """Status and JSON answer of one V1 predict body, as a rayship replica computes them."""
    try:
        instances, want = parse_v1(body)
        predictor.check_options(want)
        feeds = predictor.feeds(instances)
        ((prediction, probabilities),) = predictor.run_many([feeds])
        return 200, dumps(predictor.respond(prediction, probabilities, want))
    except BadInput as exc:
        return 400, dumps({"error": exc.message, "details": exc.details})


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send) -> None:
    """The ASGI callable (HTTP only: run with ``--lifespan off``)."""
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    body = await _body(receive)
    if method == "POST" and path == PREDICT:
        status, payload = predict(body)
    elif method == "POST" and path == "/trivial":
        status, payload = 200, b'{"ok":1}'
    elif method == "GET" and path == "/health":
        status, payload = 200, b'{"ok":true}'
    else:
        status, payload = 404, dumps({"error": f"no route {method} {path}", "details": []})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
