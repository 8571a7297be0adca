"""A local multi-node Ray cluster on this one machine: `rayship up`, `down`, `status`.

`up()` starts a head node and N worker nodes as separate process trees, each its own
raylet with its own node id, all on this machine's IP, so code written for a real
multi-node cluster (node affinity, spreading, object transfer between nodes) can be
exercised on a laptop. Ray has no Python API that starts a *persistent* multi-process
cluster: `ray.init()` starts one node that dies with the driver, and
`ray.cluster_utils.Cluster` is a test helper whose nodes belong to the process that
created them. So this module shells out to `ray start --head` / `ray start --address`,
which daemonise, and records what a later process needs in `STATE_DIR/cluster.json`.

Facts about Ray 2.60.0 that shape the code (read from its source, then checked):

* Token authentication. The mode comes only from the environment variable
  `RAY_AUTH_MODE` (`token` or `disabled`), read once per process into Ray's config;
  the token from `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`,
  else `~/.ray/auth_token`. With the mode unset, a `ray.init()` that starts a new
  local instance turns token mode on and writes `~/.ray/auth_token` if missing;
  `ray start --head` and `ray.init()`/`address="auto"` attaching to a local cluster
  turn it on only if a token already exists; `ray start --address=...`,
  `ray.init(address=...)` and `ray status --address ...` never do. A driver without
  the mode set gets a bare "Failed to connect to Ray cluster" after about 20 s,
  `ray status` an `AuthenticationError`. So every cluster gets its own random token
  in `STATE_DIR/auth_token` (0600), every process we start gets `RAY_AUTH_MODE=token`
  and `RAY_AUTH_TOKEN_PATH` (and no `RAY_AUTH_TOKEN`, which would win), and
  `connect()` sets the same in its own process; `ClusterInfo.driver_env()` lists
  them for other drivers and the `ray` CLI. `RAY_AUTH_MODE=disabled` set before
  `up()` starts a cluster without auth, as in Ray.
* `--node-ip-address 127.0.0.1` is rewritten by Ray to the machine's routable IP
  and the GCS listens on all interfaces, so the cluster is reachable from the
  network: another reason to keep token auth on. Every Ray gRPC server (GCS,
  raylets, workers, agents) and the agents' HTTP servers refuse a call without the
  token; Ray's Prometheus exporters (metrics agent, dashboard, autoscaler) bind to
  loopback only when the node IP is loopback, and Serve's HAProxy binds its stats and
  metrics on all interfaces: read-only and unauthenticated (docs/security.md says how
  to firewall; tests/cluster/test_security.py checks every listener).
* Several raylets on one IP are fine (each gets its own node id, sockets and
  ports, as `ray.cluster_utils.Cluster` does), but ports with fixed defaults
  collide: the dashboard agent's 52365 and the Ray client server's 10001. Those
  are chosen free here, like the GCS port.
* `ray stop` kills every Ray process on the machine, including a test's own
  `ray.init()`. `down()` instead signals only the processes of this cluster: each
  `ray start` runs in a new session, Ray's daemons and workers stay in it, and the
  session ids are recorded.
* Each cluster uses its own short `--temp-dir` under /tmp (Unix socket paths must
  stay under 108 bytes), so `ray start` does not overwrite /tmp/ray's
  "current cluster" file and a plain `ray.init()` elsewhere never attaches to it.

Linux only (it reads /proc).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services import ingress

DEFAULT_STATE_DIR = Path(".rayship")
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
LOCK_FILE = "cluster.lock"
START_TIMEOUT_S = 180.0
MIN_OBJECT_STORE_BYTES = 100 * 1024**2
HAPROXY_DIR = "ha"  # HAProxy's config and sockets under the cluster's temp dir
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ClusterError(RuntimeError):
    """A local cluster could not be started, or one is already running."""


@dataclass(frozen=True)
class ClusterInfo:
    """What `up()` records in `state_dir/cluster.json`.

    `address` is the GCS address (`ip:port`) for `ray.init(address=...)` and
    `ray ... --address`. `session_ids` are the Linux session ids of the node
    process trees; `temp_dir` is the Ray temp dir holding all nodes' logs.
    """

    address: str
    node_ip: str
    workers: int
    cpus_per_node: int
    state_dir: str
    temp_dir: str
    auth_mode: str
    token_path: str | None
    session_ids: list[int]
    boot_id: str
    started_at: float
    startup_seconds: float = 0.0
    dashboard: str = ""  # the dashboard's URL (Serve's REST API: `serve deploy -a URL`)
    # How endpoints on this cluster take requests (services.ingress): "haproxy" (Serve's
    # native ingress) or "proxy" (Serve's Python proxy). The ports of HAProxy's stats page
    # and metrics exporter and of its backup (Serve's Python proxy: HTTP, gRPC).
    ingress: str = "haproxy"
    haproxy_ports: list[int] = field(default_factory=list)
    replica_ports: list[int] = field(default_factory=list)  # [first, end) of its block

    def driver_env(self) -> dict[str, str]:
        """Environment variables a separate driver or the `ray` CLI needs for this cluster.

        E.g. `env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=... ray status --address ADDR`.
        `RAY_AUTH_TOKEN`, if set, takes precedence over the path in Ray and must be unset.
        """
        env = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": self.auth_mode}
        if self.token_path:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        return env


@dataclass(frozen=True)
class NodeStatus:
    """One Ray node as the GCS sees it (dead nodes stay listed until the GCS forgets them)."""

    node_id: str
    ip: str
    name: str
    is_head: bool
    alive: bool
    cpus: float
    cpus_available: float


@dataclass(frozen=True)
class ClusterStatus:
    """A running cluster's address, alive nodes and CPU totals (alive nodes only)."""

    address: str
    alive_nodes: int
    cpus_total: float
    cpus_available: float
    nodes: list[NodeStatus] = field(default_factory=list)
    auth_mode: str = "token"
    token_path: str | None = None


