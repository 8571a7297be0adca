"""The security rules, each caused and checked against real parts (docs/security.md):

- a refused spec starts nothing: `rayship tune`/`run` exit 1 naming the key, and no Ray
  process, Ray temp dir or MLflow store comes into being;
- spec estimators come only from scikit-learn: a module named in a spec outside it is
  never imported, by the spec or by the trial's estimator builder;
- nothing unpickles at serve time: the serving path (registry load with its checksum,
  onnxruntime, V1 and V2, drift codes) runs under an audit hook that sees every
  ``pickle.find_class``, and the registered artifacts are ONNX, JSON and YAML only;
- on a `rayship up` cluster with an endpoint, the endpoint, the dashboard, the replicas'
  own HTTP servers and Serve's fallback proxy listen on 127.0.0.1 only, and the Ray
  ports that listen on the machine's address refuse a client without the cluster's
  token and admit one with it.

The cluster tests share one `rayship up` (head only) serving one churn model; about
60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import psutil
import pytest
import yaml
from cli_runner import rayship

from cluster import local
from training.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from specs import CHURN_ROW, churn_spec, make_churn  # noqa: E402

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
ROW = CHURN_ROW


def _marked_processes(marker: str) -> list[str]:
    """Live processes whose environment carries ``RAYSHIP_PROBE=marker`` (Ray's daemons
    and workers inherit it from whoever started them)."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("RAYSHIP_PROBE") == marker and proc.status() != "zombie":
                found.append(f"{proc.pid} {proc.info['name']}")
        except psutil.Error:
            continue
    return found


# --------------------------------------------------------------------------- spec, no Ray


