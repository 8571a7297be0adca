"""The endpoint's own Prometheus metrics, exported through Ray's metrics agent (the
``/metrics`` port of every Ray node, which the PodMonitors scrape on Kubernetes).

Ray prefixes application metrics with ``ray_`` and adds its own tags (deployment,
replica, application). Alongside these, Serve exports per-deployment metrics of its
own: ``ray_serve_num_http_requests`` / ``ray_serve_num_http_error_requests`` (by status
code, including the 503s the proxy sheds before a request reaches a replica),
``ray_serve_deployment_queued_queries`` (requests waiting at the proxy), and for each
model's batcher (``function_name`` = ``infer_<route>``) ``ray_serve_batch_queue_length``
and ``ray_serve_actual_batch_size`` (requests per batch).

- ``rayship_requests`` (counter): model, version, code, protocol (v1 | v2);
- ``rayship_request_latency_ms`` (histogram): model, version, protocol — time in the
  replica, from routing to the response body;
- ``rayship_batch_rows`` (histogram): model, version — rows per onnxruntime run;
- ``rayship_model_version`` (gauge): model, role (production | canary) — the version
  number served, and ``rayship_canary_weight`` (gauge): model.
"""

from __future__ import annotations

import time

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
ROWS_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


class EndpointMetrics:
    """The metric objects of one replica (created once, tagged per call)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "rayship_requests",
            description="Requests answered by a replica, by model, version, status code, protocol.",
            tag_keys=("model", "version", "code", "protocol"),
        )
        self.latency = Histogram(
            "rayship_request_latency_ms",
            description="Time a request spent in the replica (ms).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model", "version", "protocol"),
        )
        self.batch_rows = Histogram(
            "rayship_batch_rows",
            description="Rows in one onnxruntime run (several requests batched).",
            boundaries=ROWS_BOUNDARIES,
            tag_keys=("model", "version"),
        )
        self.version = Gauge(
            "rayship_model_version",
            description="The registered version served, by model and role.",
            tag_keys=("model", "role"),
        )
        self.canary_weight = Gauge(
            "rayship_canary_weight",
            description="Share of a model's traffic sent to its canary version.",
            tag_keys=("model",),
        )

    def observe(self, model: str, version: str, code: int, protocol: str, started: float) -> None:
        self.requests.inc(
            tags={"model": model, "version": version, "code": str(code), "protocol": protocol}
        )
        self.latency.observe(
            (time.perf_counter() - started) * 1000,
            tags={"model": model, "version": version, "protocol": protocol},
        )

    def served(self, model: str, production: str, canary: str | None, weight: float) -> None:
        self.version.set(_number(production), tags={"model": model, "role": "production"})
        self.version.set(_number(canary) if canary else 0, tags={"model": model, "role": "canary"})
        self.canary_weight.set(weight if canary else 0.0, tags={"model": model})


def _number(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return -1.0
