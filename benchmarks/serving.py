"""Serving benchmark: rayship against MLflow, BentoML and FastAPI on the same trained models.

Two models are trained once on ``sklearn:digits`` (64 features, 10 classes): a
HistGradientBoostingClassifier and the torch MLP of ``training.models`` (a few
epochs), each behind rayship's fitted preprocessing. They are then served by

- **rayship**: the ONNX graph (preprocessing inside), registered in MLflow with
  ``training.export``/``training.registry`` and a spec carrying a ``serve``
  section, served by the CLI from a scratch working directory
  (``rayship up --workers 0``, ``rayship serve NAME@production``, ``rayship down``),
  through Serve's native ingress (HAProxy → a replica's own HTTP server) that
  ``rayship up`` sets up by default; ``POST /v1/models/{name}:predict``;
- **rayship-proxy**: the same with ``RAY_SERVE_ENABLE_HA_PROXY=0`` in the environment
  of ``rayship up``/``serve``: Serve's Python proxy actor, the path before the native
  ingress, so the before/after is in one table;
- **mlflow**: ``mlflow models serve --env-manager local --workers <cores>`` on the
  native model (mlflow.sklearn for the estimator, mlflow.pyfunc for the MLP);
  ``POST /invocations``;
- **bentoml**: a BentoML 1.4 service (``workers="cpu_count"``) in its own venv
  (``benchmarks/.venv-bentoml``, made by ``make bench-serving``); ``POST /predict``;
- **fastapi**: a plain FastAPI app under ``uvicorn --workers <cores>``; ``POST /predict``;
- **uvicorn-onnx**: rayship's own request code on the same ONNX graph as a bare ASGI
  app under ``uvicorn --workers <cores>`` (``benchmarks/peers/uvicorn_onnx.py``): the
  reference for "rayship >= 0.5x a bare uvicorn app" (not a peer in the best-peer
  comparison);
- **ceiling**: onnxruntime called in this process, no HTTP.

Every HTTP server gets the same body, ``{"instances": [[64 floats], ...]}`` with 1
or 64 holdout rows, and must first answer the offline model's labels for both.
Load is closed loop from a separate process (``wrk``, else a Python asyncio
client: see ``benchmarks/serving_load.py``) at each concurrency, after a
warm-up at that concurrency. One server runs at a time. The peers run with
``OMP_NUM_THREADS=1`` (one worker process per core, each single-threaded: no
oversubscription of the 2 cores).

Then the time split of a rayship request on the native ingress, per model:

- wall time, one request at a time on one keep-alive connection: rayship through
  HAProxy and straight to a replica's own port (found from Serve's controller), no-op
  Serve deployments beside rayship's on its cluster (``benchmarks/peers/serve_probe.py``:
  a plain ``__call__``, and one through ``@serve.batch(64, 0)``) through HAProxy and
  straight to their replica, the replica's code in this process step by step, and the
  same code under a one-process uvicorn (with a trivial endpoint there for the HTTP
  stack alone);
- CPU milliseconds per request by process class (replicas, haproxy, the HAProxy
  manager actor, controller, raylet, GCS, dashboard, log monitor, ...) during a
  closed-loop run at each ``--cpu-concurrency``, from ``/proc/<pid>/stat`` (see
  ``serving_load.cpu_split``), with the same for an idle window (per second) and for
  the one-process uvicorn running rayship's code.

The probe applications take ``num_cpus=0`` and their own route prefixes, and are
deleted before rayship's cluster goes down.

    .venv/bin/python benchmarks/serving.py [--quick] [--models hgb,mlp]
        [--servers rayship,rayship-proxy,mlflow,bentoml,fastapi,uvicorn-onnx]
        [--out-dir benchmarks/results] [--rayship-replicas N] [--rayship-env KEY=VALUE ...]

``--rayship-env`` passes environment to ``rayship up``/``serve`` (and so to every
Ray process), e.g. one of Ray Serve's tuning switches, to try a setting before
building it into rayship (``rayship-proxy`` gets it too, with its own switch on top).

Writes ``serving.json``, ``serving.md`` and ``serving.png`` (``--quick``:
``serving-quick.*``) under ``--out-dir``; scratch state goes to
``benchmarks/results/tmp/serving`` (ignored by git).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import serving_load as load  # noqa: E402
from benchmarks import serving_report as report  # noqa: E402
from cluster.local import free_ports  # noqa: E402

SCRATCH = ROOT / "benchmarks" / "results" / "tmp" / "serving"
BENTO_VENV = ROOT / "benchmarks" / ".venv-bentoml"
BIN = Path(sys.executable).parent
CORES = os.cpu_count() or 1
PEERS = ("mlflow", "bentoml", "fastapi")
SERVERS = ("rayship", "rayship-proxy", *PEERS, "uvicorn-onnx")
PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # services.ingress: Serve's Python proxy
HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
MLP_LAYERS = [128, 64]

SERVER_NOTES = {
    "rayship": (
        "rayship serve NAME@production on `rayship up --workers 0` (one head node with "
        "all cores), Serve's native ingress as `rayship up` sets it (HAProxy in front of "
        "each replica's own HTTP server; cluster ingress recorded: {ingress}); spec "
        "serve section: min_replicas = max_replicas = {replicas} (fixed, like the "
        "peers' worker count; Serve's autoscaler waits 30 s before scaling up, longer "
        "than a cell), other serve keys as the spec gives them ({serve}){env}"
    ),
    "rayship-proxy": (
        "as rayship, with RAY_SERVE_ENABLE_HA_PROXY=0 in the environment of `rayship "
        "up`/`serve`: Serve's Python proxy actor in front of the replicas, the path "
        "before the native ingress (cluster ingress recorded: {ingress_proxy})"
    ),
    "uvicorn-onnx": (
        "uvicorn benchmarks.peers.uvicorn_onnx:app --workers {cores} --no-access-log: "
        "rayship's own request code (parse_v1, OnnxPredictor.feeds, run_many, respond, "
        "services.http.dumps) on the same ONNX graph as a bare ASGI app, one worker per "
        "core like the peers and no access log like rayship's replicas; the reference "
        "of the '>= 0.5x bare uvicorn' target, not counted as a peer"
    ),
    "mlflow": (
        "mlflow models serve --env-manager local --workers {cores}: MLflow runs uvicorn "
        "with that many worker processes (`mlflow models serve --help`: 'Number of "
        "uvicorn workers', default 1); one per core as uvicorn/FastAPI's deployment "
        "docs advise (fastapi.tiangolo.com/deployment/server-workers). Native model: "
        "mlflow.sklearn (Pipeline of the stock preprocessing and the estimator) or "
        "mlflow.pyfunc (preprocessing + torch MLP); tensor signature float32 [-1, 64]"
    ),
    "bentoml": (
        "bentoml serve, @bentoml.service(workers='cpu_count'): one worker process per "
        "core, BentoML's advice for CPU-bound Python models "
        "(docs.bentoml.com/en/latest/build-with-bentoml/parallelize-requests.html); "
        "other settings default (threads 1 per worker for a sync API); a sync "
        "@bentoml.api taking instances: list[list[float]]. BentoML {bento} in its own "
        "venv ({venv}) with torch 2.13.0 CPU and the project's scikit-learn"
    ),
    "fastapi": (
        "uvicorn benchmarks.peers.fastapi_app:app --workers {cores} (one per core, "
        "fastapi.tiangolo.com/deployment/server-workers); a sync `def` endpoint with a "
        "pydantic body model, as FastAPI's docs advise for blocking code"
    ),
    "ceiling": (
        "onnxruntime InferenceSession.run on prepared feeds in this process, rayship's "
        "session options (1 intra-op and 1 inter-op thread), one call at a time; "
        "no HTTP, no JSON"
    ),
}


# ------------------------------------------------------------------------ processes

_LIVE: list[subprocess.Popen] = []
_CLUSTERS: set[Path] = set()


def _cleanup() -> None:
    """Stop every server process this run started, and its rayship cluster."""
    for proc in list(_LIVE):
        _stop(proc)
    for cwd in list(_CLUSTERS):
        _rayship_down(cwd)


def _on_signal(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (its workers too), SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # uvicorn/circus workers may outlive their parent for a moment: sweep the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc in _LIVE:
        _LIVE.remove(proc)


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _LIVE.append(proc)
    return proc


def _free_port() -> int:
    return free_ports(1)[0]  # outside the kernel's ephemeral range (see there)


def _wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            resp = httpx.get(url, timeout=2)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    return env


def _peer_env(model: Model) -> dict[str, str]:
    env = _base_env()
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        RAYSHIP_BENCH_NATIVE=str(model.native_dir),
        BENTOML_HOME=str(SCRATCH / "bentoml-home"),
        BENTOML_DO_NOT_TRACK="true",
    )
    return env


RAYSHIP_SERVE: dict[str, float] = {}  # --rayship-batch-wait S: the spec's batch_wait_timeout_s
RAYSHIP_ENV: dict[str, str] = {}  # --rayship-env KEY=VALUE: e.g. Ray Serve's tuning switches


def _rayship(
    args: list[str], cwd: Path, timeout: float = 400, env: dict[str, str] | None = None
) -> str:
    out = subprocess.run(
        [str(BIN / "rayship"), *args],
        cwd=cwd,
        env={**_base_env(), **RAYSHIP_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"rayship {' '.join(args)}: {(out.stdout + out.stderr)[-800:]}")
    return out.stdout


def _rayship_down(cwd: Path) -> None:
    with contextlib.suppress(Exception):
        _rayship(["down"], cwd, timeout=120)
    _CLUSTERS.discard(cwd)


# ---------------------------------------------------------------------------- models


@dataclass
class Model:
    key: str  # hgb | mlp
    name: str  # registered name and route
    family: str
    onnx_bytes: bytes
    schema: dict[str, Any]
    native_dir: Path
    mlflow_dir: Path
    rows: np.ndarray  # the 64 payload rows (float32, schema order)
    labels: list[int]  # the offline (ONNX) model's labels for them
    holdout_accuracy: float
    parity_max_diff: float
    native_mismatches: int  # holdout rows where the native peers' model disagrees with ONNX
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, n: int) -> bytes:
        return json.dumps({"instances": self.rows[:n].astype(float).tolist()}).encode()


def _spec(name: str, family: dict, replicas: int):
    from training.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "task": "classification",
            "data": {"source": "sklearn:digits", "target": "target"},
            "metric": "accuracy",
            "models": [family],
            "serve": {"min_replicas": replicas, "max_replicas": replicas, **RAYSHIP_SERVE},
        }
    )


def _train_mlp(X: np.ndarray, y: np.ndarray, n_classes: int, epochs: int, seed: int):
    import torch

    from training.models import build_mlp

    torch.manual_seed(seed)
    net = build_mlp(X.shape[1], n_classes, MLP_LAYERS, 0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y).long()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(Xt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def _stock_preprocessing(pre, schema):
    """rayship's fitted numeric pipeline as stock scikit-learn over a float array.

    IQRClipper (rayship's) becomes ``FunctionTransformer(np.clip)`` with its bounds;
    feature names are dropped so a plain array is accepted without warnings.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from training.preprocess import IQRClipper

    if schema.categorical or list(pre.columns.feature_names_in_) != schema.names:
        raise RuntimeError("the benchmark's native preprocessing handles numeric features only")
    numeric = pre.columns.named_transformers_["numeric"]
    steps = []
    for name, step in numeric.steps:
        if isinstance(step, IQRClipper):
            step = FunctionTransformer(
                np.clip, kw_args={"a_min": step.lower_, "a_max": step.upper_}
            )
        else:
            step = copy.deepcopy(step)
            with contextlib.suppress(AttributeError):
                del step.feature_names_in_
        steps.append((name, step))
    return Pipeline(steps)


def build_models(
    keys: list[str], scratch: Path, replicas: int, mlp_epochs: int, log
) -> list[Model]:
    """Train, export, check, register (rayship) and save natively (peers) each model."""
    import joblib
    import mlflow.pyfunc
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from benchmarks.peers.mlflow_model import NativePyfunc
    from benchmarks.peers.native import NativeModel
    from training import export, registry
    from training.data import profile
    from training.models import make_estimator
    from training.pipeline import prepare
    from training.spec import spec_to_yaml

    uri = f"sqlite:///{scratch / '.rayship' / 'mlflow.db'}"
    (scratch / ".rayship").mkdir(parents=True, exist_ok=True)
    models = []
    for key in keys:
        t0 = time.monotonic()
        name = f"digits-{key}"
        family = (
            {"type": "sklearn", "estimator": HGB, "space": {}}
            if key == "hgb"
            else {"type": "torch_mlp", "space": {"hidden_layers": MLP_LAYERS, "epochs": mlp_epochs}}
        )
        spec = _spec(name, family, replicas)
        prep = prepare(spec)
        splits, schema, pre = prep.splits, prep.splits.schema, prep.pre
        X, y = prep.arrays["X_train"], prep.arrays["y_train"]
        classes = list(schema.classes)
        if classes != list(range(len(classes))):
            raise RuntimeError(f"expected digit classes 0..9, got {classes}")
        if key == "hgb":
            est = make_estimator(HGB, {}, spec.data.seed).fit(X, y)
            graph = export.sklearn_model_graph(est, X.shape[1], schema.task)
            native = est
        else:
            est = _train_mlp(X, y, len(classes), mlp_epochs, spec.data.seed)
            graph = export.torch_model_graph(est, X.shape[1], schema.task)
            native = export.torch_predictor(est, schema.task, classes, 0.0, 1.0)
        onnx_bytes = export.assemble(pre, graph, schema)
        native_pred, native_proba = export.native_outputs(
            pre, native, schema.task, classes, splits.X_test
        )
        parity = export.check_parity(
            pre, onnx_bytes, splits.X_test, schema, native_pred, native_proba
        )
        if not parity.ok:
            raise RuntimeError(f"{name}: ONNX parity failed: {parity}")
        onnx_pred, _ = export.run_onnx(onnx_bytes, splits.X_test, schema)
        accuracy = float(np.mean(onnx_pred == splits.y_test.to_numpy()))

        # rayship: the registered version, as training.pipeline registers a winner.
        sha = registry.sha256(onnx_bytes)
        tags = {"onnx_sha256": sha, "metric": "accuracy", "holdout_score": f"{accuracy:.6f}"}
        run_id, source = registry.log_winner(
            uri,
            name,
            onnx_bytes=onnx_bytes,
            files={
                "schema.json": schema.to_dict(),
                "spec.yaml": spec_to_yaml(spec),
                "metrics.json": {"holdout_accuracy": accuracy, "parity": parity.__dict__},
                "profile.json": profile(splits.X_train, schema),
                "lineage.json": {"data_source": spec.data.source, "benchmark": "serving"},
            },
            params={"family": key},
            metrics={"holdout_accuracy": accuracy},
            tags={**tags, "family": key, "gate": "passed"},
        )
        version = registry.register_version(uri, name, source, run_id, {**tags, "family": key})
        registry.set_alias(uri, name, registry.PRODUCTION, version)

        # Peers: the native model behind the same (stock scikit-learn) preprocessing.
        native_dir = scratch / "native" / key
        native_dir.mkdir(parents=True, exist_ok=True)
        stock = _stock_preprocessing(pre, schema)
        joblib.dump(stock, native_dir / "preprocess.joblib")
        meta = {"kind": "sklearn" if key == "hgb" else "torch", "classes": classes}
        if key == "hgb":
            joblib.dump(est, native_dir / "model.joblib")
        else:
            import torch

            torch.save(est.state_dict(), native_dir / "mlp.pt")
            meta.update(n_features=X.shape[1], hidden_layers=MLP_LAYERS)
        (native_dir / "native.json").write_text(json.dumps(meta))
        peer_model = NativeModel.load(native_dir)
        X_test = splits.X_test[schema.names].to_numpy(dtype=np.float32)
        peer_labels = peer_model.predict(X_test)
        mismatches = int(np.sum(peer_labels != onnx_pred.astype(peer_labels.dtype)))

        mlflow_dir = scratch / "mlflow-models" / key
        shutil.rmtree(mlflow_dir, ignore_errors=True)
        signature = infer_signature(X_test[:5], peer_labels[:5])
        if key == "hgb":
            to32 = FunctionTransformer(np.asarray, kw_args={"dtype": np.float32})
            pipeline = Pipeline([*stock.steps, ("float32", to32), ("model", est)])
            mlflow.sklearn.save_model(
                pipeline,
                str(mlflow_dir),
                signature=signature,
                pip_requirements=[f"scikit-learn=={_version('scikit-learn')}"],
                # MLflow 3 stores scikit-learn models with skops, which asks for the
                # non-stock types by name: ours (np.clip, the float32 cast) and HGB's trees.
                skops_trusted_types=[
                    "numpy.asarray",
                    "numpy.clip",
                    "numpy.dtype",
                    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
                ],
            )
        else:
            mlflow.pyfunc.save_model(
                str(mlflow_dir),
                python_model=NativePyfunc(),
                artifacts={"native": str(native_dir)},
                signature=signature,
                pip_requirements=[f"torch=={_version('torch')}"],
            )
        rows = X_test[:64]
        models.append(
            Model(
                key=key,
                name=name,
                family=HGB if key == "hgb" else f"torch MLP {MLP_LAYERS}, {mlp_epochs} epochs",
                onnx_bytes=onnx_bytes,
                schema=schema.to_dict(),
                native_dir=native_dir,
                mlflow_dir=mlflow_dir,
                rows=rows,
                labels=[int(v) for v in onnx_pred[:64]],
                holdout_accuracy=accuracy,
                parity_max_diff=parity.max_abs_diff,
                native_mismatches=mismatches,
                extra={"version": version, "holdout_rows": len(X_test)},
            )
        )
        log(
            f"{name}: holdout accuracy {accuracy:.4f}, parity {parity.max_abs_diff:.1e}, "
            f"native/ONNX label mismatches {mismatches}/{len(X_test)} "
            f"({time.monotonic() - t0:.1f} s)"
        )
    return models


# --------------------------------------------------------------------------- servers


class Server:
    """One server under test: ``start`` returns the predict URL; ``stop`` ends it all."""

    name = ""
    health = ""

    def __init__(self, model: Model, port: int, logs: Path):
        self.model, self.port, self.logs = model, port, logs
        self.proc: subprocess.Popen | None = None

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        self.proc = _spawn(
            self.command(), self.env(), self.logs / f"{self.name}-{self.model.key}.log"
        )
        _wait_http(self.base() + self.health, self.proc)
        return self.base() + self.path()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def env(self) -> dict[str, str]:
        return _peer_env(self.model)

    def command(self) -> list[str]:
        raise NotImplementedError

    def path(self) -> str:
        return "/predict"

    def labels(self, reply: dict) -> list[int]:
        return [int(v) for v in reply["predictions"]]


class Rayship(Server):
    """rayship's CLI on a scratch working directory: ``up``, ``serve``; ``down`` to stop."""

    name = "rayship"
    env_extra: dict[str, str] = {}

    def start(self) -> str:
        cwd = SCRATCH
        _CLUSTERS.add(cwd)
        _rayship(["up", "--workers", "0"], cwd, env=self.env_extra)
        _rayship(
            ["serve", f"{self.model.name}@production", "--port", str(self.port)],
            cwd,
            env=self.env_extra,
        )
        return self.base() + f"/v1/models/{self.model.name}:predict"

    def cluster(self) -> dict[str, Any]:
        """What ``rayship up`` recorded (``.rayship/cluster.json``): sessions, ingress."""
        return json.loads((SCRATCH / ".rayship" / "cluster.json").read_text())

    def stop(self) -> None:
        _rayship_down(SCRATCH)


class RayshipProxy(Rayship):
    """rayship on Serve's Python proxy (``RAY_SERVE_ENABLE_HA_PROXY=0``): the old path."""

    name = "rayship-proxy"
    env_extra = PROXY_ENV


class MLflow(Server):
    name = "mlflow"
    health = "/ping"

    def command(self) -> list[str]:
        return [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            str(self.model.mlflow_dir),
            "--env-manager",
            "local",
            "--workers",
            str(CORES),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def path(self) -> str:
        return "/invocations"


class BentoML(Server):
    name = "bentoml"
    health = "/readyz"

    def command(self) -> list[str]:
        return [
            str(BENTO_VENV / "bin" / "bentoml"),
            "serve",
            "benchmarks.peers.bento_service:DigitsPeer",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PATH"] = f"{BENTO_VENV / 'bin'}:{env['PATH']}"
        return env


class FastAPIPeer(Server):
    name = "fastapi"
    health = "/health"

    def command(self) -> list[str]:
        return [
            str(BIN / "uvicorn"),
            "benchmarks.peers.fastapi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(CORES),
        ]


class UvicornOnnx(Server):
    """rayship's request code as a bare ASGI app under uvicorn (``peers/uvicorn_onnx.py``):
    one worker per core as the ``uvicorn-onnx`` server, one worker for the time split."""

    name = "uvicorn-onnx"
    health = "/health"
    workers = CORES

    def env(self) -> dict[str, str]:
        folder = SCRATCH / "uvicorn-onnx"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.model.key}.onnx").write_bytes(self.model.onnx_bytes)
        (folder / f"{self.model.key}.schema.json").write_text(json.dumps(self.model.schema))
        env = _peer_env(self.model)
        env.update(
            RAYSHIP_BENCH_ONNX=str(folder / f"{self.model.key}.onnx"),
            RAYSHIP_BENCH_SCHEMA=str(folder / f"{self.model.key}.schema.json"),
            RAYSHIP_BENCH_ROUTE=self.model.name,
        )
        return env

    def command(self) -> list[str]:
        return [
            str(BIN / "uvicorn"),
            "benchmarks.peers.uvicorn_onnx:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--no-access-log",
            "--lifespan",
            "off",
        ]

    def path(self) -> str:
        return f"/v1/models/{self.model.name}:predict"


class UvicornProbe(UvicornOnnx):
    """The same app in one uvicorn process (the time split's "same code under uvicorn")."""

    name = "uvicorn-probe"
    workers = 1


SERVER_CLASSES = {
    "rayship": Rayship,
    "rayship-proxy": RayshipProxy,
    "mlflow": MLflow,
    "bentoml": BentoML,
    "fastapi": FastAPIPeer,
    "uvicorn-onnx": UvicornOnnx,
}


def check_answers(url: str, server: Server, model: Model) -> dict[str, Any]:
    """Both payloads must get the offline model's labels; returns the 1-row reply."""
    replies = {}
    for n in (1, 64):
        resp = httpx.post(
            url,
            content=model.body(n),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        resp.raise_for_status()
        got = server.labels(resp.json())
        if got != model.labels[:n]:
            raise RuntimeError(f"{server.name} answered {got[:8]}..., expected {model.labels[:8]}")
        replies[n] = resp.json()
    return replies[1]


# ---------------------------------------------------------------------------- measure


def ceiling(model: Model, rows_list: list[int], duration: float) -> list[dict[str, Any]]:
    """onnxruntime in this process, rayship's session options, one call at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.onnx_bytes, options, providers=["CPUExecutionProvider"])
    names = [f["name"] for f in model.schema["features"]]
    cells = []
    for n in rows_list:
        feeds = {c: model.rows[:n, i : i + 1].copy() for i, c in enumerate(names)}
        for _ in range(200):
            sess.run(None, feeds)
        times = []
        t_end = time.perf_counter() + duration
        start = time.perf_counter()
        while (t0 := time.perf_counter()) < t_end:
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        times.sort()
        cells.append(
            {
                "server": "ceiling",
                "model": model.key,
                "rows": n,
                "concurrency": 1,
                "requests": len(times),
                "duration_s": round(elapsed, 3),
                "rps": len(times) / elapsed,
                "rows_per_s": n * len(times) / elapsed,
                "p50_ms": times[len(times) // 2] * 1000,
                "p99_ms": times[int(0.99 * (len(times) - 1))] * 1000,
                "mean_ms": statistics.fmean(times) * 1000,
                "errors": 0,
            }
        )
    return cells


def replica_steps(model: Model, n: int, iterations: int) -> dict[str, float]:
    """Median ms of each step a rayship replica runs for one request, in this process."""
    from services.predictor import OnnxPredictor

    try:
        from services.v1 import parse_v1
    except ImportError:  # before the V1 module was split out
        from services.app import parse_v1
    try:
        from services.http import dumps
    except ImportError:  # before the endpoint's orjson codec

        def dumps(value) -> bytes:
            return json.dumps(value, separators=(",", ":")).encode()

    predictor = OnnxPredictor(model.onnx_bytes, model.schema, model.name, "1")
    body = model.body(n)
    steps: dict[str, list[float]] = {"parse_v1": [], "feeds": [], "run_many": [], "respond": []}
    for i in range(iterations + 20):
        t0 = time.perf_counter()
        instances, want = parse_v1(body)
        t1 = time.perf_counter()
        predictor.check_options(want)
        feeds = predictor.feeds(instances)
        t2 = time.perf_counter()
        ((prediction, probabilities),) = predictor.run_many([feeds])
        t3 = time.perf_counter()
        dumps(predictor.respond(prediction, probabilities, want))
        t4 = time.perf_counter()
        if i >= 20:
            for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                steps[key].append(dt * 1000)
    out = {k: statistics.median(v) for k, v in steps.items()}
    out["total"] = sum(out.values())
    return out


def measure_server(
    server: Server, model: Model, cfg: argparse.Namespace, log
) -> tuple[list[dict], dict]:
    """Start, check, warm and measure one server over every cell; always stopped after."""
    cells: list[dict] = []
    info: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        url = server.start()
        info["start_s"] = round(time.monotonic() - t0, 1)
        if isinstance(server, Rayship):
            info["ingress"] = server.cluster().get("ingress")
        info["sample_reply"] = check_answers(url, server, model)
        log(
            f"  {server.name}: up in {info['start_s']} s, answers match the offline model"
            + (f" (ingress: {info['ingress']})" if "ingress" in info else "")
        )
        for n in cfg.rows:
            body = model.body(n)
            for c in cfg.concurrency:
                load.closed_loop(url, body, c, cfg.warmup)
                loadavg = os.getloadavg()[0]  # the machine is shared: say how busy it was
                cell = load.closed_loop(url, body, c, cfg.duration)
                cell["loadavg_1m"] = round(loadavg, 2)
                cell.update(server=server.name, model=model.key, rows=n, concurrency=c)
                cell["rows_per_s"] = cell["rps"] * n
                cells.append(cell)
                log(
                    f"    rows={n:>2} c={c:>2}: {cell['rps']:8.1f} req/s  "
                    f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  "
                    f"errors {cell['errors']}"
                )
        if server.name == "rayship" and cfg.time_split:
            info["time_split"] = serve_probes(server, url, model, cfg, log)
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  {server.name}: FAILED: {info['error']}")
    finally:
        server.stop()
    return cells, info


def _serve_probe(action: str, base: str) -> dict[str, list[list]]:
    """Run ``peers/serve_probe.py ACTION`` on rayship's cluster; its TARGETS line, if any."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers" / "serve_probe.py"), action, base],
        cwd=SCRATCH,
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"serve_probe.py {action}: {(out.stdout + out.stderr)[-800:]}")
    for line in out.stdout.splitlines():
        if line.startswith("TARGETS "):
            return json.loads(line.removeprefix("TARGETS "))
    return {}


def _direct(targets: dict[str, list[list]], app: str) -> str:
    """The base URL of the first replica of ``app``'s own HTTP server."""
    found = targets.get(app) or []
    if not found:
        raise RuntimeError(f"Serve's controller lists no replica port for {app!r}: {targets}")
    host, port = found[0]
    return f"http://{host}:{port}"


def _cpu_runs(
    url: str,
    model: Model,
    cfg: argparse.Namespace,
    sids: list[int],
    label: str,
    rows: list[int],
    log,
) -> list[dict[str, Any]]:
    """CPU time by process class during a closed loop at each ``cfg.cpu_concurrency``."""
    runs = []
    for n in rows:
        body = model.body(n)
        for c in cfg.cpu_concurrency:
            load.closed_loop(url, body, c, 1)  # warm-up at this concurrency, not counted
            run = load.cpu_split(lambda b=body, c=c: load.closed_loop(url, b, c, cfg.cpu_s), sids)
            run.update(target=label, rows=n, concurrency=c)
            runs.append(run)
            total = sum(run["cpu_ms"].values())
            log(
                f"    cpu {label} rows={n} c={c}: {run['rps']:.0f} req/s, "
                f"{total / max(run['requests'], 1):.2f} ms CPU a request in processes, "
                f"{run['machine_busy_ms'] / max(run['requests'], 1):.2f} machine-wide"
            )
    return runs


def serve_probes(
    server: Rayship, url: str, model: Model, cfg: argparse.Namespace, log
) -> dict[str, Any]:
    """The native-ingress time split on rayship's running cluster; see the module docstring."""
    out: dict[str, Any] = {}
    base = server.base()
    sids = [int(s) for s in server.cluster().get("session_ids", [])]
    time.sleep(3)  # let the replicas settle after the load
    try:
        targets = _serve_probe("targets", base)
        out["rayship_targets"] = targets.get("rayship")
        direct = _direct(targets, "rayship") + f"/v1/models/{model.name}:predict"
        for n in cfg.rows:
            body = model.body(n)
            out[f"rayship_haproxy_{n}"] = load.sequential(url, body, cfg.probe_n)
            out[f"rayship_direct_{n}"] = load.sequential(direct, body, cfg.probe_n)
        out["rayship_metadata"] = load.sequential(
            f"{base}/v1/models/{model.name}", None, cfg.probe_n
        )
        idle = load.cpu_split(lambda: (time.sleep(cfg.cpu_s), {"requests": 0})[1], sids)
        out["cpu"] = [{**idle, "target": "idle", "rows": None, "concurrency": 0}]
        out["cpu"] += _cpu_runs(url, model, cfg, sids, "rayship", cfg.rows, log)
    except Exception as exc:
        out["rayship_probe_error"] = f"{type(exc).__name__}: {exc}"
        log(f"  rayship time split failed: {out['rayship_probe_error'][-400:]}")
        return out
    try:
        t0 = time.monotonic()
        targets = _serve_probe("deploy", base)
        out["probe_deploy_s"] = round(time.monotonic() - t0, 1)
        time.sleep(3)  # replicas just started: let their start-up work finish first
        for app, key in (("probe-noop", "serve_noop"), ("probe-batched", "serve_batched")):
            direct = _direct(targets, app) + f"/{app}"
            for n in cfg.rows:
                body = model.body(n)
                out[f"{key}_haproxy_{n}"] = load.sequential(f"{base}/{app}", body, cfg.probe_n)
                out[f"{key}_direct_{n}"] = load.sequential(direct, body, cfg.probe_n)
        out["cpu"] += _cpu_runs(f"{base}/probe-noop", model, cfg, sids, "serve-noop", [1], log)
    except Exception as exc:
        out["serve_probe_error"] = f"{type(exc).__name__}: {exc}"
        log(f"  serve probes failed: {out['serve_probe_error'][-400:]}")
    finally:
        t0 = time.monotonic()
        try:
            _serve_probe("delete", base)
            out["probe_delete_s"] = round(time.monotonic() - t0, 1)
        except Exception as exc:
            out["serve_probe_delete_error"] = f"{type(exc).__name__}: {exc}"
    log(
        f"  rayship time split done (probes: deployed in {out.get('probe_deploy_s')} s, "
        f"deleted in {out.get('probe_delete_s')} s)"
    )
    return out


def uvicorn_probes(model: Model, cfg: argparse.Namespace, log) -> dict[str, Any]:
    """rayship's code and a trivial endpoint under one uvicorn process: wall and CPU time."""
    server = UvicornProbe(model, _free_port(), SCRATCH / "logs")
    out: dict[str, Any] = {}
    try:
        url = server.start()
        for n in cfg.rows:
            body = model.body(n)
            out[f"uvicorn_trivial_{n}"] = load.sequential(
                server.base() + "/trivial", body, cfg.probe_n
            )
            out[f"uvicorn_code_{n}"] = load.sequential(url, body, cfg.probe_n)
        out["cpu"] = _cpu_runs(url, model, cfg, [], "uvicorn", cfg.rows, log)
    except Exception as exc:
        out["uvicorn_probe_error"] = f"{type(exc).__name__}: {exc}"
        log(f"  uvicorn probes failed: {out['uvicorn_probe_error']}")
    finally:
        server.stop()
    return out


# ---------------------------------------------------------------------------- machine


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def bento_version() -> str | None:
    py = BENTO_VENV / "bin" / "python"
    if not py.exists():
        return None
    out = subprocess.run(
        [str(py), "-c", "import bentoml; print(bentoml.__version__)"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or None


def machine_facts() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    dists = ["ray", "mlflow", "fastapi", "uvicorn", "onnxruntime", "torch", "scikit-learn", "numpy"]
    return {
        "cores": CORES,
        "cpu": cpu,
        "memory": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {**{d: _version(d) for d in dists}, "bentoml": bento_version()},
        "load_generator": load.loadgen_name(),
        "wrk": load.wrk_version(),
    }


# ------------------------------------------------------------------------------- main


def server_notes(cfg: argparse.Namespace, servers: dict[str, dict]) -> dict[str, str]:
    """How each server of this run was configured (SERVER_NOTES, filled in)."""
    from training.spec import ServeSpec

    serve = ServeSpec(**RAYSHIP_SERVE).model_dump()
    serve = {k: v for k, v in serve.items() if k not in ("min_replicas", "max_replicas")}

    def ingress(name: str) -> str:
        seen = {info.get("ingress") for info in servers.get(name, {}).values()}
        return ", ".join(sorted(str(s) for s in seen if s)) or "unknown"

    fields = {
        "replicas": cfg.rayship_replicas,
        "cores": CORES,
        "bento": bento_version(),
        "venv": "benchmarks/.venv-bentoml",
        "serve": ", ".join(f"{k} {v}" for k, v in serve.items()),
        "env": f"; --rayship-env {RAYSHIP_ENV}" if RAYSHIP_ENV else "",
        "ingress": ingress("rayship"),
        "ingress_proxy": ingress("rayship-proxy"),
    }
    return {
        k: v.format(**fields) for k, v in SERVER_NOTES.items() if k in cfg.servers or k == "ceiling"
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (1 s warm-up, 2 s cells)"
    )
    parser.add_argument("--models", default="hgb,mlp", help="comma list of hgb, mlp")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma list of servers")
    parser.add_argument("--concurrency", default="1,8,32", help="comma list of concurrent users")
    parser.add_argument("--rows", default="1,64", help="comma list of rows per request")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (3)")
    parser.add_argument("--rayship-replicas", type=int, default=CORES, help="fixed replica count")
    parser.add_argument(
        "--rayship-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for rayship up/serve (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)",
    )
    parser.add_argument(
        "--rayship-batch-wait",
        type=float,
        default=None,
        metavar="S",
        help="the rayship spec's serve.batch_wait_timeout_s (default: the spec's default)",
    )
    parser.add_argument(
        "--cpu-concurrency",
        default="1,16",
        help="comma list of concurrencies of the time split's CPU accounting",
    )
    parser.add_argument(
        "--cpu-seconds", type=float, default=None, help="seconds per CPU-accounting run (5)"
    )
    parser.add_argument(
        "--no-time-split", dest="time_split", action="store_false", help="skip the time split"
    )
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.servers = [s for s in args.servers.split(",") if s]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.rows = [int(r) for r in args.rows.split(",")]
    args.cpu_concurrency = [int(c) for c in args.cpu_concurrency.split(",")]
    unknown = [m for m in args.models if m not in ("hgb", "mlp")] + [
        s for s in args.servers if s not in SERVERS
    ]
    if unknown:
        parser.error(f"unknown model/server {unknown}")
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    if args.cpu_seconds is None:
        args.cpu_seconds = 2.0 if args.quick else 5.0
    args.cpu_s = args.cpu_seconds
    args.probe_n = 100 if args.quick else 400
    return args


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    RAYSHIP_ENV.update(kv.split("=", 1) for kv in cfg.rayship_env)
    if cfg.rayship_batch_wait is not None:
        RAYSHIP_SERVE["batch_wait_timeout_s"] = cfg.rayship_batch_wait
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    if "bentoml" in cfg.servers and not (BENTO_VENV / "bin" / "bentoml").exists():
        sys.exit(f"no BentoML venv at {BENTO_VENV}: run `make bench-serving` (it makes one)")
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    log(f"load generator: {load.loadgen_name()}; cells of {cfg.duration} s after {cfg.warmup} s")
    models = build_models(cfg.models, SCRATCH, cfg.rayship_replicas, cfg.mlp_epochs, log)

    cells: list[dict] = []
    servers: dict[str, dict] = {}
    splits: dict[str, dict] = {}
    for model in models:
        log(f"{model.name}: ceiling (onnxruntime in-process)")
        cells += ceiling(model, cfg.rows, cfg.duration)
        split: dict[str, Any] = {
            f"replica_steps_{n}": replica_steps(model, n, cfg.probe_n) for n in cfg.rows
        }
        for name in cfg.servers:
            log(f"{model.name}: {name}")
            server = SERVER_CLASSES[name](model, _free_port(), SCRATCH / "logs")
            got, info = measure_server(server, model, cfg, log)
            cells += got
            split.update(info.pop("time_split", {}))
            servers.setdefault(name, {})[model.key] = info
        if "rayship" in cfg.servers and cfg.time_split:
            log(f"{model.name}: rayship's code under one uvicorn process (time split)")
            got = uvicorn_probes(model, cfg, log)
            split["cpu"] = split.get("cpu", []) + got.pop("cpu", [])
            split.update(got)
        splits[model.key] = split

    result = {
        "benchmark": "serving",
        "quick": cfg.quick,
        "machine": {**machine_facts(), "loadavg_at_end": os.getloadavg()},
        "config": {
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "concurrency": cfg.concurrency,
            "rows": cfg.rows,
            "rayship_replicas": cfg.rayship_replicas,
            "rayship_env": RAYSHIP_ENV,
            "rayship_serve": RAYSHIP_SERVE,
            "probe_requests": cfg.probe_n,
            "cpu_concurrency": cfg.cpu_concurrency,
            "cpu_seconds": cfg.cpu_s,
            "peer_env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        },
        "server_notes": server_notes(cfg, servers),
        "models": {
            m.key: {
                "name": m.name,
                "family": m.family,
                "holdout_accuracy": round(m.holdout_accuracy, 4),
                "onnx_parity_max_diff": m.parity_max_diff,
                "native_vs_onnx_label_mismatches": m.native_mismatches,
                "holdout_rows": m.extra["holdout_rows"],
                "payload_labels": m.labels,
            }
            for m in models
        },
        "servers": servers,
        "cells": cells,
        "time_split": splits,
        "wall_s": round(time.monotonic() - started, 1),
    }
    result["comparison"] = report.compare(cells)
    stem = "serving-quick" if cfg.quick else "serving"
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (cfg.out_dir / f"{stem}.md").write_text(report.markdown(result, f"{stem}.png"))
    report.plot(result, cfg.out_dir / f"{stem}.png")
    log(f"wrote {cfg.out_dir}/{stem}.json, .md, .png")


if __name__ == "__main__":
    main()
