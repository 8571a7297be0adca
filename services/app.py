"""The Serve application: every model of an endpoint behind one deployment, ``ModelServer``.

The endpoint is built from a Serve config (:mod:`services.serve_config`):
``import_path: services.app:build`` with ``args: {tracking_uri}``, and the models in
the ``ModelServer`` deployment's ``user_config``. Routes (``route_prefix`` "/"):

KServe V1
  ``POST /v1/models/{name}:predict`` — ``{"instances": [...], "return_probabilities": bool}``
  → ``{"predictions": [...], "model_version": "N"}`` (+ ``"probabilities"``, ``"classes"``);
  ``GET /v1/models/{name}`` — name, version, ready, task, inputs, outputs, classes, canary;
  ``GET /v1/models`` — the served routes;
  ``GET /v1/models/{name}/drift`` — the drift report of the model's live traffic, all
  replicas (:mod:`services.monitor`): 409 when the served version has no drift reference
  (registered before drift.json) or its monitor is off (``sample_rate`` 0), and a report
  with ``window_rows`` 0 before any row was counted.
Open Inference Protocol (V2, :mod:`services.v2`)
  ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``,
  ``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``,
  ``POST /v2/models/{name}[/versions/{v}]/infer``.
OpenAPI
  ``GET /openapi.json`` — an OpenAPI 3.0.3 document of the routes above, with each served
  model's own predict and infer bodies (its features and their types) at its concrete
  paths (:mod:`services.openapi`), for client generators and fuzzers.

The deployment takes every request in ``__call__`` and dispatches it through the route
table of :mod:`services.http` (no FastAPI: its routing cost a sixth of a request, see
there). With Serve's native ingress (:mod:`services.ingress`) a request goes from HAProxy
straight to a replica's own HTTP server, and from there to ``__call__``.

Every error is JSON ``{"error": "...", "details": [...]}``: 400 bad input (details name
the field, the row and what was expected), 404 unknown model, version or path, 405
wrong method (with ``Allow``), 413 body over the model's ``max_request_bytes``, and 500
only for a fault of the server itself (logged with its traceback), never for bad input.
The 503 (with ``Retry-After``) for a full queue comes from Serve (``backpressure_config``)
before a request reaches this code: with the native ingress, each replica refuses what
would queue beyond ``max_queued_requests`` at that replica.

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
counts requests, whatever their rows. With ``batch_wait_timeout_s: 0`` (the default) a
lone request is run at once; under load, requests that arrive while a batch runs form
the next one.

Each request's feeds are handed to the model's drift sampling (:mod:`services.monitor`)
right after they are built: a constant-time append on the production version's requests,
sampled per request; slot codes and the push to the model's merger actor happen in a
background task, never on the request path.

Replicas import only this module, :mod:`services.http`, :mod:`services.predictor`,
:mod:`services.v1`, :mod:`services.v2`, :mod:`services.openapi`, :mod:`services.metrics`,
:mod:`services.monitor` (onnxruntime, numpy, orjson, Starlette, Ray),
:mod:`training.registry` (the MLflow client) and :mod:`training.drift` — never torch or
scikit-learn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from services import openapi, v2
from services.http import (
    BodyTooLarge,
    Routes,
    error_response,
    json_response,
    read_body,
)
from services.metrics import EndpointMetrics
from services.monitor import ReplicaMonitor, settings_for
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
    "monitor",
)
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024

ROUTES = Routes(
    [
        ("GET", "/v1/models", "list_models"),
        ("POST", "/v1/models/{name}:predict", "predict"),
        ("GET", "/v1/models/{name}", "model_metadata"),
        ("GET", "/v1/models/{name}/drift", "drift"),
        ("GET", "/v2", "server_metadata"),
        ("GET", "/v2/health/live", "live"),
        ("GET", "/v2/health/ready", "ready"),
        ("GET", "/v2/models/{name}", "v2_metadata"),
        ("GET", "/v2/models/{name}/ready", "v2_ready"),
        ("POST", "/v2/models/{name}/infer", "v2_infer"),
        ("GET", "/v2/models/{name}/versions/{version}", "v2_metadata"),
        ("GET", "/v2/models/{name}/versions/{version}/ready", "v2_ready"),
        ("POST", "/v2/models/{name}/versions/{version}/infer", "v2_infer"),
        ("GET", "/openapi.json", "openapi_json"),
    ]
)


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


def error_for(exc: Exception) -> Response | None:
    """The JSON error response for an exception a client caused, or None for others."""
    if isinstance(exc, BadInput):
        return error_response(400, exc.message, exc.details)
    if isinstance(exc, UnknownModel):
        details = [problem("name", f"a served model: {exc.served}", repr(exc.requested))]
        return error_response(404, str(exc), details)
    if isinstance(exc, UnknownVersion):
        details = [problem("version", f"a loaded version: {exc.loaded}", repr(exc.requested))]
        return error_response(404, str(exc), details)
    if isinstance(exc, BodyTooLarge):
        details = [problem("body", f"at most {exc.limit} bytes", f"{exc.size} bytes or more")]
        return error_response(413, str(exc), details)
    return None


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
    monitor: ReplicaMonitor
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
                "monitor": _monitor_override(entry.get("monitor"), f"{where}.monitor"),
            }
        )
    return entries


def _monitor_override(value: Any, where: str) -> dict[str, float] | None:
    """A model's ``monitor`` entry of ``user_config``: null, or ``{sample_rate}`` with
    0 <= sample_rate <= 1 (0 turns the drift monitor off for that model)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"sample_rate"}:
        raise ValueError(f"{where}: expected {{sample_rate: 0 to 1}} or null, got {value!r}")
    rate = value.get("sample_rate")
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{where}.sample_rate: expected a number from 0 to 1, got {rate!r}")
    return {"sample_rate": float(rate)}


