"""The Serve application: one registered model behind a FastAPI ingress (KServe V1).

Routes (``route_prefix`` "/" when one model is served, so the paths are the
KServe ones):

- ``POST /v1/models/{name}:predict`` — ``{"instances": [...], "return_probabilities": bool}``
  → ``{"predictions": [...], "model_version": "N"}`` (+ ``"probabilities"``, ``"classes"``);
- ``GET /v1/models/{name}`` — name, version, ready, task, inputs (the feature
  schema), outputs, classes;
- ``GET /v1/models`` — ``{"models": [name]}``.

Every error is JSON ``{"error": "...", "details": [...]}``: 400 for bad input,
including a body that is not JSON (details name the field, the row and what was
expected), 404 for an unknown model name or path, 405 for a wrong method, 422
should FastAPI's own validation ever refuse a request; bad input never yields a 5xx.

The replica loads its version with :func:`training.registry.load_artifact`, which
verifies the ONNX checksum: a version that fails it makes the constructor raise,
so the deployment fails instead of serving it. ``reconfigure`` (Serve's
``user_config``) takes ``{"ref"|"version", "max_batch_size", "batch_wait_timeout_s"}``:
a new ref loads that version in place, without restarting the replica.

Requests are validated one by one (a bad request is refused on its own) and the
valid ones are run through the graph together with ``@serve.batch``; the batch
size counts requests, not rows.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request``
annotation on the ingress methods (as a string it becomes a required query parameter).

Replicas import only this module, :mod:`services.predictor` (onnxruntime, numpy)
and :mod:`training.registry` (the MLflow client) — never torch or scikit-learn.
"""

import json
import logging
import math
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.predictor import BadInput, OnnxPredictor, problem
from training import registry
from training.spec import ServeSpec

logger = logging.getLogger("ray.serve")

V1_KEYS = ("instances", "return_probabilities")
USER_CONFIG_KEYS = ("ref", "version", "max_batch_size", "batch_wait_timeout_s")


class UnknownModel(LookupError):
    """A request for a model this application does not serve."""

    def __init__(self, requested: str, served: str):
        super().__init__(f"no model {requested!r} here; this endpoint serves {served!r}")
        self.requested, self.served = requested, served


def error_body(message: str, details: list[Any] | None = None) -> dict[str, Any]:
    return {"error": message, "details": details or []}


app = FastAPI(title="rayship", docs_url=None, redoc_url=None)


@app.exception_handler(BadInput)
async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.details), status_code=400)


@app.exception_handler(UnknownModel)
async def _unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
    details = [problem("name", f"a served model: {[exc.served]}", repr(exc.requested))]
    return JSONResponse(error_body(str(exc), details), 404)


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


def parse_v1(body: bytes) -> tuple[Any, bool]:
    """The ``instances`` and ``return_probabilities`` of a V1 predict body, or BadInput."""
    expected = 'a JSON object {"instances": [...], "return_probabilities": false}'
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput(
            f"request body is not valid JSON: {exc}",
            [problem("body", expected, f"invalid JSON ({exc})")],
        ) from None
    if not isinstance(payload, dict):
        raise BadInput(
            f"request body: expected {expected}",
            [problem("body", expected, type(payload).__name__)],
        )
    unknown = [k for k in payload if k not in V1_KEYS]
    if unknown:
        raise BadInput(
            f"request body: unknown key(s) {unknown}; allowed: {list(V1_KEYS)}",
            [problem(k, f"one of {list(V1_KEYS)}", "unknown key") for k in unknown],
        )
    if "instances" not in payload:
        raise BadInput(
            "instances: missing",
            [problem("instances", "a list of objects or lists", "no such key")],
        )
    want = payload.get("return_probabilities", False)
    if not isinstance(want, bool):
        raise BadInput(
            "return_probabilities: expected true or false",
            [problem("return_probabilities", "a boolean", repr(want)[:40])],
        )
    return payload["instances"], want


