"""The hand-written peer: FastAPI + uvicorn calling the native model's predict.

    PYTHONPATH=. RAYSHIP_BENCH_NATIVE=DIR uvicorn benchmarks.peers.fastapi_app:app --workers 2

A sync ``def`` endpoint, as FastAPI's docs advise for blocking work (it runs in the
thread pool, so the event loop keeps accepting connections); the body is validated
by a pydantic model, as a FastAPI user writes it.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.peers.native import NativeModel

model = NativeModel.load(os.environ["RAYSHIP_BENCH_NATIVE"])
app = FastAPI()


class Instances(BaseModel):
    instances: list[list[float]]


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


@app.post("/predict")
def predict(body: Instances) -> dict[str, list]:
    return {"predictions": model.predict(body.instances).tolist()}
