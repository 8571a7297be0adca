"""Operating a live endpoint: two models at once, a canary, a promote under steady load,
an overload burst. Real Ray and Serve, real HTTP on 127.0.0.1, the real MLflow store.

One Ray instance for the module; each test deploys the endpoint config it needs, the
way ``rayship serve`` / ``rayship models promote`` do (only ``user_config`` changes
between most of them, so Serve reconfigures the running replica).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from served import GOOD, rows_of

from services.deploy import DeployError, deploy, deployed_config, predict_http
from services.serve_config import ServedModel, models_of, serve_config
from training import export
from training.spec import ServeSpec

SPEC = ServeSpec(
    min_replicas=1,
    max_replicas=1,
    cpus_per_replica=0.5,
    max_batch_size=16,
    batch_wait_timeout_s=0.002,
)


@pytest.fixture(scope="module")
def port(free_port):
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield free_port()
    finally:
        serve.shutdown()
        ray.shutdown()


def endpoint(registered, port, *models: ServedModel, expect=None) -> str:
    config = serve_config(list(models), tracking_uri=registered.uri, port=port)
    return deploy(config, expect=expect)


def churn(registered, ref="production", **kw) -> ServedModel:
    return ServedModel(name=registered.name, ref=ref, serve=kw.pop("serve", SPEC), **kw)


def replica_ids() -> list[str]:
    return sorted(replica_details())


def test_two_models_answer_at_their_own_routes(registered, port):
    other = ServedModel(name=registered.other_name, serve=SPEC)
    url = endpoint(registered, port, churn(registered), other)
    X = registered.X_test[:60]
    rows = rows_of(X)
    for name, graph in (
        (registered.name, registered.onnx_bytes),
        (other.name, registered.other_onnx_bytes),
    ):
        out = predict_http(url, name, rows, return_probabilities=True)
        pred, proba = export.run_onnx(graph, X, registered.schema)
        assert out["predictions"] == pred.tolist()
        np.testing.assert_allclose(out["probabilities"], proba, atol=1e-6)
        assert httpx.get(f"{url}/v2/models/{name}/ready", timeout=10).status_code == 200
    tree = predict_http(url, other.name, rows, return_probabilities=True)["probabilities"]
    logreg = predict_http(url, registered.name, rows, return_probabilities=True)["probabilities"]
    assert not np.allclose(tree, logreg)  # two different models, each at its own route
    listed = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
    assert listed == sorted([registered.name, other.name])


def haproxy_servers(stats_port: int) -> dict[str, tuple[str, int]]:
    """(status, 2xx answers) of each server of the endpoint's backend, from HAProxy's stats
    CSV. Counters restart when Serve reloads HAProxy's config; statuses do not."""
    text = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=10).text
    header, *rows = [line.split(",") for line in text.lstrip("# ").splitlines() if line]
    col = {name: i for i, name in enumerate(header)}
    return {
        row[col["svname"]]: (row[col["status"]], int(row[col["hrsp_2xx"]] or 0))
        for row in rows
        if row[col["pxname"]] == "http-rayship" and row[col["svname"]] != "BACKEND"
    }


def listener(port: int) -> str:
    """The executable of the process listening on 127.0.0.1:``port`` (from /proc)."""
    wanted = f"{port:04X}"
    inodes = {
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split())[1].endswith(f":{wanted}") and fields[3] == "0A"  # LISTEN
    }
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    return ""