# --------------------------------------------------------------------------- public API


def up(
    workers: int = 1,
    cpus_per_node: int | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
) -> ClusterInfo:
    """Start a head and `workers` worker nodes on this machine; return once all are registered.

    Every node advertises `cpus_per_node` CPUs; the default splits this machine's
    usable cores evenly over the `workers + 1` nodes, but never below 1, so on a
    2-core box `up(workers=3)` gives 4 nodes of 1 CPU each (oversubscribed on purpose:
    the point is several nodes, not speed). The object store is split the same way
    (30% of RAM, capped by /dev/shm, over the nodes, at least 100 MiB each). The
    dashboard runs on 127.0.0.1 only: Ray Train needs its state API.

    Raises `ClusterError` when a cluster recorded in `state_dir` is still running
    (a stale record of a dead one is cleaned up instead), or when a node fails to
    start or register within a few minutes; then everything it started is stopped
    and the message carries the tail of `ray start`'s output. Holds a lock file in
    `state_dir` so two `up`/`down` calls on one state dir do not race.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    nodes = workers + 1
    cpus = cpus_per_node if cpus_per_node is not None else max(1, _usable_cpus() // nodes)
    if cpus < 1:
        raise ValueError(f"cpus_per_node must be >= 1, got {cpus}")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with _locked(state_dir):
        old = _read_info(state_dir)
        if old is not None:
            if _is_running(old):
                raise ClusterError(
                    f"a Ray cluster recorded in {state_dir / STATE_FILE} is already running "
                    f"at {old.address} ({old.workers + 1} nodes); run `rayship down` first"
                )
            _teardown(old)  # stale record: kill leftovers, remove files

        auth_mode = os.environ.get("RAY_AUTH_MODE", "token").strip().lower() or "token"
        if auth_mode not in ("token", "disabled"):
            raise ClusterError(f"RAY_AUTH_MODE={auth_mode!r}: expected 'token' or 'disabled'")
        token_path = None
        if auth_mode == "token":
            token_path = state_dir / TOKEN_FILE
            _write_private(token_path, secrets.token_hex(32))

        # Short on purpose: Ray's Unix sockets live below it (108-byte path limit).
        tmp_root = "/tmp" if os.path.isdir("/tmp") else None
        temp_dir = tempfile.mkdtemp(prefix="rayship-", dir=tmp_root)
        # HAProxy's admin socket is world-writable (mode 666, level admin) and Ray makes
        # its temp dir 0777: the folder holding it is this user's alone.
        (Path(temp_dir) / HAPROXY_DIR).mkdir(mode=0o700)
        info = ClusterInfo(
            address="",
            node_ip="",
            workers=workers,
            cpus_per_node=cpus,
            state_dir=str(state_dir),
            temp_dir=temp_dir,
            auth_mode=auth_mode,
            token_path=str(token_path) if token_path else None,
            session_ids=[],
            boot_id=_boot_id(),
            started_at=time.time(),
            ingress="haproxy" if ingress.native() else "proxy",
            haproxy_ports=ingress.haproxy_ports(os.environ, free_ports(4))
            if ingress.native()
            else [],
        )
        if info.ingress == "haproxy":
            block = claim_replica_ports(temp_dir)
            info = _replace(info, replica_ports=[block.start, block.stop])
        env = _node_env(info)
        store = _object_store_bytes(nodes)
        common = [
            f"--num-cpus={cpus}",
            f"--object-store-memory={store}",
            f"--temp-dir={temp_dir}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        query: subprocess.Popen[str] | None = None
        try:
            gcs_port, client_port, dashboard_port, *agent_ports = free_ports(
                nodes + 3, exclude=info.haproxy_ports
            )
            # Ray processes find their own cluster, not another Ray on this machine
            # (Ray's state API refuses to guess when it sees several).
            env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
            # All `ray start`s at once (each spends ~3 s importing Ray): worker nodes
            # retry the GCS for ~20 s, and Ray resolves 127.0.0.1 to the same node IP
            # for them as for the head.
            starts = [
                _popen_ray_start(
                    [
                        "--head",
                        f"--port={gcs_port}",
                        # The dashboard serves Ray's state API, which Ray Train's
                        # placement-group cleaner needs: without it, a torch trial that
                        # Tune stops early leaks its workers' CPUs to later trials.
                        "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard_port}",
                        f"--ray-client-server-port={client_port}",
                        f"--dashboard-agent-listen-port={agent_ports[0]}",
                        # A label, not --node-name: Ray Serve takes a node's name for
                        # its IP (ClusterNodeInfoCache), and HAProxy then dials a
                        # replica on this node by a name that is not its address.
                        "--labels=rayship-node=head",
                        *common,
                    ],
                    env,
                    Path(temp_dir) / "ray-start-head.log",
                )
            ]
            for i in range(1, nodes):
                starts.append(
                    _popen_ray_start(
                        [
                            f"--address=127.0.0.1:{gcs_port}",
                            f"--dashboard-agent-listen-port={agent_ports[i]}",
                            # One log monitor per machine: the head's already tails the
                            # session log dir all nodes share (as ray.cluster_utils does).
                            "--include-log-monitor=false",
                            f"--labels=rayship-node=worker-{i}",
                            *common,
                        ],
                        env,
                        Path(temp_dir) / f"ray-start-worker-{i}.log",
                    )
                )
            info = _replace(info, session_ids=[p.pid for p in starts])
            _write_info(info)  # from here on, `down` can clean up even if `up` dies
            _wait_ray_start(starts[0], "head")
            address = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
            info = _replace(
                info,
                address=address,
                node_ip=address.rsplit(":", 1)[0],
                dashboard=f"http://127.0.0.1:{dashboard_port}",
            )
            _write_info(info)
            query = _start_gcs_query(info, expect_nodes=nodes, timeout_s=START_TIMEOUT_S)
            for i, p in enumerate(starts[1:], start=1):
                _wait_ray_start(p, f"worker-{i}")
            st = _finish_gcs_query(query, info)
            if st.alive_nodes < nodes:
                raise ClusterError(
                    f"only {st.alive_nodes} of {nodes} nodes registered within "
                    f"{START_TIMEOUT_S:.0f} s; Ray logs are in {temp_dir}"
                )
        except BaseException:
            if query is not None and query.poll() is None:
                query.kill()
            _teardown(info, keep_temp_dir=True)
            raise
        info = _replace(info, startup_seconds=round(time.monotonic() - t0, 2))
        _write_info(info)
        return info


def down(state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Stop the cluster recorded in `state_dir`; True if any of its processes were running.

    Does not use `ray stop`, which kills every Ray process on the machine (another
    cluster, a test's own `ray.init()`). It signals only the processes in the
    recorded sessions, and only sessions that still contain a process whose command
    line names this cluster's private temp dir (guards against reused ids). Order as
    in `ray stop`: raylets, then the other daemons and workers, then the GCS; SIGTERM,
    then SIGKILL after a short grace. Drivers connected from elsewhere are not killed;
    their next Ray call fails. Removes `cluster.json`, the token file and the Ray
    temp dir (logs included). A stale record is removed and False returned.
    """
    state_dir = Path(state_dir).resolve()
    if not (state_dir / STATE_FILE).exists():
        return False
    with _locked(state_dir):
        info = _read_info(state_dir)
        if info is None:
            return False
        return _teardown(info)


