"""The Serve config file: one generator for ``rayship serve``, ``serve deploy FILE`` and
the RayService's ``serveConfigV2``.

A rayship endpoint is one Serve application, ``rayship``, at route prefix ``/`` (so the
paths are KServe's ``/v1/models/{name}…`` and ``/v2/…``), with one deployment,
``ModelServer`` (:mod:`services.app`), that serves every listed model. What can change
while it serves lives in the deployment's ``user_config`` — per model: the registered
name, the route clients use, the ref (version or alias) of the production version, an
optional canary (ref and traffic weight), batching, the request size limit and, when
set, the drift monitor's ``sample_rate`` (``monitor: {sample_rate}``, overriding the
version's spec; 0 turns the monitor off: :mod:`services.monitor`) — so that
a new config that differs only there is applied by ``reconfigure`` on the running
replicas, without a restart (Serve's "lightweight update"; KubeRay applies a changed
``serveConfigV2`` the same way, in place).

Replica-level options (autoscaling, queue limit, CPUs) are one set per deployment. With
several models they are combined so no model gets less than its own spec asks for: the
largest ``min_replicas``, ``max_replicas``, ``max_queued_requests`` and
``cpus_per_replica``, the smallest ``target_ongoing_requests``.

A ref is written as given (``production`` by default): replicas resolve an alias when
they load. ``rayship models promote`` rewrites the ref to the new version number, which
both records what is served and changes ``user_config`` so Serve reconfigures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from training.spec import ServeSpec

APP_NAME = "rayship"
DEPLOYMENT = "ModelServer"
IMPORT_PATH = "services.app:build"
RETRY_AFTER_S = 1  # the Retry-After of a 503 when the queue is full
HEALTH_CHECK_PERIOD_S = 2.0  # Serve's default is 10 s


@dataclass(frozen=True)
class ServedModel:
    """One model on the endpoint: ``name`` at ``ref``, known to clients as ``route``."""

    name: str
    ref: str = "production"
    route: str | None = None
    serve: ServeSpec = field(default_factory=ServeSpec)
    canary_ref: str | None = None
    canary_weight: float = 0.0
    # overrides the version's spec monitor.sample_rate (0: drift monitor off); None: the spec's
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_weight <= 1.0:
            raise ValueError(f"canary weight: expected 0 to 1, got {self.canary_weight}")
        if self.canary_ref is None and self.canary_weight:
            raise ValueError("canary weight given without a canary version")
        if self.sample_rate is not None and not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample rate: expected 0 to 1, got {self.sample_rate}")

    @property
    def client_route(self) -> str:
        return self.route or self.serve.route or self.name

    @classmethod
    def from_spec(cls, spec: Any, ref: str = "production") -> ServedModel:
        """The spec's model (``spec.name``) with the spec's serve section."""
        return cls(name=spec.name, ref=str(ref), route=spec.route, serve=spec.serve)

    def user_config(self) -> dict[str, Any]:
        canary = (
            {"ref": str(self.canary_ref), "weight": float(self.canary_weight)}
            if self.canary_ref is not None
            else None
        )
        entry = {
            "name": self.name,
            "route": self.client_route,
            "ref": str(self.ref),
            "canary": canary,
            "max_batch_size": int(self.serve.max_batch_size),
            "batch_wait_timeout_s": float(self.serve.batch_wait_timeout_s),
            "max_request_bytes": int(self.serve.max_request_bytes),
        }
        if self.sample_rate is not None:
            entry["monitor"] = {"sample_rate": float(self.sample_rate)}
        return entry


def deployment_options(specs: list[ServeSpec]) -> dict[str, Any]:
    """Replica options for the endpoint's deployment from every model's serve section
    (numbers typed as the spec types them, so the YAML bytes do not depend on whether a
    spec said ``8`` or ``8.0``).

    - ``initial_replicas`` is at least 1, even with ``min_replicas: 0``, so artifacts are
      loaded (and checksums verified) at deploy time and the first request finds a warm
      replica; the autoscaler may scale to zero afterwards.
    - ``max_ongoing_requests`` (not in the spec) is the larger of ``max_batch_size`` (so
      a batch can fill) and twice ``target_ongoing_requests`` (so the autoscaler's target
      is reachable; Serve's default of 5 would be below the spec's default 8).
    - Beyond ``max_queued_requests`` waiting (with the native ingress: at a replica),
      Serve answers 503 with ``Retry-After`` at once (``backpressure_config``).
    - Serve health-checks each replica every ``HEALTH_CHECK_PERIOD_S`` (2 s, not its
      default 10 s): that is how the controller learns a replica's process died, so a
      killed replica is replaced sooner (HAProxy stops sending to it at once either
      way). One of two replicas SIGKILLed under load: two running again 7–15 s after
      the kill with 10 s (11 kills), 6.0–7.5 s with 2 s (5 kills).
    - Replicas write no access log unless a model's spec asks for one
      (``serve.access_log``, or ``rayship serve --access-log``): on the native ingress
      a log line per request took a no-op replica from 1.23 to 1.63 ms of CPU a request.
    """
    min_replicas = int(max(s.min_replicas for s in specs))
    target = float(min(s.target_ongoing_requests for s in specs))
    return {
        "name": DEPLOYMENT,
        "max_ongoing_requests": max(max(s.max_batch_size for s in specs), math.ceil(2 * target)),
        "max_queued_requests": max(s.max_queued_requests for s in specs),
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "autoscaling_config": {
            "min_replicas": min_replicas,
            "initial_replicas": max(1, min_replicas),
            "max_replicas": int(max(s.max_replicas for s in specs)),
            "target_ongoing_requests": target,
        },
        "ray_actor_options": {"num_cpus": float(max(s.cpus_per_replica for s in specs))},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "logging_config": {"enable_access_log": any(s.access_log for s in specs)},
    }


def serve_config(
    models: list[ServedModel],
    *,
    tracking_uri: str,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> dict[str, Any]:
    """The Serve config (Serve's ``ServeDeploySchema``) of an endpoint serving ``models``."""
    if not models:
        raise ValueError("models: expected at least one model to serve")
    routes = [m.client_route for m in models]
    duplicates = sorted({r for r in routes if routes.count(r) > 1})
    if duplicates:
        raise ValueError(f"routes: each served model needs its own route; repeated: {duplicates}")
    deployment = deployment_options([m.serve for m in models])
    deployment["user_config"] = {"models": [m.user_config() for m in models]}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": int(port)},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"tracking_uri": tracking_uri},
                "deployments": [deployment],
            }
        ],
    }


def models_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-model ``user_config`` entries of an endpoint's config."""
    return _deployment(config)["user_config"]["models"]


def with_models(config: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``config`` serving ``models`` (user_config entries), all else unchanged."""
    import copy

    new = copy.deepcopy(config)
    _deployment(new)["user_config"]["models"] = models
    return new


def tracking_uri_of(config: dict[str, Any]) -> str:
    return _app(config)["args"]["tracking_uri"]


def _app(config: dict[str, Any]) -> dict[str, Any]:
    for app in config.get("applications", []):
        if app.get("name") == APP_NAME:
            return app
    raise ValueError(f"not a rayship endpoint config: no application {APP_NAME!r}")


def _deployment(config: dict[str, Any]) -> dict[str, Any]:
    for deployment in _app(config).get("deployments", []):
        if deployment.get("name") == DEPLOYMENT:
            return deployment
    raise ValueError(f"not a rayship endpoint config: no deployment {DEPLOYMENT!r}")


def dump(config: dict[str, Any]) -> str:
    """The config as the YAML text of the file (keys in the generator's order)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def load(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)
