"""The Serve application: every model of an endpoint behind one FastAPI ingress.

The endpoint is built from a Serve config (:mod:`services.serve_config`):
``import_path: services.app:build`` with ``args: {tracking_uri}``, and the models in
the ``ModelServer`` deployment's ``user_config``. Routes (``route_prefix`` "/"):

KServe V1
  ``POST /v1/models/{name}:predict`` — ``{"instances": [...], "return_probabilities": bool}``
  → ``{"predictions": [...], "model_version": "N"}`` (+ ``"probabilities"``, ``"classes"``);
  ``GET /v1/models/{name}`` — name, version, ready, task, inputs, outputs, classes, canary;
  ``GET /v1/models`` — the served routes.
Open Inference Protocol (V2, :mod:`services.v2`)
  ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``,
  ``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``,
  ``POST /v2/models/{name}[/versions/{v}]/infer``.

Every error is JSON ``{"error": "...", "details": [...]}``: 400 bad input (details name
the field, the row and what was expected), 404 unknown model, version or path, 405
wrong method, 413 body over the model's ``max_request_bytes``, 422 should FastAPI's own
validation ever refuse a request. Bad input never yields a 5xx. The 503 (with
``Retry-After``) for a full queue comes from Serve's proxy (``backpressure_config``),
before a request reaches a replica.

Per model the replica holds the production version and, optionally, a canary with a
traffic weight. The split is deterministic per replica (every ``1/weight``-th request
goes to the canary), so a 10% canary gets 10% of a replica's requests, not 10% on
average. Every answer names the version that produced it (``model_version``).

``reconfigure`` (Serve's ``user_config``) loads what changed — a new ref, a new canary —
next to the versions being served, then switches over in one assignment: requests
already routed finish on the version they started with, later ones use the new one, and
none waits for a restart. A ref that fails to load (unknown, bad checksum) on a model
already served does not raise — Serve would mark the whole deployment failed and stop
routing to it — but keeps the served versions and reports the failure as ``error`` in
``GET /v1/models/{name}``, which :func:`services.deploy.deploy` turns into an error (and
a rollback). On a first load there is nothing to keep: it raises and the deploy fails.

Requests are validated one by one (a bad request is refused on its own) and the valid
ones of a model go through one ``@serve.batch`` batcher per model, which runs them in one
onnxruntime call (one per version while a swap or canary is under way); the batch size
counts requests, whatever their rows.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request``
annotation on the ingress methods (as a string it becomes a required query parameter).

Replicas import only this module, :mod:`services.predictor`, :mod:`services.v1`,
:mod:`services.v2`, :mod:`services.metrics` (onnxruntime, numpy, Ray) and
:mod:`training.registry` (the MLflow client) — never torch or scikit-learn.
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import v2
from services.metrics import EndpointMetrics
from services.predictor import BadInput, OnnxPredictor, problem
from services.v1 import parse_v1
from training import registry

logger = logging.getLogger("ray.serve")

MODEL_KEYS = (
    "name",
    "route",
    "ref",
    "canary",
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_request_bytes",
)
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


class UnknownModel(LookupError):
    """A request for a model this endpoint does not serve."""

    def __init__(self, requested: str, served: list[str]):
        super().__init__(f"no model {requested!r} here; this endpoint serves {served}")
        self.requested, self.served = requested, served


class UnknownVersion(LookupError):
    """A request for a version of a served model that is not loaded."""

    def __init__(self, route: str, requested: str, loaded: list[str]):
        super().__init__(
            f"{route}: version {requested!r} is not served here; loaded versions: {loaded}"
        )
        self.requested, self.loaded = requested, loaded


class BodyTooLarge(ValueError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"request body of {size} bytes or more exceeds the limit of {limit}")
        self.size, self.limit = size, limit


def error_body(message: str, details: list[Any] | None = None) -> dict[str, Any]:
    return {"error": message, "details": details or []}


app = FastAPI(title="rayship", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(BadInput)
async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.details), status_code=400)


@app.exception_handler(UnknownModel)
async def _unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
    details = [problem("name", f"a served model: {exc.served}", repr(exc.requested))]
    return JSONResponse(error_body(str(exc), details), 404)


@app.exception_handler(UnknownVersion)
async def _unknown_version(_: Request, exc: UnknownVersion) -> JSONResponse:
    details = [problem("version", f"a loaded version: {exc.loaded}", repr(exc.requested))]
    return JSONResponse(error_body(str(exc), details), 404)


@app.exception_handler(BodyTooLarge)
async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
    details = [problem("body", f"at most {exc.limit} bytes", f"{exc.size} bytes or more")]
    return JSONResponse(error_body(str(exc), details), 413)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = [
        problem(".".join(map(str, e.get("loc", ()))), e.get("msg", ""), e.get("type", ""))
        for e in exc.errors()
    ]
    return JSONResponse(error_body("request does not fit the API", details), 422)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


Item = tuple[OnnxPredictor, dict[str, np.ndarray]]


def make_batcher(route: str, max_batch_size: int, batch_wait_timeout_s: float, metrics: Any):
    """A ``@serve.batch`` function for one model: requests' feeds in, one graph run per
    version in the batch, each request's slice of the outputs back. Its name,
    ``infer_<route>``, tags Serve's batch metrics (queue length, batch size)."""

    async def infer(items: list[Item]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        results: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (predictor, _) in enumerate(items):
            groups.setdefault(id(predictor), []).append(i)
        for members in groups.values():
            predictor = items[members[0]][0]
            feeds = [items[i][1] for i in members]
            rows = sum(len(f[predictor.names[0]]) for f in feeds)
            metrics.batch_rows.observe(rows, tags={"model": route, "version": predictor.version})
            for i, out in zip(members, predictor.run_many(feeds), strict=True):
                results[i] = out
        return results

    infer.__name__ = infer.__qualname__ = f"infer_{route}"
    return serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(
        infer
    )


@dataclass
class Served:
    """One model on the endpoint: its versions, its batcher and its request limit."""

    name: str
    route: str
    production: OnnxPredictor
    canary: OnnxPredictor | None
    canary_weight: float
    infer: Any
    max_request_bytes: int
    routed: int = 0
    error: dict[str, Any] | None = None  # the refs that last failed to load, and why

    def pick(self) -> OnnxPredictor:
        """The version for the next request: the canary on every ``1/weight``-th one."""
        if self.canary is None or self.canary_weight <= 0:
            return self.production
        self.routed += 1
        n, w = self.routed, self.canary_weight
        return self.canary if math.floor(n * w) > math.floor((n - 1) * w) else self.production

    @property
    def versions(self) -> list[str]:
        return [self.production.version] + ([self.canary.version] if self.canary else [])

    def at(self, version: str | None) -> OnnxPredictor:
        """The loaded version ``version`` (V2's ``/versions/{v}``), or the routed pick."""
        if version is None:
            return self.pick()
        for predictor in (self.production, self.canary):
            if predictor is not None and predictor.version == version:
                return predictor
        raise UnknownVersion(self.route, version, self.versions)


def parse_models(config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The per-model entries of ``user_config``, checked (ValueError naming the key)."""
    config = dict(config or {})
    unknown = sorted(set(config) - {"models"})
    if unknown:
        raise ValueError(f"user_config: unknown key(s) {unknown}; allowed: ['models']")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("user_config.models: expected a non-empty list of models")
    entries, routes = [], set()
    for i, entry in enumerate(models):
        where = f"user_config.models[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        bad = sorted(set(entry) - set(MODEL_KEYS))
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; allowed: {list(MODEL_KEYS)}")
        for key in ("name", "ref"):
            if not isinstance(entry.get(key), str | int) or entry.get(key) in ("", None):
                raise ValueError(f"{where}.{key}: expected a model name / version or alias")
        route = str(entry.get("route") or entry["name"])
        if route in routes:
            raise ValueError(f"{where}.route: {route!r} is served twice")
        routes.add(route)
        canary = entry.get("canary")
        if canary is not None:
            if not isinstance(canary, dict) or "ref" not in canary:
                raise ValueError(f"{where}.canary: expected {{ref, weight}} or null")
            weight = float(canary.get("weight", 0.0))
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"{where}.canary.weight: expected 0 to 1, got {weight}")
            canary = {"ref": str(canary["ref"]), "weight": weight}
        entries.append(
            {
                "name": str(entry["name"]),
                "route": route,
                "ref": str(entry["ref"]),
                "canary": canary,
                "max_batch_size": int(entry.get("max_batch_size") or 64),
                "batch_wait_timeout_s": float(entry.get("batch_wait_timeout_s") or 0.0),
                "max_request_bytes": int(
                    entry.get("max_request_bytes") or DEFAULT_MAX_REQUEST_BYTES
                ),
            }
        )
    return entries


class _Observed:
    """Counts one request in the metrics with the status code its outcome maps to."""

    CODES = ((BadInput, 400), (UnknownModel, 404), (UnknownVersion, 404), (BodyTooLarge, 413))

    def __init__(self, metrics: EndpointMetrics, protocol: str):
        self.metrics, self.protocol = metrics, protocol
        self.model, self.version = "", ""
        self.started = time.perf_counter()

    def __enter__(self) -> "_Observed":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        code = 200
        if exc is not None:
            code = next((c for kind, c in self.CODES if isinstance(exc, kind)), 500)
        self.metrics.observe(self.model, self.version, code, self.protocol, self.started)
        return False


@serve.deployment
@serve.ingress(app)
class ModelServer:
    """Serves the models of ``user_config``; see the module docstring for the routes."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.models: dict[str, Served] = {}
        self.metrics = EndpointMetrics()

    # -- configuration -------------------------------------------------------------

    async def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Apply ``user_config``; see the module docstring."""
        new: dict[str, Served] = {}
        for entry in parse_models(config):
            old = self.models.get(entry["route"])
            if old is not None and old.name != entry["name"]:
                old = None
            try:
                production, canary = await self._versions(entry, old)
                weight, error = (entry["canary"]["weight"] if canary else 0.0), None
            except Exception as exc:
                if old is None:
                    raise  # nothing served yet: the deploy fails, nothing is lost
                error = {
                    "ref": entry["ref"],
                    "canary_ref": (entry["canary"] or {}).get("ref"),
                    "message": f"{type(exc).__name__}: {exc}",
                }
                logger.error("%s: keeping version %s: %s", entry["route"], old.versions, exc)
                production, canary, weight = old.production, old.canary, old.canary_weight
            if old is not None:
                infer = old.infer
                infer.set_max_batch_size(entry["max_batch_size"])
                infer.set_batch_wait_timeout_s(entry["batch_wait_timeout_s"])
            else:
                infer = make_batcher(
                    entry["route"],
                    entry["max_batch_size"],
                    entry["batch_wait_timeout_s"],
                    self.metrics,
                )
            new[entry["route"]] = Served(
                name=entry["name"],
                route=entry["route"],
                production=production,
                canary=canary,
                canary_weight=weight,
                infer=infer,
                max_request_bytes=entry["max_request_bytes"],
                error=error,
            )
        self.models = new  # the switch-over: one assignment
        for served in new.values():
            self.metrics.served(
                served.route,
                served.production.version,
                served.canary.version if served.canary else None,
                served.canary_weight,
            )
            logger.info(
                "serving %s as %s: version %s%s",
                served.name,
                served.route,
                served.production.version,
                f", canary {served.canary.version} at {served.canary_weight:.0%}"
                if served.canary
                else "",
            )

    async def _versions(
        self, entry: dict[str, Any], old: Served | None
    ) -> tuple[OnnxPredictor, OnnxPredictor | None]:
        """The production and canary predictors an entry asks for."""
        production = await self._predictor(entry["name"], entry["route"], entry["ref"], old)
        canary = None
        if entry["canary"] is not None:
            canary = await self._predictor(
                entry["name"], entry["route"], entry["canary"]["ref"], old
            )
        return production, canary

    async def _predictor(
        self, name: str, route: str, ref: str, old: Served | None
    ) -> OnnxPredictor:
        """The predictor for ``name`` at ``ref``: one already loaded, else loaded now
        (in a thread, so requests keep being served meanwhile)."""
        resolved = await asyncio.to_thread(registry.resolve_version, self.tracking_uri, name, ref)
        version = str(resolved.version)
        if old is not None:
            for predictor in (old.production, old.canary):
                if predictor is not None and predictor.version == version:
                    return predictor
        artifact = await asyncio.to_thread(registry.load_artifact, self.tracking_uri, name, version)
        return OnnxPredictor(artifact.onnx_bytes, artifact.schema, route, artifact.version)

    def _model(self, route: str) -> Served:
        served = self.models.get(route)
        if served is None:
            raise UnknownModel(route, sorted(self.models))
        return served

    # -- V1 ------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"models": sorted(self.models)}

    @app.get("/v1/models/{name}")
    async def model_metadata(self, name: str) -> dict[str, Any]:
        served = self._model(name)
        meta = served.production.metadata()
        meta["canary"] = (
            {"version": served.canary.version, "weight": served.canary_weight}
            if served.canary
            else None
        )
        meta["error"] = served.error
        return meta

    @app.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> Response:
        with _Observed(self.metrics, "v1") as seen:
            served = self._model(name)
            seen.model = served.route
            instances, want_probabilities = parse_v1(
                await read_body(request, served.max_request_bytes)
            )
            predictor = served.pick()  # one version for the whole request
            seen.version = predictor.version
            predictor.check_options(want_probabilities)
            feeds = predictor.feeds(instances)
            prediction, probabilities = await served.infer((predictor, feeds))
            return JSONResponse(predictor.respond(prediction, probabilities, want_probabilities))

    # -- V2 (Open Inference Protocol) ------------------------------------------------

    @app.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        return {"name": "rayship", "version": _version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live(self) -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> JSONResponse:
        ready = bool(self.models)
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    @app.get("/v2/models/{name}")
    async def v2_metadata(self, name: str) -> dict[str, Any]:
        served = self._model(name)
        return v2.metadata(served.production, served.route, served.versions)

    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_version_metadata(self, name: str, version: str) -> dict[str, Any]:
        served = self._model(name)
        return v2.metadata(served.at(version), served.route, [version])

    @app.get("/v2/models/{name}/ready")
    async def v2_ready(self, name: str) -> dict[str, Any]:
        served = self._model(name)
        return {"name": served.route, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_version_ready(self, name: str, version: str) -> dict[str, Any]:
        served = self._model(name)
        served.at(version)
        return {"name": served.route, "version": version, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._v2_infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_version_infer(self, name: str, version: str, request: Request) -> Response:
        return await self._v2_infer(name, version, request)

    async def _v2_infer(self, name: str, version: str | None, request: Request) -> Response:
        with _Observed(self.metrics, "v2") as seen:
            served = self._model(name)
            seen.model = served.route
            body = await read_body(request, served.max_request_bytes)
            parsed = v2.parse_infer(body, request.headers.get(v2.HEADER_LENGTH))
            predictor = served.at(version)
            seen.version = predictor.version
            feeds = v2.feeds(predictor, parsed.tensors)
            prediction, probabilities = await served.infer((predictor, feeds))
            content, headers = v2.response(
                parsed, predictor, served.route, prediction, probabilities
            )
            return Response(content, headers=headers)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rayship")
    except PackageNotFoundError:
        return "unknown"


def build(args: dict[str, Any]) -> Application:
    """The application builder of the Serve config (``import_path: services.app:build``).
    ``args``: ``{"tracking_uri": ...}``; the models come in the deployment's ``user_config``."""
    unknown = sorted(set(args) - {"tracking_uri"})
    if unknown or not args.get("tracking_uri"):
        raise ValueError(f"application args: expected {{tracking_uri}}, got keys {sorted(args)}")
    return ModelServer.bind(args["tracking_uri"])
