"""Deploy a registered model on Ray Serve, and a small HTTP client for its V1 API.

One model is one Serve application named after the model, at ``route_prefix`` "/"
by default, so its paths are KServe's ``/v1/models/{name}...``. Serving several
models on one endpoint (route prefixes per model, or one multi-model app) is not
done here yet: a second application at "/" is refused by Serve.

Serve's HTTP proxy runs on the head node only (``proxy_location="HeadOnly"``): the
local multi-node cluster puts every node on this machine, where a proxy per node
would compete for the same port.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import numpy as np

from training.spec import ServeSpec

READY_TIMEOUT_S = 120.0


class DeployError(RuntimeError):
    """The application failed to deploy or to become ready (message says why)."""


class PredictError(RuntimeError):
    """A predict call failed: ``status`` (None when the server was not reached),
    the server's ``error`` message and its ``details``."""

    def __init__(self, message: str, status: int | None = None, details: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or []


def serve_model(
    name: str,
    ref: str = "production",
    *,
    tracking_uri: str,
    serve_spec: ServeSpec | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    route_prefix: str = "/",
    blocking: bool = False,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> str:
    """Deploy ``name`` at ``ref`` (version number or alias) and return the endpoint's base URL.

    Starts Serve's HTTP proxy on ``host:port`` if Serve is not running yet (and
    refuses, with a clear error, if it already runs on another address), deploys the
    application and waits until ``GET /v1/models/{name}`` answers. Ray is expected to
    be initialised by the caller; if it is not, ``ray.init()`` connects to or starts
    one. ``blocking=True`` then waits until interrupted (Ctrl-C) and deletes the app.
    The returned URL is the base for the V1 paths (``{url}/v1/models/{route}:predict``,
    the route being ``serve_spec.route`` or the model name).
    """
    import ray
    from ray import serve

    from services.app import build_app

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    _check_http_address(host, port)
    prefix = "/" + route_prefix.strip("/")
    try:
        serve.run(build_app(name, ref, tracking_uri, serve_spec), name=name, route_prefix=prefix)
    except Exception as exc:  # Serve reports DEPLOY_FAILED as RuntimeError with the replica's error
        raise DeployError(f"{name}@{ref} failed to deploy: {exc}") from exc
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{prefix.rstrip('/')}"
    wait_ready(url, (serve_spec and serve_spec.route) or name, timeout=ready_timeout_s)
    if blocking:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            serve.delete(name)
    return url


def _check_http_address(host: str, port: int) -> None:
    """Serve keeps the HTTP options of its first start; refuse a different address."""
    from ray.serve.context import _get_global_client

    try:
        config = _get_global_client().http_config
    except Exception:  # private API; without it the readiness check still catches a wrong port
        return
    if (config.host, int(config.port)) != (host, int(port)):
        raise DeployError(
            f"Serve is already running with HTTP on {config.host}:{config.port}, "
            f"not {host}:{port}; "
            "use that port or shut Serve down first (serve shutdown)"
        )


def wait_ready(url: str, name: str, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll ``GET {url}/v1/models/{name}`` until it answers ready; returns the metadata."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/v1/models/{name}", timeout=5)
            if resp.status_code == 200 and resp.json().get("ready"):
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    raise DeployError(f"{name} at {url} not ready after {timeout:.0f} s (last: {last})")


def _jsonable(value: Any) -> Any:
    """A row value JSON can carry: numpy scalars unwrapped (a float32 as its shortest
    repr, 13.82 rather than 13.819999694824219), NaN/inf (pandas' missing) as null."""
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas.NA / NaT, without importing pandas
        return None
    if isinstance(value, np.floating):
        value = float(str(value))
    elif hasattr(value, "item") and not isinstance(value, list | dict | str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_instances(rows: list[dict[str, Any]] | list[list[Any]]) -> list:
    """Rows (objects or lists, as pandas gives them) as V1 ``instances`` JSON can carry."""
    return [
        {k: _jsonable(v) for k, v in row.items()}
        if isinstance(row, dict)
        else [_jsonable(v) for v in row]
        for row in rows
    ]


def predict_http(
    url: str,
    name: str,
    rows: list[dict[str, Any]] | list[list[Any]],
    return_probabilities: bool = False,
    timeout: float = 30,
) -> dict[str, Any]:
    """POST rows to ``{url}/v1/models/{name}:predict`` and return the JSON response.

    Rows are objects ``{column: value}`` or lists in feature order; NaN and numpy
    scalars (as pandas gives them) are converted. A non-2xx answer or an unreachable
    server raises :class:`PredictError` carrying the server's error message and details.
    """
    body: dict[str, Any] = {"instances": as_instances(rows)}
    if return_probabilities:
        body["return_probabilities"] = True
    endpoint = f"{url.rstrip('/')}/v1/models/{name}:predict"
    try:
        resp = httpx.post(endpoint, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise PredictError(f"cannot reach {endpoint}: {exc or type(exc).__name__}") from None
    if resp.is_success:
        return resp.json()
    try:
        payload = resp.json()
        message, details = payload.get("error", resp.text), payload.get("details", [])
    except ValueError:
        message, details = resp.text[:500] or resp.reason_phrase, []
    raise PredictError(
        f"HTTP {resp.status_code} from {endpoint}: {message}", resp.status_code, details
    )
