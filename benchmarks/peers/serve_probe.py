"""Time-split probe (not a peer): trivial Serve applications on rayship's running cluster.

Run from the scratch working directory whose ``.rayship/`` records the cluster
(``rayship up``), with the HTTP proxy already started by ``rayship serve``:

    PYTHONPATH=REPO python benchmarks/peers/serve_probe.py

Deploys three applications, each reading the body and answering ``{"ok": 1}``:

- ``/probe-plain``: a bare deployment (``__call__``): proxy + router + replica;
- ``/probe-ingress``: the same behind a FastAPI ingress, as rayship's app is;
- ``/probe-batched``: FastAPI ingress plus ``@serve.batch(max_batch_size=64,
  batch_wait_timeout_s=0.005)`` around a no-op, rayship's default batching.

Replicas take ``num_cpus=0`` so they fit beside rayship's own.
"""

from __future__ import annotations

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
    @ingress_app.post("/")
    async def call(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": 1})


@serve.deployment(**OPTIONS)
@serve.ingress(batched_app)
class Batched:
    @batched_app.post("/")
    async def call(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": await self.noop(1)})

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def noop(self, items: list[int]) -> list[int]:
        return items


def main() -> None:
    local.connect(Path(".rayship"), log_to_driver=False)
    for name, deployment in (("plain", Plain), ("ingress", Ingress), ("batched", Batched)):
        serve.run(deployment.bind(), name=f"probe-{name}", route_prefix=f"/probe-{name}")
    print("deployed")


if __name__ == "__main__":
    main()
