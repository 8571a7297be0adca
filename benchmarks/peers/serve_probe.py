"""Time-split probe: no-op Serve applications beside rayship's, on rayship's running cluster.

Run from the working directory whose ``.rayship/`` records the cluster (``rayship up``),
after ``rayship serve`` started Serve:

    PYTHONPATH=REPO python benchmarks/peers/serve_probe.py deploy|targets|delete [BASE_URL]

``deploy`` adds two applications, each one replica with ``num_cpus=0`` (they fit beside
rayship's replicas and take none of their CPUs) at its own route prefix, so rayship's
application at "/" is not touched:

- ``/probe-noop``: a plain ``async def __call__(self, request)`` that reads the body and
  returns a Starlette ``JSONResponse({"ok": 1})``: Serve's own floor;
- ``/probe-batched``: the same through ``@serve.batch(max_batch_size=64,
  batch_wait_timeout_s=0)`` around a no-op, rayship's batching with no wait.

Both write no access log, as rayship's replicas by default (``serve.access_log``), so
the difference to rayship is rayship's code, not Serve's logging. Once they answer
through the endpoint's HTTP address, it prints one line ``TARGETS {json}``: per
application (rayship's and the probes'), the replicas' own HTTP servers (Serve's
native ingress: HAProxy forwards to them) as ``[[host, port], ...]``, read from Serve's
controller (``get_target_groups(from_proxy_manager=True)``, what the controller hands
its HAProxy manager; a private API of Ray 2.60's controller). A replica on this node is
dialled at 127.0.0.1, as HAProxy does (``HAProxyManager._target_to_server``).

``targets`` only prints that line; ``delete`` removes the probe applications
(``serve.delete``) and leaves rayship's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from cluster import local

OPTIONS = {
    "num_replicas": 1,
    "ray_actor_options": {
        "num_cpus": 0,
        # Nothing to drain on delete: with the native ingress a replica otherwise stays
        # up 30 s after it is told to stop (Ray's floor for load balancers to let go of
        # it), which cost the benchmark 30 s a model. Read by the replica process only.
        "runtime_env": {"env_vars": {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}},
    },
    "logging_config": {"enable_access_log": False},
    "graceful_shutdown_wait_loop_s": 0.5,
    "graceful_shutdown_timeout_s": 2,
}
APPS = ("probe-noop", "probe-batched")


@serve.deployment(**OPTIONS)
class Noop:
    async def __call__(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": 1})


@serve.deployment(**OPTIONS)
class Batched:
    async def __call__(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": await self.noop(1)})

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0)
    async def noop(self, items: list[int]) -> list[int]:
        return items


def targets() -> dict[str, list[list]]:
    """Each HTTP application's replicas' own (host, port), from Serve's controller."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(from_proxy_manager=True))
    node_ip = ray.util.get_node_ip_address()
    out: dict[str, list[list]] = {}
    for group in groups:
        if str(getattr(group.protocol, "value", group.protocol)).upper() != "HTTP":
            continue
        out[group.app_name] = [
            ["127.0.0.1" if t.ip == node_ip else t.ip, t.port]
            for t in group.targets
            if not t.name.startswith("SERVE_PROXY_ACTOR")  # the fallback, not a replica
        ]
    return out


def _wait_routed(base: str, timeout: float = 90) -> None:
    """Until each probe answers 200 through the endpoint (HAProxy reloads after a deploy)."""
    deadline = time.monotonic() + timeout
    for app in APPS:
        while True:
            try:
                if httpx.post(f"{base}/{app}", content=b"{}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"/{app} did not answer through {base} in {timeout:.0f} s")
            time.sleep(0.5)


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else "deploy"
    local.connect(Path(".rayship"), log_to_driver=False)
    if action == "delete":
        for app in APPS:
            serve.delete(app, _blocking=False)
        deadline = time.monotonic() + 120
        while set(APPS) & set(serve.status().applications):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{APPS} still listed by Serve after 120 s")
            time.sleep(0.5)
        print("deleted")
        return
    if action == "targets":
        print("TARGETS " + json.dumps(targets()), flush=True)
        return
    serve.run(Noop.bind(), name=APPS[0], route_prefix=f"/{APPS[0]}")
    serve.run(Batched.bind(), name=APPS[1], route_prefix=f"/{APPS[1]}")
    base = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8000"
    _wait_routed(base)
    found = targets()
    deadline = time.monotonic() + 60
    while not all(found.get(a) for a in ("rayship", *APPS)) and time.monotonic() < deadline:
        time.sleep(1)
        found = targets()
    print("TARGETS " + json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
