"""The BentoML peer (runs in its own venv, benchmarks/.venv-bentoml).

    PYTHONPATH=. RAYSHIP_BENCH_NATIVE=DIR bentoml serve benchmarks.peers.bento_service:DigitsPeer

``workers="cpu_count"``: one worker process per CPU core, what BentoML's docs
advise for CPU-bound Python models (the GIL keeps one process on one core); the
rest of the configuration is BentoML's default (``threads: 1`` per worker for a
sync API). POST /predict with ``{"instances": [[...], ...]}``.
"""

from __future__ import annotations

import os

import bentoml

from benchmarks.peers.native import NativeModel


@bentoml.service(workers="cpu_count")
class DigitsPeer:
    def __init__(self) -> None:
        self.model = NativeModel.load(os.environ["RAYSHIP_BENCH_NATIVE"])

    @bentoml.api
    def predict(self, instances: list[list[float]]) -> dict[str, list]:
        return {"predictions": self.model.predict(instances).tolist()}