@serve.deployment
@serve.ingress(app)
class ModelServer:
    """Serves one registered model; see the module docstring for the routes."""

    def __init__(self, name: str, ref: str, tracking_uri: str, route: str | None = None):
        self.name = name  # the registered model
        self.route = route or name  # the name clients use: /v1/models/{route}
        self.tracking_uri = tracking_uri
        self.predictor = self._load(ref)

    def _load(self, ref: str) -> OnnxPredictor:
        artifact = registry.load_artifact(self.tracking_uri, self.name, str(ref))
        predictor = OnnxPredictor(
            artifact.onnx_bytes, artifact.schema, self.route, artifact.version
        )
        logger.info("loaded %s version %s (ref %s)", self.name, artifact.version, ref)
        return predictor

    def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Apply ``user_config``: batching settings, and a new ref (version or alias) loaded
        in place. A ref that resolves to the version already served loads nothing; one
        that fails (unknown, bad checksum) raises and leaves the served version as it was."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"user_config: unknown key(s) {unknown}; allowed: {list(USER_CONFIG_KEYS)}"
            )
        if config.get("max_batch_size") is not None:
            self._infer.set_max_batch_size(int(config["max_batch_size"]))
        if config.get("batch_wait_timeout_s") is not None:
            self._infer.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        ref = config.get("ref", config.get("version"))
        if ref is not None:
            version = str(registry.resolve_version(self.tracking_uri, self.name, str(ref)).version)
            if version != self.predictor.version:
                self.predictor = self._load(version)

    def _check_name(self, name: str) -> None:
        if name != self.route:
            raise UnknownModel(name, self.route)

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"models": [self.route]}

    @app.get("/v1/models/{name}")
    async def model_metadata(self, name: str) -> dict[str, Any]:
        self._check_name(name)
        return self.predictor.metadata()

    @app.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> JSONResponse:
        self._check_name(name)
        instances, want_probabilities = parse_v1(await request.body())
        predictor = self.predictor  # one version for the whole request, even across a swap
        predictor.check_options(want_probabilities)
        feeds = predictor.feeds(instances)
        prediction, probabilities = await self._infer((predictor, feeds))
        return JSONResponse(predictor.respond(prediction, probabilities, want_probabilities))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _infer(
        self, items: list[tuple[OnnxPredictor, dict[str, np.ndarray]]]
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One graph run per predictor in the batch (two only while a swap is under way)."""
        results: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (predictor, _) in enumerate(items):
            groups.setdefault(id(predictor), []).append(i)
        for members in groups.values():
            predictor = items[members[0]][0]
            outputs = predictor.run_many([items[i][1] for i in members])
            for i, out in zip(members, outputs, strict=True):
                results[i] = out
        return results


def deployment_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve deployment options from the spec's ``serve`` section.

    - ``initial_replicas`` is at least 1, even with ``min_replicas: 0``, so the
      artifact is loaded (and its checksum verified) at deploy time and the first
      request finds a warm replica; the autoscaler may scale to zero afterwards.
    - ``max_ongoing_requests`` (not in the spec) is the larger of ``max_batch_size``
      (so a batch can fill) and twice ``target_ongoing_requests`` (so the autoscaler's
      target is reachable; Serve's default of 5 would be below the spec's default 8).
    """
    return {
        "autoscaling_config": {
            "min_replicas": spec.min_replicas,
            "initial_replicas": max(1, spec.min_replicas),
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.target_ongoing_requests,
        },
        "max_ongoing_requests": max(
            spec.max_batch_size, math.ceil(2 * spec.target_ongoing_requests)
        ),
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": {"num_cpus": spec.cpus_per_replica},
        "user_config": {
            "max_batch_size": spec.max_batch_size,
            "batch_wait_timeout_s": spec.batch_wait_timeout_s,
        },
    }


def build_app(
    name: str,
    ref: str,
    tracking_uri: str,
    serve_spec: ServeSpec | None = None,
    *,
    user_config: dict[str, Any] | None = None,
) -> Application:
    """The application serving ``name`` at ``ref`` (a version number or an alias), known
    to clients as the spec's ``serve.route`` (default: the model name).

    ``user_config`` entries are merged over the batching settings from the spec, and
    a ``"ref"`` there wins over ``ref`` (Serve calls ``reconfigure`` after the
    constructor). Only a declarative deploy (a Serve config file, ``serveConfigV2``)
    that changes nothing but ``user_config`` reconfigures the running replicas in
    place: ``serve.run`` gives every deploy a new code version, so it starts new ones.
    """
    options = deployment_options(serve_spec or ServeSpec())
    options["user_config"] = {**options["user_config"], **(user_config or {})}
    route = serve_spec.route if serve_spec is not None else None
    return ModelServer.options(**options).bind(name, str(ref), tracking_uri, route)
