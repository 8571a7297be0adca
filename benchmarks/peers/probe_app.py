"""Time-split probe (not a peer): rayship's own request code under plain uvicorn, no Ray Serve.

    PYTHONPATH=. RAYSHIP_BENCH_ONNX=FILE RAYSHIP_BENCH_SCHEMA=FILE RAYSHIP_BENCH_ROUTE=NAME \
        uvicorn benchmarks.peers.probe_app:app --workers 1

- ``POST /trivial``: reads the body, answers ``{"ok": 1}``: the HTTP stack alone;
- ``POST /v1/models/{route}:predict``: what a rayship replica does for one request
  (``parse_v1``, ``OnnxPredictor.feeds``, ``run_many``, ``respond``), without the
  Serve proxy, the router and ``@serve.batch``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

try:
    from services.v1 import parse_v1
except ImportError:  # before the V1 module was split out
    from services.app import parse_v1
from services.predictor import OnnxPredictor

ROUTE = os.environ["RAYSHIP_BENCH_ROUTE"]
predictor = OnnxPredictor(
    Path(os.environ["RAYSHIP_BENCH_ONNX"]).read_bytes(),
    json.loads(Path(os.environ["RAYSHIP_BENCH_SCHEMA"]).read_text()),
    ROUTE,
    "1",
)
app = FastAPI()


@app.post("/trivial")
async def trivial(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"ok": 1})


@app.post("/v1/models/{name}:predict")
async def predict(name: str, request: Request) -> JSONResponse:
    instances, want = parse_v1(await request.body())
    feeds = predictor.feeds(instances)
    ((prediction, probabilities),) = predictor.run_many([feeds])
    return JSONResponse(predictor.respond(prediction, probabilities, want))