def test_requests_go_from_haproxy_straight_to_a_replica(registered, port, native_ingress):
    url = endpoint(registered, port, churn(registered))
    assert listener(port) == "haproxy"  # not Serve's Python proxy
    stats_port = int(native_ingress["RAY_SERVE_HAPROXY_STATS_PORT"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # HAProxy health-checks a new replica first
        servers = haproxy_servers(stats_port)
        replicas = {n: v for n, v in servers.items() if n.startswith("SERVE_REPLICA")}
        if replicas and all(status == "UP" for status, _ in replicas.values()):
            break
        time.sleep(0.5)
    backup = {n: v for n, v in servers.items() if n.startswith("SERVE_PROXY")}
    assert replicas and all(status == "UP" for status, _ in replicas.values()), servers
    assert backup, servers  # Serve's Python proxy is there only as the backup server
    for _ in range(20):
        assert predict_http(url, "churn", [GOOD])["model_version"] == registered.good_version
    after = haproxy_servers(stats_port)
    assert all(after[n][1] <= answers for n, (_, answers) in backup.items()), after
    assert sum(after[n][1] for n in replicas if n in after) > 0, after
    # Replicas run at the priority of Ray's daemons, not Ray's default nice 15.
    pids = replica_pids()
    assert pids and all(os.getpriority(os.PRIO_PROCESS, pid) == 0 for pid in pids), pids


def replica_pids() -> list[int]:
    return list(replica_details().values())


def test_a_ten_percent_canary_gets_about_ten_percent(registered, port):
    canary = churn(registered, canary_ref=registered.swap_version, canary_weight=0.1)
    url = endpoint(
        registered,
        port,
        canary,
        expect={"churn": (registered.good_version, registered.swap_version)},
    )
    with ThreadPoolExecutor(4) as pool:
        versions = list(
            pool.map(lambda _: predict_http(url, "churn", [GOOD])["model_version"], range(400))
        )
    counts = Counter(versions)
    assert set(counts) == {registered.good_version, registered.swap_version}
    assert 20 <= counts[registered.swap_version] <= 60, counts

    # Aborting the canary (what `rayship models abort-canary` deploys) ends it.
    url = endpoint(
        registered, port, churn(registered), expect={"churn": (registered.good_version, None)}
    )
    assert {predict_http(url, "churn", [GOOD])["model_version"] for _ in range(20)} == {
        registered.good_version
    }


@dataclass
class Answer:
    """One request of a steady load: when it was answered, the HTTP status (None when the
    client got no answer: ``error`` names the exception) and the version that answered."""

    at: float
    status: int | None
    version: str | None = None
    error: str | None = None


@contextlib.contextmanager
def steady_load(url: str, clients: int = 4, rows: int = 8) -> Iterator[list[Answer]]:
    """``clients`` threads POSTing ``rows`` rows to churn's V1 predict, one request at a
    time each, for as long as the block runs; every request sent is one :class:`Answer`
    in the list (complete once the block has exited)."""
    answers: list[Answer] = []
    stop = threading.Event()
    body = {"instances": [GOOD] * rows}

    def client():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    resp = http.post(f"{url}/v1/models/churn:predict", json=body)
                except httpx.HTTPError as exc:
                    answers.append(Answer(time.monotonic(), None, error=type(exc).__name__))
                    continue
                version = resp.json().get("model_version") if resp.status_code == 200 else None
                answers.append(Answer(time.monotonic(), resp.status_code, version))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield answers
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_promote_under_steady_load_fails_no_request(registered, port):
    url = endpoint(
        registered, port, churn(registered), expect={"churn": (registered.good_version, None)}
    )
    before = replica_ids()
    with steady_load(url) as answers:
        time.sleep(1.5)
        # What `rayship models promote churn 3` deploys: the ref moves, nothing else changes.
        endpoint(
            registered,
            port,
            churn(registered, ref=registered.swap_version),
            expect={"churn": (registered.swap_version, None)},
        )
        swapped = time.monotonic()
        time.sleep(1.5)
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: len(answers)}, statuses
    assert len(answers) > 50
    assert answers[0].version == registered.good_version
    assert {a.version for a in answers if a.at > swapped + 0.5} == {registered.swap_version}
    assert replica_ids() == before  # reconfigured in place, not restarted


def test_an_overload_burst_gets_503_with_retry_after_then_the_endpoint_recovers(registered, port):
    # One request at a time per replica, two more may wait in it: the rest are shed (with the
    # native ingress each replica sheds what would queue beyond max_queued_requests).
    tight = SPEC.model_copy(
        update={"max_batch_size": 1, "target_ongoing_requests": 0.5, "max_queued_requests": 2}
    )
    url = endpoint(registered, port, churn(registered, serve=tight))
    heavy = {"instances": [GOOD] * 2000}  # ~10 ms of validation each: the queue fills

    def send(_):
        resp = httpx.post(f"{url}/v1/models/churn:predict", json=heavy, timeout=60)
        return resp.status_code, resp.headers.get("retry-after")

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(send, range(96)))
    codes = Counter(code for code, _ in results)
    assert codes[503] > 0 and codes[200] > 0 and set(codes) == {200, 503}, codes
    assert {after for code, after in results if code == 503} == {"1"}
    # The burst is over: every request is served again.
    assert all(send(i)[0] == 200 for i in range(5))