def info(state_dir: Path = DEFAULT_STATE_DIR) -> ClusterInfo | None:
    """What `up()` recorded for the cluster of `state_dir` (None if none), running or not."""
    return _read_info(Path(state_dir).resolve())


def status(state_dir: Path = DEFAULT_STATE_DIR) -> ClusterStatus | None:
    """Live status of the cluster recorded in `state_dir`, or None if none is recorded or running.

    "Running" means its GCS process is alive and its port answers. The GCS is then
    queried from a short-lived child process (about 1 s) that carries the cluster's
    token, so this process's Ray auth settings are left untouched; `ClusterError`
    if that query fails.
    """
    info = _read_info(Path(state_dir).resolve())
    if info is None or not _is_running(info):
        return None
    return _query_gcs(info, expect_nodes=0, timeout_s=30.0)


def connect(state_dir: Path = DEFAULT_STATE_DIR, **init_kwargs: Any) -> str:
    """Make sure this process is a Ray driver; describe what it is connected to.

    Returns "cluster at ADDRESS (N nodes)" or "local Ray (N CPUs)". In order: if Ray
    is already initialised, keep that connection. If `init_kwargs` has an `address`,
    `ray.init(**init_kwargs)` as given (with the recorded cluster's auth when it is
    that cluster's address). If the cluster recorded in `state_dir` is running,
    connect to it: this sets `RAY_AUTH_MODE` and
    `RAY_AUTH_TOKEN_PATH` in `os.environ` (and removes `RAY_AUTH_TOKEN`, which Ray
    would prefer), so Ray processes this one starts later inherit them. Else, with
    `RAY_ADDRESS` set (Ray Jobs set it for their entrypoint), connect there. Otherwise
    start a private in-process Ray (`address="local"`, so neither `RAY_ADDRESS` nor
    /tmp/ray's last cluster is picked up) with its dashboard (Ray Train's state
    API); Ray then turns on token auth and creates `~/.ray/auth_token` if missing.
    `init_kwargs` go to
    `ray.init` (e.g. `log_to_driver=False`, `runtime_env=...`). Ray workers run
    this interpreter and so import `training`/`services` from the same install.
    """
    import ray

    info = _read_info(Path(state_dir).resolve())
    if ray.is_initialized():
        return _describe_connected(ray, info)

    running = info if info is not None and _is_running(info) else None
    if "address" in init_kwargs:
        if running is not None and init_kwargs["address"] == running.address:
            _use_auth_in_this_process(running)
        ray.init(**init_kwargs)
        return _describe_connected(ray, info)

    if running is not None:
        _use_auth_in_this_process(running)
        ray.init(address=running.address, **init_kwargs)
        return _describe_connected(ray, running)

    if os.environ.get("RAY_ADDRESS"):  # a Ray Job's entrypoint (e.g. the RayJob's `rayship tune`)
        ray.init(address=os.environ["RAY_ADDRESS"], **init_kwargs)
        return _describe_connected(ray, None)

    ray.init(address="local", **init_kwargs)
    return _describe_connected(ray, None)


