"""The head's MLflow store goes away while an endpoint serves: a real ``mlflow server``
(SQLite backend, local artifact root) on 127.0.0.1, stopped mid-test.

- Serving goes on: replicas loaded their version at deploy time and need the store for
  nothing else, so V1 and V2 requests keep answering 200 with the same version.
- ``rayship tune`` (its tracking URI from ``MLFLOW_TRACKING_URI``, as a user points it at
  a server) fails at once with one line naming the store, before Ray starts, and — seen
  once the server is back — registered nothing: no version, no run, no artifact.
- The server stopped in the middle of a ``rayship tune``: the search stops at the next
  trial event with one error line naming the server, and no version is registered.

One Ray instance and one MLflow server for the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cli_runner import rayship, start

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from specs import CHURN_ROW, churn_spec, make_churn  # noqa: E402

ROW = CHURN_ROW


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port`` over ``root``'s SQLite store and artifact
    folder; :meth:`start` and :meth:`stop` it as an operator would."""

    root: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, timeout: float = 60) -> None:
        if self.process is not None and self.process.poll() is None:
            return  # running already
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (the server's own)
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server"),
                *("--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
                *("--default-artifact-root", self.artifacts.as_uri(), "--no-serve-artifacts"),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its workers stop with it
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"mlflow server not up after {timeout} s")

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@dataclass
class Served:
    server: MlflowServer
    cwd: Path  # the CLI's working directory, with the spec and its CSV
    spec_path: Path
    name: str
    version: str
    url: str  # the endpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory, free_port, register_without_search) -> Iterator[Served]:
    """A churn model registered (version 1, production) on a running MLflow server and
    served from it by a local Ray; the server is stopped and Ray shut down after."""
    import ray
    from ray import serve

    from services.deploy import serve_model
    from training.spec import parse_spec

    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root, free_port())
    server.start()
    try:
        cwd = tmp_path_factory.mktemp("mlflow-down")
        make_churn().to_csv(cwd / "churn.csv", index=False)
        raw = churn_spec(cwd / "churn.csv", search={"num_samples": 2, "cpus_per_trial": 1})
        spec_path = cwd / "churn.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = server.uri  # what register_without_search reads
        try:
            outcome = register_without_search(parse_spec(raw), cwd / "fit", production=True)
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI")
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            url = serve_model(outcome.name, tracking_uri=server.uri, port=free_port())
            yield Served(server, cwd, spec_path, outcome.name, outcome.version, url)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        server.stop()


def v1(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": [ROW]}, timeout=30)


def v2(url: str, name: str) -> httpx.Response:
    inputs = [
        {
            "name": column,
            "shape": [1, 1],
            "datatype": "BYTES" if isinstance(value, str) else "FP32",
            "data": [value],
        }
        for column, value in ROW.items()
    ]
    return httpx.post(f"{url}/v2/models/{name}/infer", json={"inputs": inputs}, timeout=30)


def test_the_endpoint_serves_on_while_the_store_is_down(served):
    before = v1(served.url, served.name)
    assert before.status_code == 200 and before.json()["model_version"] == served.version
    served.server.stop()
    with pytest.raises(httpx.ConnectError):  # the store is really gone
        httpx.get(f"{served.server.uri}/health", timeout=5)
    for _ in range(20):
        one = v1(served.url, served.name)
        assert one.status_code == 200, one.text
        assert one.json() == before.json()  # the same version, the same answer
        two = v2(served.url, served.name)
        assert two.status_code == 200, two.text
        assert two.json()["model_version"] == served.version
    meta = httpx.get(f"{served.url}/v1/models/{served.name}", timeout=10)
    assert meta.status_code == 200 and meta.json()["ready"] is True
    assert meta.json()["version"] == served.version


def test_tune_against_the_stopped_store_fails_in_one_line_and_registers_nothing(
    served, monkeypatch
):
    from training import registry

    served.server.stop()  # (already stopped when the test above ran first)
    listing = files(served.server.artifacts)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.server.uri)
    result = rayship("tune", str(served.spec_path), cwd=served.cwd, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    (line,) = output.splitlines()  # one line, no traceback
    assert line.startswith(f"error: MLflow tracking server {served.server.uri} is unreachable: ")
    assert "Connection refused" in line and "MLFLOW_TRACKING_URI" in line
    assert not (served.cwd / ".rayship" / "searches").exists()  # no search began

    served.server.start()  # back: nothing of the failed tune is in it
    client = registry.client(served.server.uri)
    versions = [v.version for v in client.search_model_versions(f"name = '{served.name}'")]
    assert versions == [served.version]
    assert client.get_experiment_by_name(f"{served.name}-search") is None
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert [r.info.run_id for r in runs] == [served_run(client, served)]
    assert files(served.server.artifacts) == listing  # no half-written run artifacts


def files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def served_run(client, served: Served) -> str:
    """The run that logged the served version (the only run the store should hold)."""
    return client.get_model_version(served.name, served.version).run_id


def test_the_store_stopped_mid_search_fails_tune_in_one_line_and_registers_nothing(
    served, monkeypatch
):
    """The server dies while trials run: the search stops at the next trial event with
    one error line (no traceback) and registers no version. MLflow's client retries an
    unreachable server for about 4 minutes by default (MLFLOW_HTTP_REQUEST_MAX_RETRIES
    7, backoff 2), which rides out a restart; the test turns the retries off, as a user
    who wants to fail at once would."""
    from training import registry

    served.server.start()  # (if a test above stopped it)
    before = registry.client(served.server.uri).search_model_versions(f"name = '{served.name}'")
    raw = yaml.safe_load(served.spec_path.read_text())
    # Forests grown in steps, one trial at a time: about 30 s of trials reporting often,
    # so the server's death lands mid-search.
    raw["models"] = [
        {
            "type": "sklearn",
            "estimator": "sklearn.ensemble.RandomForestClassifier",
            "space": {"n_estimators": 2000, "max_depth": {"choice": [4, 6, 8]}},
        }
    ]
    raw["search"] = {"num_samples": 6, "max_concurrent_trials": 1, "cpus_per_trial": 1}
    spec = served.cwd / "churn-mid.yaml"
    spec.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tune = start("tune", str(spec), cwd=served.cwd)
    try:
        searches = served.cwd / ".rayship" / "searches"
        deadline = time.monotonic() + 180
        while not [p for p in searches.glob("churn-*/trial-*/result.json") if p.stat().st_size]:
            assert tune.poll() is None, tune.stdout.read()
            assert time.monotonic() < deadline, "no trial reported within 180 s"
            time.sleep(0.2)
        served.server.stop()  # a trial has reported: the search is under way
        output, _ = tune.communicate(timeout=180)
    finally:
        if tune.poll() is None:
            tune.kill()
            tune.wait()
    assert tune.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert served.server.uri in errors[0] and "gate passed" not in output

    served.server.start()  # back: the failed search registered nothing
    after = registry.client(served.server.uri).search_model_versions(f"name = '{served.name}'")
    assert sorted(v.version for v in after) == sorted(v.version for v in before)
