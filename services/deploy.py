"""Deploy an endpoint from its Serve config, change it in place, and a small HTTP client.

An endpoint is the ``rayship`` Serve application of :mod:`services.serve_config`. It
is deployed the way ``serve deploy FILE`` deploys a config file (Serve's controller
``deploy_apps``, which the dashboard's REST API calls too), so what runs locally is the
declarative config a RayService runs; a new config that changes only ``user_config``
(promote, canary) reconfigures the running replicas in place.

Serve's HTTP proxy runs on the head node only (``proxy_location: HeadOnly``): the local
multi-node cluster puts every node on this machine, where a proxy per node would
compete for the same port.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import numpy as np

from services.serve_config import APP_NAME, ServedModel, models_of, serve_config
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


def endpoint_url(config: dict[str, Any]) -> str:
    """The base URL clients use for the endpoint a config describes."""
    http = config.get("http_options", {})
    host = http.get("host", "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"


def deploy(
    config: dict[str, Any],
    *,
    expect: dict[str, tuple[str, str | None]] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> str:
    """Deploy a Serve config on the connected Ray cluster; return the endpoint's URL.

    Starts Serve with the config's HTTP options if it is not running (and refuses, with
    a clear error, if it runs on another address), hands the config to Serve's
    controller, then waits until every model answers ``GET /v1/models/{route}`` with
    the versions in ``expect`` (route → (production version, canary version or None);
    default: any version) and Serve has updated every replica (:func:`wait_updated`:
    one replica answering with the new version is not all of them). A failed deploy
    raises :class:`DeployError` with Serve's message. Ray must be initialised by the
    caller (``ray.init()`` otherwise).
    """
    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        ray.init()
    try:
        schema = ServeDeploySchema.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, with every field it refused
        raise DeployError(f"not a valid Serve config: {exc}") from None
    http = config.get("http_options", {})
    client = serve_start(http_options=http, proxy_location=config.get("proxy_location"))
    _check_http_address(client, http.get("host", "127.0.0.1"), int(http.get("port", 8000)))
    previous = deployed_config()
    client.deploy_apps(schema)
    url = endpoint_url(config)
    deadline = time.monotonic() + ready_timeout_s
    try:
        for entry in models_of(config):
            refs = (entry["ref"], (entry.get("canary") or {}).get("ref"))
            versions = (expect or {}).get(entry["route"])
            left = max(1.0, deadline - time.monotonic())
            wait_ready(url, entry["route"], versions, timeout=left, refs=refs)
        wait_updated(timeout=max(1.0, deadline - time.monotonic()))
    except DeployError as exc:
        if previous is not None and previous != config and _is_update_of(previous, config):
            client.deploy_apps(ServeDeploySchema.model_validate(previous))
            raise DeployError(f"{exc}; the endpoint keeps its previous config") from None
        raise
    return url


def _is_update_of(previous: dict[str, Any], config: dict[str, Any]) -> bool:
    """True when ``config`` differs from ``previous`` only in the models' user_config,
    so putting ``previous`` back is a reconfigure of the same replicas."""
    from services.serve_config import with_models

    return with_models(previous, models_of(config)) == config


def serve_models(
    models: list[ServedModel],
    *,
    tracking_uri: str,
    port: int = 8000,
    host: str = "127.0.0.1",
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> str:
    """Deploy an endpoint serving ``models``; return its base URL (for
    ``{url}/v1/models/{route}:predict`` and ``{url}/v2/models/{route}/infer``)."""
    config = serve_config(models, tracking_uri=tracking_uri, host=host, port=port)
    return deploy(config, ready_timeout_s=ready_timeout_s)


def serve_model(
    name: str,
    ref: str = "production",
    *,
    tracking_uri: str,
    serve_spec: ServeSpec | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> str:
    """Deploy an endpoint serving one model, ``name`` at ``ref``; return its base URL."""
    model = ServedModel(name=name, ref=str(ref), serve=serve_spec or ServeSpec())
    return serve_models(
        [model], tracking_uri=tracking_uri, port=port, host=host, ready_timeout_s=ready_timeout_s
    )


def deployed_config() -> dict[str, Any] | None:
    """The Serve config of the running endpoint (as Serve recorded it), or None when no
    ``rayship`` application runs on the connected cluster."""
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
    except Exception:  # Serve not started on this cluster
        return None
    if client is None:
        return None
    details = client.get_serve_details()
    app = details.get("applications", {}).get(APP_NAME)
    if not app or not app.get("deployed_app_config"):
        return None
    http = client.http_config
    return {
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": {"host": http.host, "port": int(http.port)},
        "applications": [app["deployed_app_config"]],
    }


def _check_http_address(client: Any, host: str, port: int) -> None:
    """Serve keeps the HTTP options of its first start; refuse a different address."""
    config = client.http_config
    if (config.host, int(config.port)) != (host, int(port)):
        raise DeployError(
            f"Serve is already running with HTTP on {config.host}:{config.port}, "
            f"not {host}:{port}; "
            "use that port or shut Serve down first (serve shutdown)"
        )


def wait_ready(
    url: str,
    route: str,
    versions: tuple[str, str | None] | None = None,
    timeout: float = READY_TIMEOUT_S,
    refs: tuple[str, str | None] | None = None,
) -> dict[str, Any]:
    """Poll ``GET {url}/v1/models/{route}`` until it answers ready (serving
    ``versions`` = (production, canary or None) when given); returns the metadata.
    While waiting, a deploy Serve reports as failed, or a replica's report that
    ``refs`` (the deployed production and canary refs) failed to load, raises at once."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/v1/models/{route}", timeout=5)
            meta = resp.json() if resp.status_code == 200 else {}
            error = meta.get("error")
            if error and refs is not None and (error["ref"], error["canary_ref"]) == tuple(refs):
                raise DeployError(f"{route}: {error['message']}")
            if meta.get("ready"):
                canary = (meta.get("canary") or {}).get("version")
                if versions is None or (meta.get("version"), canary) == tuple(versions):
                    return meta
                last = f"serving version {meta.get('version')} (canary {canary})"
            else:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        _raise_if_failed()
        time.sleep(0.2)
    raise DeployError(f"{route} at {url} not ready after {timeout:.0f} s (last: {last})")


def wait_updated(timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until no deployment of the endpoint is ``UPDATING``: Serve has brought every
    replica to the new config (a ``user_config`` change reconfigures them one by one)."""
    from ray import serve

    deadline = time.monotonic() + timeout
    status = "no status"
    while time.monotonic() < deadline:
        _raise_if_failed()
        app = serve.status().applications.get(APP_NAME)
        states = {n: str(d.status) for n, d in (app.deployments if app else {}).items()}
        if states and not any(s.endswith("UPDATING") for s in states.values()):
            return
        status = ", ".join(f"{n} {s}" for n, s in states.items()) or "no deployment"
        time.sleep(0.1)
    raise DeployError(f"the endpoint's replicas not updated after {timeout:.0f} s ({status})")


def _raise_if_failed() -> None:
    try:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        app = serve.status().applications.get(APP_NAME)
    except Exception:
        return
    if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
        reasons = [d.message for d in app.deployments.values() if d.message] or [app.message]
        raise DeployError(f"the endpoint failed to deploy: {' '.join(reasons)}")


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
