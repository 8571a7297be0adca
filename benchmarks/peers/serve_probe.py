"""Time-split probe (not a peer): trivial Serve applications on rayship's running cluster.

Run from the scratch working directory whose ``.rayship/`` records the cluster
(``rayship up``), with the HTTP proxy already started by ``rayship serve``:

    PYTHONPATH=REPO python benchmarks/peers/serve_probe.py

Deploys four applications, each reading the body and answering ``{"ok": 1}`` (the
FastAPI ones at ``PREFIX/call``: a request to the bare prefix gets a 307 redirect, and
``PREFIX/`` is routed to rayship's application at "/"):

- ``/probe-plain``: a bare deployment (``__call__``): proxy + router + replica;
- ``/probe-ingress``: the same behind a FastAPI ingress, as rayship's app is;
- ``/probe-batched``: FastAPI ingress plus ``@serve.batch(max_batch_size=64,
  batch_wait_timeout_s=0.005)`` around a no-op, rayship's default batching;
- ``/probe-configured``: the batched one with the options rayship's deployment gets
  (``autoscaling_config`` with 1..1 replicas, ``max_ongoing_requests`` 64,
  ``max_queued_requests`` 256): what Serve's autoscaling and queue limits cost.

Replicas take ``num_cpus=0`` so they fit beside rayship's own.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request``
# annotation on the ingress methods (as a string it becomes a required query parameter).
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cluster import local

ingress_app = FastAPI()
batched_app = FastAPI()
OPTIONS = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}


@serve.deployment(**OPTIONS)
class Plain:
    async def __call__(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": 1})


@serve.deployment(**OPTIONS)
@serve.ingress(ingress_app)
class Ingress:
    @ingress_app.post("/call")
    async def call(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": 1})


@serve.deployment(**OPTIONS)
@serve.ingress(batched_app)
class Batched:
    @batched_app.post("/call")
    async def call(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": await self.noop(1)})

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def noop(self, items: list[int]) -> list[int]:
        return items


configured_app = FastAPI()


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1},
    max_ongoing_requests=64,
    max_queued_requests=256,
    ray_actor_options={"num_cpus": 0},
)
@serve.ingress(configured_app)
class Configured:
    @configured_app.post("/call")
    async def call(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": await self.noop(1)})

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def noop(self, items: list[int]) -> list[int]:
        return items


def main() -> None:
    local.connect(Path(".rayship"), log_to_driver=False)
    apps = (
        ("plain", Plain),
        ("ingress", Ingress),
        ("batched", Batched),
        ("configured", Configured),
    )
    for name, deployment in apps:
        serve.run(deployment.bind(), name=f"probe-{name}", route_prefix=f"/probe-{name}")
    print("deployed")


if __name__ == "__main__":
    main()