@pytest.mark.parametrize("command", ["tune", "run"])
def test_a_refused_spec_starts_no_ray_and_creates_no_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
):
    raw = churn_spec("churn.csv", search={"num_samples": 0})
    raw["models"][0]["estimator"] = "os.system"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    marker = uuid.uuid4().hex
    ray_tmp = tmp_path / "ray-tmp"
    for key in [k for k in os.environ if k.startswith(("RAY_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAYSHIP_PROBE", marker)  # inherited by anything the CLI starts
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # Ray's session dir would go there
    proc = rayship(command, "bad.yaml", cwd=tmp_path, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "models.0.estimator" in out and "search.num_samples" in out
    assert "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no .rayship, mlruns
    assert not ray_tmp.exists()
    assert _marked_processes(marker) == []


# --------------------------------------------------------------------------- allow-list


def test_a_module_outside_scikit_learn_is_never_imported(tmp_path: Path, monkeypatch):
    """The spec names a module that would run code on import: it is refused by name and
    never imported — by the spec check nor by the trial's estimator builder."""
    from training.models import make_estimator

    touched = tmp_path / "imported"
    (tmp_path / "rayship_probe_evil.py").write_text(
        f"open({str(touched)!r}, 'w').write('ran')\nclass Model:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("rayship_probe_evil.Model", "sklearn.rayship_probe_evil.Model"):
        raw = churn_spec("d.csv")
        raw["models"][0] = {"type": "sklearn", "estimator": path}
        with pytest.raises(SpecError) as info:
            parse_spec(raw)
        assert any(p.startswith("models.0.estimator: ") for p in info.value.problems)
        with pytest.raises(ValueError, match="scikit-learn"):
            make_estimator(path, {}, seed=0)
    assert not touched.exists()
    assert "rayship_probe_evil" not in sys.modules


@pytest.mark.parametrize(
    "path",
    [
        "sklearn.utils.Bunch",  # a class, not an estimator
        "sklearn.base.ClassifierMixin",  # a mixin
        "sklearn.datasets.fetch_openml",  # a function (would download)
        "sklearn.utils._testing.MinimalClassifier.fit",
        "sklearn.linear_model.LogisticRegression.__class__",
    ],
)
def test_a_scikit_learn_name_that_is_no_estimator_class_is_refused(path: str):
    from training.models import make_estimator

    raw = churn_spec("d.csv")
    raw["models"][0] = {"type": "sklearn", "estimator": path}
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert any(p.startswith("models.0.estimator: ") for p in info.value.problems)
    with pytest.raises(ValueError):
        make_estimator(path, {}, seed=0)


# --------------------------------------------------------------------------- serving


@dataclass
class Store:
    cwd: Path  # the CLI's working directory; its .rayship holds the MLflow store
    uri: str
    name: str
    checkpoint: Path  # the training checkpoint (a joblib pickle), for the control


@pytest.fixture(scope="module")
def store(tmp_path_factory, register_without_search) -> Store:
    """A churn model registered as the search's winner would be (version 1, production)."""
    from training import registry

    cwd = tmp_path_factory.mktemp("security")
    make_churn().to_csv(cwd / "churn.csv", index=False)
    spec = parse_spec(churn_spec(cwd / "churn.csv"))
    state = cwd / ".rayship"
    register_without_search(spec, state, production=True)
    return Store(cwd, registry.tracking_uri(state), spec.name, state / "checkpoint")


SERVE_PATH = r"""
import json, sys

events = []
sys.addaudithook(
    lambda event, args: events.append([event, *map(str, args)])
    if event == "pickle.find_class"
    else None
)

import numpy as np
from services import v2
from services.monitor import settings_for
from services.predictor import OnnxPredictor
from training import drift, registry

uri, name, row, control = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
artifact = registry.load_artifact(uri, name, "production")  # the replica's loader
predictor = OnnxPredictor(artifact.onnx_bytes, artifact.schema, name, artifact.version)
v1 = predictor.predict([row, row], return_probabilities=True)
categorical = {f["name"] for f in artifact.schema["features"] if f["dtype"] == "string"}
body = json.dumps({"inputs": [
    {"name": col, "shape": [1, 1], "datatype": "BYTES" if col in categorical else "FP32",
     "data": [value]} for col, value in row.items()
]}).encode()
request = v2.parse_infer(body, None)
feeds = v2.feeds(predictor, request.tensors)
content, _ = v2.response(request, predictor, name, *predictor.run(feeds))
settings = settings_for(artifact.drift, artifact.spec_yaml, None)
report = drift.report(artifact.drift, drift.codes(artifact.drift, feeds))
if control:  # what a model saved by pickle would take to load
    import joblib
    joblib.load(control)
print(json.dumps({
    "events": events,
    "v1": v1["predictions"],
    "v2": json.loads(content)["outputs"][0]["data"],
    "window": settings.window,
    "features": len(report["features"]),
    "modules": sorted(m for m in ("sklearn", "joblib", "torch") if m in sys.modules),
}))
"""


def _serve_path(store: Store, control: str = "") -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_PATH, store.uri, store.name, json.dumps(ROW), control],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nothing_unpickles_on_the_serving_path(store: Store):
    out = _serve_path(store)
    assert out["v1"][:1] == out["v2"] and out["v1"][0] in ("churned", "stayed")
    assert out["window"] > 0 and out["features"] == len(ROW)
    assert out["events"] == []  # no pickle.find_class: no object came out of a pickle
    assert out["modules"] == []  # the path never imports scikit-learn, joblib or torch
    # control: the same hook in the same process does see a pickled model load
    control = _serve_path(store, str(store.checkpoint / "estimator.joblib"))
    assert any(
        event == "pickle.find_class" and "sklearn" in mod for event, mod, *_ in control["events"]
    )


def test_a_registered_version_holds_only_onnx_json_and_yaml(store: Store):
    import onnx

    from training import registry

    version = registry.resolve_version(store.uri, store.name, "production")
    folder = Path(unquote(urlparse(version.source).path))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert {p.suffix for p in files} <= {".onnx", ".json", ".yaml"}, files
    assert [p.name for p in files if p.suffix == ".onnx"] == ["model.onnx"]
    onnx.checker.check_model(onnx.load_model_from_string((folder / "model.onnx").read_bytes()))
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())


# --------------------------------------------------------------------------- cluster


@dataclass
class Served:
    info: local.ClusterInfo
    port: int


@pytest.fixture(scope="module")
def served(store: Store, free_port) -> Iterator[Served]:
    """`rayship up --workers 0`, then `rayship serve churn` on a free port; down after."""
    up = rayship("up", "--workers", "0", cwd=store.cwd)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        port = free_port()
        serve = rayship("serve", store.name, "--port", str(port), cwd=store.cwd)
        assert serve.returncode == 0, serve.stdout + serve.stderr
        info = local.info(store.cwd / ".rayship")
        assert info is not None
        yield Served(info, port)
    finally:
        rayship("down", cwd=store.cwd)


def _listeners(info: local.ClusterInfo) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP socket the cluster's processes listen on."""
    out = []
    for pid, cmd in local._cluster_procs(info):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        name = cmd.split()[0].rsplit("/", 1)[-1] if not cmd.startswith("ray::") else cmd.split()[0]
        out += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return sorted(set(out))


def test_endpoint_dashboard_and_replicas_listen_on_loopback_only(served: Served):
    info = served.info
    dashboard = int(info.dashboard.rsplit(":", 1)[1])
    first, end = info.replica_ports
    fallback_http = info.haproxy_ports[2]
    listeners = _listeners(info)
    by_port: dict[int, set[str]] = {}
    for ip, port, _ in listeners:
        by_port.setdefault(port, set()).add(ip)
    replicas = [p for p in by_port if first <= p < end]
    assert served.port in by_port and dashboard in by_port and replicas, listeners
    for port in (served.port, dashboard, fallback_http, *replicas):
        assert by_port.get(port, set()) <= LOOPBACK, (port, by_port.get(port))
    # and so, seen from the network: the endpoint answers on 127.0.0.1 only
    assert httpx.get(f"http://127.0.0.1:{served.port}/v2/health/live").status_code == 200
    for port in (served.port, dashboard):
        with pytest.raises(OSError), socket.create_connection((info.node_ip, port), timeout=5):
            pass


GCS_QUERY = r"""
import sys
from ray._private.state import GlobalState
from ray._raylet import GcsClientOptions

state = GlobalState()
try:
    state._initialize_global_state(
        GcsClientOptions.create(
            sys.argv[1], None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
        )
    )
    print("NODES", sum(1 for n in state.node_table() if n["Alive"]))
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc).replace("\n", " ")[:300])
"""


def _gcs_client(address: str, tmp: Path, **auth: str) -> str:
    """The last line of a GCS client process run with only the ``auth`` variables of
    Ray's (none inherited; an empty HOME, so no ~/.ray/auth_token is found)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp), **auth)
    proc = subprocess.run(
        [sys.executable, "-c", GCS_QUERY, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}: {proc.stderr[-500:]}"


def test_the_gcs_refuses_a_client_without_the_token(served: Served, tmp_path: Path):
    info = served.info
    assert info.auth_mode == "token" and info.node_ip not in LOOPBACK
    gcs_port = int(info.address.rsplit(":", 1)[1])
    # the GCS listens beyond loopback (Ray's choice): the token is what keeps clients out
    assert any(port == gcs_port and ip not in LOOPBACK for ip, port, _ in _listeners(info))
    token = Path(info.token_path).read_text().strip()
    # on the wire: a call without the token, or with another, is refused
    assert _grpc_code(info.node_ip, gcs_port, None, GCS_METHOD) == "UNAUTHENTICATED"
    assert _grpc_code(info.node_ip, gcs_port, "0" * 64, GCS_METHOD) == "UNAUTHENTICATED"
    assert _grpc_code(info.node_ip, gcs_port, token, GCS_METHOD) == "OK"
    # and through Ray's own GCS client, as a driver would connect
    line = _gcs_client(info.address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert line.startswith("REFUSED"), line
    line = _gcs_client(
        info.address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=info.token_path
    )
    assert line == "NODES 1"


GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"


def _grpc_code(ip: str, port: int, token: str | None, method: str) -> str:
    """The gRPC status of one call (an empty request) to a Ray service ``method``, with
    ``token`` as Ray sends it (``authorization: Bearer``) or without; "OK" if it
    succeeded."""
    import grpc

    channel = grpc.insecure_channel(f"{ip}:{port}")
    call = channel.unary_unary(method)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        call(b"", metadata=metadata, timeout=5)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def _http_get(ip: str, port: int, path: str) -> tuple[int, str]:
    """(status, first bytes of the body) of a plain GET, or (0, error) if no HTTP answer."""
    try:
        resp = httpx.get(f"http://{ip}:{port}{path}", timeout=5)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    return resp.status_code, resp.text[:200]


# A method of each of Ray's gRPC services, called with an empty request: the GCS, a
# raylet's node and object managers, every worker (actors and replicas among them), the
# dashboard agent, the Ray client server, a Serve replica's inter-deployment server. The
# token is checked before a method runs; an unknown method is UNIMPLEMENTED first.
RAY_METHODS = [
    GCS_METHOD,
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.ObjectManagerService/Pull",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.ReporterService/HealthCheck",
    "/ray.rpc.RayletDriver/ClusterInfo",
    "/ray.serve.ASGIService/HandleRequest",
]
READ_ONLY = {  # safe to run with the token, to show it is what lets a call through
    GCS_METHOD,
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.ReporterService/HealthCheck",
}


def test_every_other_port_demands_the_token_or_only_exports_metrics(served: Served):
    """Beyond loopback, a client without the token reaches nothing but read-only
    exporters: Ray's gRPC servers answer UNAUTHENTICATED, its agents' HTTP servers 401;
    what answers without the token is a Prometheus exporter (Ray's metrics agent, the
    dashboard's and autoscaler's, HAProxy's) or HAProxy's stats page, which Ray and
    Serve bind to every interface — docs/security.md says to firewall them. A listener
    that is none of these fails the test."""
    info = served.info
    ip, token = info.node_ip, Path(info.token_path).read_text().strip()
    stats, haproxy_metrics = info.haproxy_ports[:2]
    exposed = sorted(
        {(port, name) for addr, port, name in _listeners(info) if addr not in LOOPBACK}
    )
    grpc_ports, http_ports, exporters = [], [], []
    for port, name in exposed:
        refused = [m for m in RAY_METHODS if _grpc_code(ip, port, None, m) == "UNAUTHENTICATED"]
        if refused:
            method = refused[0]
            assert _grpc_code(ip, port, "0" * 64, method) == "UNAUTHENTICATED", (port, name)
            if method in READ_ONLY:
                assert _grpc_code(ip, port, token, method) == "OK", (port, name, method)
            grpc_ports.append((port, name))
            continue
        status, body = _http_get(ip, port, "/")
        if status == 401:
            http_ports.append((port, name))
            continue
        status, body = _http_get(ip, port, "/stats" if port == stats else "/metrics")
        assert status == 200, (port, name, status, body)
        if port == stats:
            assert name == "haproxy" and "Statistics Report" in body, (port, name, body)
        else:
            assert body.startswith("# "), (port, name, body)  # Prometheus text
            assert name in ("haproxy", "python", "ray::DashboardAgent"), (port, name)
        exporters.append((port, name))
    gcs_port = int(info.address.rsplit(":", 1)[1])
    assert (gcs_port, "gcs_server") in grpc_ports
    assert sum(name == "raylet" for _, name in grpc_ports) == 2  # node and object manager
    assert [name for _, name in http_ports] == sorted(
        ["ray::DashboardAgent", "ray::RuntimeEnvAgent"]
    )
    assert {(stats, "haproxy"), (haproxy_metrics, "haproxy")} <= set(exporters)
    assert len(exporters) <= 5, exporters  # HAProxy's two, Ray's agent, dashboard, autoscaler