# --------------------------------------------------------------------------- helpers


def _describe_connected(ray: Any, info: ClusterInfo | None) -> str:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    gcs = ray.get_runtime_context().gcs_address
    if (info is not None and gcs == info.address) or len(alive) > 1:
        return f"cluster at {gcs} ({len(alive)} node{'s' if len(alive) != 1 else ''})"
    cpus = ray.cluster_resources().get("CPU", 0)
    return f"local Ray ({cpus:g} CPUs)"


def _use_auth_in_this_process(info: ClusterInfo) -> None:
    """Point this process's Ray at the cluster's token.

    Ray reads RAY_AUTH_MODE into a process-wide config once (at import) and caches
    the token, so besides the environment both are refreshed explicitly, as Ray's own
    `_enable_token_auth()` does.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = info.auth_mode
    os.environ.pop("RAY_AUTH_TOKEN", None)
    if info.token_path:
        os.environ["RAY_AUTH_TOKEN_PATH"] = info.token_path
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _node_env(info: ClusterInfo) -> dict[str, str]:
    """Environment for `ray start` and the GCS query child: this one plus the cluster's auth."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    env["RAY_AUTH_MODE"] = info.auth_mode
    if info.token_path:
        env["RAY_AUTH_TOKEN_PATH"] = info.token_path
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if info.ingress == "haproxy":  # Serve's native ingress, HAProxy's files in our temp dir
        stats, metrics, fallback_http, fallback_grpc = info.haproxy_ports
        first, end = info.replica_ports
        env.update(
            ingress.serve_env(
                env,
                replica_ports=range(first, end),
                fallback_ports=(fallback_http, fallback_grpc),
                # Short: HAProxy takes socket paths of at most 97 bytes, and Serve puts
                # them in a subfolder named by the 56-character node id.
                files_dir=Path(info.temp_dir) / HAPROXY_DIR,
                stats_port=stats,
                metrics_port=metrics,
            )
        )
    # Workers run this interpreter, so an installed rayship imports anyway; putting the
    # checkout first makes the nodes run the same code as the process that started them.
    if (_PROJECT_ROOT / "pyproject.toml").is_file() and (_PROJECT_ROOT / "training").is_dir():
        parts = [str(_PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


@dataclass
class _Start:
    """A running `ray start` and the file its output goes to."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def _popen_ray_start(args: list[str], env: dict[str, str], log: Path) -> _Start:
    """`ray start ARGS` in a new session (its daemons inherit the session id), output to `log`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return _Start(proc, log)


def _wait_ray_start(start: _Start, what: str) -> None:
    """Wait for a `ray start` to exit 0 (its daemons keep running); else raise with its output."""
    try:
        rc: int | None = start.proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0:
        try:
            lines = start.log.read_text(errors="replace").strip().splitlines()
            tail = "\n".join(lines[-15:])
        except OSError:
            tail = "(no output)"
        outcome = "timed out" if rc is None else f"exited with {rc}"
        raise ClusterError(
            f"`ray start` for the {what} node {outcome} (logs in {start.log.parent}):\n{tail}"
        )


def _query_gcs(info: ClusterInfo, expect_nodes: int, timeout_s: float) -> ClusterStatus:
    """Nodes and CPUs of the cluster, asked from a child process; see `_start_gcs_query`."""
    return _finish_gcs_query(_start_gcs_query(info, expect_nodes, timeout_s), info)


def _start_gcs_query(
    info: ClusterInfo, expect_nodes: int, timeout_s: float
) -> subprocess.Popen[str]:
    """Start a child that asks the GCS for nodes and resources, with the cluster's auth env.

    With `expect_nodes > 0` it polls until that many nodes are alive or `timeout_s`
    passes. It uses Ray's `GlobalState` (what `ray.cluster_utils` uses): no driver,
    no job, about 1 s. A child, because Ray reads the auth mode once per process.
    """
    return subprocess.Popen(
        [sys.executable, "-c", _GCS_QUERY, info.address, str(expect_nodes), str(timeout_s)],
        env=_node_env(info),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_gcs_query(proc: subprocess.Popen[str], info: ClusterInfo) -> ClusterStatus:
    """Collect a `_start_gcs_query` child's JSON; head first, then workers, dead nodes last."""
    try:
        out, err = proc.communicate(timeout=START_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise ClusterError(f"could not query the Ray cluster at {info.address}: {last}")
    raw = json.loads(out.strip().splitlines()[-1])
    nodes = [
        NodeStatus(
            node_id=n["node_id"],
            ip=n["ip"],
            name=n["name"],
            is_head=n["is_head"],
            alive=n["alive"],
            cpus=n["cpus"],
            cpus_available=n["cpus_available"],
        )
        for n in raw
    ]
    nodes.sort(key=lambda n: (not n.alive, not n.is_head, n.name))
    alive = [n for n in nodes if n.alive]
    return ClusterStatus(
        address=info.address,
        alive_nodes=len(alive),
        cpus_total=sum(n.cpus for n in alive),
        cpus_available=sum(n.cpus_available for n in alive),
        nodes=nodes,
        auth_mode=info.auth_mode,
        token_path=info.token_path,
    )


_GCS_QUERY = r"""
import json, sys, time
from ray._private.state import GlobalState
from ray._raylet import GcsClientOptions

address, expect, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
state = GlobalState()
state._initialize_global_state(
    GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
)
deadline = time.monotonic() + timeout
while True:
    table = state.node_table()
    if sum(1 for n in table if n["Alive"]) >= expect or time.monotonic() > deadline:
        break
    time.sleep(0.2)
avail = state.available_resources_per_node()
out = [
    {
        "node_id": n["NodeID"],
        "ip": n["NodeManagerAddress"],
        "name": n.get("Labels", {}).get("rayship-node") or n.get("NodeName", ""),
        "is_head": "node:__internal_head__" in n.get("Resources", {}),
        "alive": bool(n["Alive"]),
        "cpus": float(n.get("Resources", {}).get("CPU", 0.0)),
        "cpus_available": float(avail.get(n["NodeID"], {}).get("CPU", 0.0)) if n["Alive"] else 0.0,
    }
    for n in table
]
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- processes


def _procs() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every live, non-zombie process we can see."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            # Fields after the parenthesised command: state ppid pgrp session ...
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] in (b"Z", b"X"):
                continue
            sid = int(fields[3])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out.append((pid, sid, cmd))
    return out


def _cluster_procs(info: ClusterInfo) -> list[tuple[int, str]]:
    """Live processes of this cluster: in a recorded session that still names our temp dir."""
    if not info.session_ids or info.boot_id != _boot_id():
        return []
    procs = _procs()
    wanted = set(info.session_ids)
    owned = {sid for _, sid, cmd in procs if sid in wanted and info.temp_dir in cmd}
    return [(pid, cmd) for pid, sid, cmd in procs if sid in owned and pid != os.getpid()]


def _is_running(info: ClusterInfo) -> bool:
    """True when this cluster's GCS process is alive and its port accepts connections."""
    if not info.address:
        return False
    if not any("gcs_server" in cmd for _, cmd in _cluster_procs(info)):
        return False
    host, port = info.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _teardown(info: ClusterInfo, keep_temp_dir: bool = False) -> bool:
    """Stop this cluster's processes in `ray stop`'s order, remove its files; True if any ran."""
    procs = _cluster_procs(info)
    kinds = {pid: os.path.basename(cmd.split(" ", 1)[0]) for pid, cmd in procs}
    buckets = [
        [p for p, kind in kinds.items() if kind == "raylet"],
        [p for p, kind in kinds.items() if kind not in ("raylet", "gcs_server")],
        [p for p, kind in kinds.items() if kind == "gcs_server"],
    ]
    for bucket, grace in zip(buckets, (8.0, 4.0, 3.0), strict=True):
        _terminate(bucket, grace)
    # Anything that appeared meanwhile (a worker forked late) goes without ceremony.
    _terminate([p for p, _ in _cluster_procs(info)], 0.0)

    if info.replica_ports:
        claim = PORT_CLAIMS / str(info.replica_ports[0])
        with contextlib.suppress(OSError):
            if claim.read_text().strip() == info.temp_dir:
                claim.unlink()
    state_dir = Path(info.state_dir)
    for name in (STATE_FILE, TOKEN_FILE):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
    if not keep_temp_dir and Path(info.temp_dir).name.startswith("rayship-"):
        shutil.rmtree(info.temp_dir, ignore_errors=True)
    return bool(procs)


def _terminate(pids: list[int], grace_s: float) -> None:
    """SIGTERM `pids`, wait up to `grace_s` for them to go, SIGKILL the rest."""
    live = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL if grace_s <= 0 else signal.SIGTERM)
            live.append(pid)
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [p for p in live if _alive(p)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [p for p in live if _alive(p)]


def _alive(pid: int) -> bool:
    """True unless `pid` is gone or a zombie (children of a dead raylet can stay zombies)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


# --------------------------------------------------------------------------- small things


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _object_store_bytes(nodes: int) -> int:
    """Per-node object store: Ray's default 30% of RAM, capped by /dev/shm, split over nodes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = 0.3 * total
    with contextlib.suppress(OSError):
        shm = os.statvfs("/dev/shm")
        budget = min(budget, 0.8 * shm.f_bavail * shm.f_frsize)
    return max(MIN_OBJECT_STORE_BYTES, int(budget / nodes))


# Ports for Ray's servers come from between Ray's default worker ports (10002-19999)
# and Serve's direct-ingress replica ports (30000-31000; Linux's ephemeral range starts
# at 32768): a port the kernel hands out (bind to 0) can be taken by any outgoing
# connection, or by a Ray worker started with ``--min-worker-port=0``, before the
# server that was meant to bind it does; a replica finding its port taken retries.
PORT_RANGE = range(20000, 30000)


def free_ports(n: int, exclude: Collection[int] = ()) -> list[int]:
    """`n` distinct ports in PORT_RANGE that were free a moment ago (held together)."""
    socks: list[socket.socket] = []
    try:
        for port in random.sample(PORT_RANGE, len(PORT_RANGE)):
            if len(socks) == n:
                break
            if port in exclude:
                continue
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise ClusterError(f"fewer than {n} free TCP ports in {PORT_RANGE}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Each cluster's Serve replicas take their own HTTP ports from a block of this range
# (services.ingress.serve_env): above Serve's default 30000-31000, which other Serve
# clusters on the machine use, and below Linux's ephemeral ports (32768 and up).
REPLICA_PORT_BLOCKS = range(31000, 32700, 100)
PORT_CLAIMS = Path(tempfile.gettempdir()) / "rayship-replica-ports"


def claim_replica_ports(owner: str) -> range:
    """A block of ports for one cluster's replicas, claimed machine-wide for ``owner``.

    A claim is a file ``PORT_CLAIMS/<first port>`` naming the owner, a folder (the
    cluster's Ray temp dir) that exists while the cluster does: a block whose owner is
    gone is free again, so a crashed cluster's claim does not leak. A block is also
    skipped while any of its ports is bound (a foreign server). Raises ClusterError when
    every block is taken.
    """
    PORT_CLAIMS.mkdir(mode=0o755, exist_ok=True)
    step = REPLICA_PORT_BLOCKS.step
    with open(PORT_CLAIMS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for start in REPLICA_PORT_BLOCKS:
            claim = PORT_CLAIMS / str(start)
            with contextlib.suppress(OSError, ValueError):
                if Path(claim.read_text().strip()).exists():
                    continue  # a live cluster's block
            block = range(start, start + step)
            if not _all_free(block):
                continue
            claim.write_text(owner + "\n")
            return block
    raise ClusterError(
        f"no free block of replica ports in {REPLICA_PORT_BLOCKS.start}-"
        f"{REPLICA_PORT_BLOCKS.stop + step - 1}: every one is claimed by a running "
        f"rayship cluster or in use ({PORT_CLAIMS})"
    )


def _all_free(ports: range) -> bool:
    """True when nothing listens on any of ``ports`` (on any address)."""
    for port in ports:
        s = socket.socket()
        try:
            s.bind(("", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - not Linux
        return ""


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600), replacing any old file."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _replace(info: ClusterInfo, **changes: Any) -> ClusterInfo:
    return ClusterInfo(**{**asdict(info), **changes})


def _read_info(state_dir: Path) -> ClusterInfo | None:
    path = state_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(f"{path} is unreadable ({e}); remove it if no cluster runs") from e
    try:
        return ClusterInfo(**raw)
    except TypeError as e:
        raise ClusterError(f"{path} was written by another rayship version ({e})") from e


def _write_info(info: ClusterInfo) -> None:
    path = Path(info.state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    with open(state_dir / LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