def test_a_version_failing_its_checksum_is_not_deployed_and_the_old_one_serves_on(registered, port):
    url = endpoint(
        registered, port, churn(registered), expect={"churn": (registered.good_version, None)}
    )
    with pytest.raises(DeployError, match="sha256"):
        endpoint(
            registered,
            port,
            churn(registered, ref=registered.tampered_version),
            expect={"churn": (registered.tampered_version, None)},
        )
    assert predict_http(url, "churn", [GOOD])["model_version"] == registered.good_version
    # ... and Serve's record of the endpoint is the config that serves it (rolled back).
    assert models_of(deployed_config())[0]["ref"] == "production"


def test_a_replica_killed_under_steady_load_fails_almost_no_request(
    registered, port, native_ingress
):
    """One of two replicas SIGKILLed while four clients keep sending: at most 0.1 % of the
    requests fail, and Serve has two running replicas again within 30 s."""
    two = SPEC.model_copy(update={"min_replicas": 2, "max_replicas": 2})
    url = endpoint(
        registered,
        port,
        churn(registered, serve=two),
        expect={"churn": (registered.good_version, None)},
    )
    stats_port = int(native_ingress["RAY_SERVE_HAPROXY_STATS_PORT"])
    with steady_load(url) as answers:
        # Both replicas are up behind HAProxy and answering before one is killed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            servers = haproxy_servers(stats_port)
            replicas = {n: v for n, v in servers.items() if n.startswith("SERVE_REPLICA")}
            if len(replicas) == 2 and all(s == "UP" and ok > 0 for s, ok in replicas.values()):
                break
            time.sleep(0.5)
        assert len(replicas) == 2 and all(s == "UP" and ok > 0 for s, ok in replicas.values()), (
            servers
        )
        before = replica_details()
        assert len(before) == 2, before
        victim, pid = next(iter(before.items()))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 30
        while time.monotonic() < deadline:
            after = replica_details()
            if len(after) == 2 and victim not in after:
                break
            time.sleep(0.2)
        recovered = time.monotonic()
        time.sleep(2)  # the new replica takes its share of the load
    assert len(after) == 2 and victim not in after, after  # back to two within 30 s
    sent = len(answers)
    failed = [a for a in answers if a.status != 200]
    print(
        f"\nreplica kill: {len(failed)} of {sent} requests failed "
        f"({100 * len(failed) / sent:.3f} %), two replicas again after {recovered - killed:.1f} s; "
        f"failures: {[(a.status, a.error, round(a.at - killed, 2)) for a in failed]}"
    )
    assert sent > 500
    assert len(failed) <= 0.001 * sent, Counter((a.status, a.error) for a in failed)
    assert {a.version for a in answers if a.status == 200} == {registered.good_version}
    assert predict_http(url, "churn", [GOOD])["model_version"] == registered.good_version


def replica_details() -> dict[str, int]:
    """Replica id → process id of each RUNNING replica of the endpoint (Serve's record)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"]["rayship"]["deployments"]["ModelServer"]
    return {r["replica_id"]: r["pid"] for r in deployment["replicas"] if r["state"] == "RUNNING"}