class _Observed:
    """Counts one request in the metrics with the status code its outcome maps to."""

    CODES = ((BadInput, 400), (UnknownModel, 404), (UnknownVersion, 404), (BodyTooLarge, 413))

    def __init__(self, metrics: EndpointMetrics, protocol: str):
        self.metrics, self.protocol = metrics, protocol
        self.model, self.version = "", ""
        self.started = time.perf_counter()

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        code = 200
        if exc is not None:
            code = next((c for kind, c in self.CODES if isinstance(exc, kind)), 500)
        self.metrics.observe(self.model, self.version, code, self.protocol, self.started)
        return False


@serve.deployment
class ModelServer:
    """Serves the models of ``user_config``; see the module docstring for the routes."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.models: dict[str, Served] = {}
        self.metrics = EndpointMetrics()
        # (name, version) -> (drift reference or None, spec YAML) of the loaded versions
        self.loaded: dict[tuple[str, str], tuple[dict[str, Any] | None, str]] = {}
        self.monitors: dict[str, ReplicaMonitor] = {}  # route -> its drift sampling

    # -- HTTP ----------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        """Dispatch one request to its handler; client errors become JSON 4xx."""
        name, params, allowed = ROUTES.match(request.method, request.url.path)
        if name is None:
            if allowed:
                return error_response(
                    405,
                    f"method {request.method} is not allowed on {request.url.path}",
                    [problem("method", f"one of {allowed}", request.method)],
                    headers={"Allow": ", ".join(allowed)},
                )
            return error_response(
                404,
                f"no route {request.url.path}",
                [problem("path", "a route of GET /openapi.json", request.url.path)],
            )
        try:
            return await getattr(self, name)(request, **params)
        except Exception as exc:
            response = error_for(exc)
            if response is None:
                logger.exception("%s %s failed", request.method, request.url.path)
                return error_response(500, f"internal error: {type(exc).__name__}")
            return response

    # -- configuration -------------------------------------------------------------

    async def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Apply ``user_config``; see the module docstring."""
        new: dict[str, Served] = {}
        entries = parse_models(config)
        for entry in entries:
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
                monitor=self.monitors.get(entry["route"])
                or ReplicaMonitor(entry["route"], _replica_id()),
                error=error,
            )
        self.models = new  # the switch-over: one assignment
        self._monitor(new, entries)
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

    def _monitor(self, served: dict[str, Served], entries: list[dict[str, Any]]) -> None:
        """Point each model's drift sampling at its production version (services.monitor)."""
        for entry in entries:
            model = served[entry["route"]]
            version = model.production.version
            reference, spec_yaml = self.loaded.get((model.name, version), (None, ""))
            settings = settings_for(reference, spec_yaml, entry["monitor"])
            model.monitor.configure(version, reference, settings)
        for route, monitor in self.monitors.items():
            if route not in served:
                monitor.close()
        self.monitors = {route: model.monitor for route, model in served.items()}
        kept = {(m.name, v) for m in served.values() for v in m.versions}
        self.loaded = {key: value for key, value in self.loaded.items() if key in kept}

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
        predictor = OnnxPredictor(artifact.onnx_bytes, artifact.schema, route, artifact.version)
        self.loaded[(name, version)] = (getattr(artifact, "drift", None), artifact.spec_yaml)
        return predictor

    def _model(self, route: str) -> Served:
        served = self.models.get(route)
        if served is None:
            raise UnknownModel(route, sorted(self.models))
        return served

    # -- V1 ------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return json_response({"models": sorted(self.models)})

    async def model_metadata(self, request: Request, name: str) -> Response:
        served = self._model(name)
        meta = served.production.metadata()
        meta["canary"] = (
            {"version": served.canary.version, "weight": served.canary_weight}
            if served.canary
            else None
        )
        meta["error"] = served.error
        return json_response(meta)

    async def predict(self, request: Request, name: str) -> Response:
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
            served.monitor.observe(predictor.version, feeds)
            prediction, probabilities = await served.infer((predictor, feeds))
            return json_response(predictor.respond(prediction, probabilities, want_probabilities))

    async def drift(self, request: Request, name: str) -> Response:
        """``GET /v1/models/{name}/drift``: the drift report of the model's window (all
        replicas), :func:`training.drift.report`'s JSON. A window without rows yet is a
        report with ``window_rows`` 0, zeros and nothing drifted. 409 when the served
        version is not monitored (no drift reference, or ``monitor.sample_rate`` 0);
        503 when its merger cannot be reached."""
        served = self._model(name)
        monitor, version = served.monitor, served.production.version
        if monitor.settings is None:
            reference, _ = self.loaded.get((served.name, version), (None, ""))
            if reference is None:
                message = (
                    f"{served.route}: version {version} has no drift reference (drift.json); "
                    "it was registered before drift monitoring: register a new version"
                )
                expected = "a version registered with a drift reference"
            else:
                message = f"{served.route}: drift monitoring is off (monitor.sample_rate 0)"
                expected = "monitor.sample_rate above 0"
            return error_response(409, message, [problem("version", expected, version)])
        try:
            report = await monitor.report()
        except Exception as exc:
            logger.warning("%s: drift report failed: %s", served.route, exc)
            report = None
        if report is None:
            return error_response(
                503,
                f"{served.route}: the drift monitor is not reachable now; retry",
                headers={"Retry-After": "1"},
            )
        return json_response(report)

    async def openapi_json(self, request: Request) -> Response:
        """``GET /openapi.json``: the document of the models served now."""
        models = {route: served.production for route, served in self.models.items()}
        versions = {route: served.versions for route, served in self.models.items()}
        return json_response(openapi.document(models, versions, _version()))

    # -- V2 (Open Inference Protocol) ------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return json_response(
            {"name": "rayship", "version": _version(), "extensions": ["binary_tensor_data"]}
        )

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = bool(self.models)
        return json_response({"ready": ready}, 200 if ready else 503)

    async def v2_metadata(self, request: Request, name: str, version: str | None = None):
        served = self._model(name)
        if version is None:
            return json_response(v2.metadata(served.production, served.route, served.versions))
        return json_response(v2.metadata(served.at(version), served.route, [version]))

    async def v2_ready(self, request: Request, name: str, version: str | None = None):
        served = self._model(name)
        if version is None:
            return json_response({"name": served.route, "ready": True})
        served.at(version)
        return json_response({"name": served.route, "version": version, "ready": True})

    async def v2_infer(self, request: Request, name: str, version: str | None = None):
        with _Observed(self.metrics, "v2") as seen:
            served = self._model(name)
            seen.model = served.route
            body = await read_body(request, served.max_request_bytes)
            parsed = v2.parse_infer(body, request.headers.get(v2.HEADER_LENGTH))
            predictor = served.at(version)
            seen.version = predictor.version
            feeds = v2.feeds(predictor, parsed.tensors)
            served.monitor.observe(predictor.version, feeds)
            prediction, probabilities = await served.infer((predictor, feeds))
            content, headers = v2.response(
                parsed, predictor, served.route, prediction, probabilities
            )
            return Response(content, headers=headers)


def _replica_id() -> str:
    """This replica's id (tags its rows in the drift merger), or "" outside Serve."""
    try:
        context = serve.get_replica_context()
        return str(getattr(context, "replica_id", None) and context.replica_id.unique_id)
    except Exception:
        return ""


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
