"""Shared helpers of the search benchmarks (tuning.py, overhead.py, scaling.py).

- :func:`run_measured` runs one tool in a fresh process and returns its wall time and
  the CPU seconds of every process it started. The benchmark process becomes a Linux
  *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``), so processes that outlive
  their parent (Ray's workers, loky's, a daemonised helper) are re-parented to it
  rather than to init; it reaps them all, and ``getrusage(RUSAGE_CHILDREN)`` then
  holds the CPU time of the whole tree exactly: no sampling, nothing missed. psutil
  would not do better (it samples /proc too) and is not a dependency.
- :class:`TreeSampler` samples /proc for CPU seconds by process role (driver, GCS,
  raylet, workers, ...) while Ray runs inside this process (overhead.py, scaling.py).
- :func:`generated_table` writes the deterministic 200,000 x 40 classification table
  (``sklearn.datasets.make_classification``, fixed seed) as Parquet; nothing is
  downloaded.
- :func:`machine` describes the machine and the package versions for the JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PACKAGES = (
    "ray",
    "torch",
    "scikit-learn",
    "optuna",
    "numpy",
    "pandas",
    "mlflow",
    "pyarrow",
)
_PR_SET_CHILD_SUBREAPER = 36


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def out_dir(arg: str | None, quick: bool) -> Path:
    """The folder for a script's JSON: ``--out-dir``, else benchmarks/results (full mode)
    or benchmarks/results/quick (quick mode), so a quick run never overwrites full results."""
    path = Path(arg) if arg else (RESULTS / "quick" if quick else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict[str, Any]:
    """Machine facts and package versions, as every result JSON records them."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = pkg_version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "cores": cores(),
        "cpu": model,
        "memory_gib": round(mem_kib / 1024**2, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes and CPU time ------------------------------------------------------------


def become_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it (Linux only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _reap_orphans(grace_s: float, keep: frozenset[int] = frozenset()) -> int:
    """Wait for (then end) the processes re-parented to this subreaper, but those in
    ``keep``; returns how many had to be signalled. Only this process's own descendants
    can be its children."""
    deadline = time.monotonic() + grace_s
    signalled = 0
    sent: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return signalled
        if pid:
            continue
        left = [c for c in _children_of(os.getpid()) if c not in keep]
        if not left:
            return signalled
        if time.monotonic() > deadline:
            for child in left:
                sig = signal.SIGKILL if child in sent else signal.SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, sig)
                signalled += child not in sent
                sent.add(child)
            deadline = time.monotonic() + 3.0
        time.sleep(0.05)


@dataclass
class Measured:
    """One tool run: wall and CPU of its whole process tree, its exit code and output."""

    command: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # CPU seconds of the process and the descendants reaped by it or us
    machine_cpu_s: float  # busy CPU seconds of the whole machine (/proc/stat) meanwhile
    started: float  # time.monotonic() at spawn (CLOCK_MONOTONIC: the same in every process)
    stragglers: int  # descendants still running after the tool exited, ended by us
    log_path: str

    def utilisation(self, n_cores: int) -> float:
        """Busy CPU seconds of the machine / (wall x cores): 1.0 means every core was busy
        the whole time. Machine-wide, not the tree's rusage: Ray's worker processes are
        not all reaped through the tool's tree (a 200,000-row search whose two trials
        ran flat out showed 0.17 by rusage), and the runs hold the machine alone."""
        return self.machine_cpu_s / (self.wall_s * n_cores) if self.wall_s > 0 else 0.0


def machine_busy_s() -> float:
    """Busy CPU seconds of the machine since boot (``/proc/stat``: all but idle, iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def run_measured(
    command: list[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 1800,
    keep: frozenset[int] = frozenset(),
) -> Measured:
    """Run ``command`` (output to ``log_path``); wall from spawn to its exit, CPU of its tree.

    Descendants still alive when it exits get 5 s to finish (Ray's processes shut
    down after the driver), then SIGTERM/SIGKILL by pid; their CPU counts too.
    """
    become_subreaper()
    _reap_orphans(0.0, keep)  # leftovers of an earlier run must not count here
    cpu0, busy0 = _children_cpu_s(), machine_busy_s()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        wall = time.monotonic() - started
        busy = machine_busy_s() - busy0
    stragglers = _reap_orphans(5.0, keep)
    return Measured(
        command=command,
        returncode=rc,
        wall_s=wall,
        cpu_s=_children_cpu_s() - cpu0,
        machine_cpu_s=busy,
        started=started,
        stragglers=stragglers,
        log_path=str(log_path),
    )


def orphans() -> frozenset[int]:
    """The processes now re-parented to this subreaper (daemons a command left running)."""
    become_subreaper()
    return frozenset(_children_of(os.getpid()))


def end_orphans(grace_s: float = 10.0) -> None:
    """Wait for the re-parented processes to exit (after e.g. ``ray stop``), then end them."""
    _reap_orphans(grace_s)


def tail(path: str | Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a tool process, without a Ray address to attach to (each run
    starts its own Ray) and with the project importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def role(pid: int, main_pid: int) -> str:
    """What a process of a Ray run is, from its command line."""
    if pid == main_pid:
        return "driver"
    try:
        cmd = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return "other"
    for needle, name in (
        ("gcs_server", "gcs"),
        ("raylet", "raylet"),
        ("dashboard", "dashboard"),
        ("log_monitor", "log_monitor"),
        ("monitor.py", "monitor"),
        ("runtime_env", "runtime_env_agent"),
        ("ray::", "ray_workers"),
        ("default_worker.py", "ray_workers"),
    ):
        if needle in cmd:
            return name
    return "other"


@dataclass
class TreeSampler:
    """CPU seconds by role of this process and its descendants, sampled from /proc.

    A process that ends between two samples loses at most one interval of its CPU
    (trial actors live for a whole search, so this is small); the figures are deltas
    between :meth:`start` and :meth:`stop`.
    """

    interval_s: float = 0.25
    _first: dict[int, float] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)
    _roles: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _tree(self) -> dict[int, float]:
        me = os.getpid()
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = _stat(int(entry))
            if fields is None:
                continue
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out = {}
        for pid in cpu:
            p, hops = pid, 0
            while p not in (0, 1) and p != me and hops < 64:
                p, hops = parents.get(p, 0), hops + 1
            if p == me:
                out[pid] = cpu[pid]
        return out

    def _sample(self) -> None:
        for pid, value in self._tree().items():
            if pid not in self._roles:
                self._roles[pid] = role(pid, os.getpid())
                self._first.setdefault(pid, 0.0 if self._thread else value)
            self._last[pid] = value

    def start(self) -> TreeSampler:
        self._first, self._last, self._roles = {}, {}, {}
        self._stop.clear()
        self._thread = None
        self._sample()  # processes alive now: count from their current CPU time
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError, ValueError):
                self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds by role since :meth:`start`."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        with contextlib.suppress(OSError, ValueError):
            self._sample()
        by_role: dict[str, float] = {}
        for pid, last in self._last.items():
            by_role[self._roles[pid]] = by_role.get(self._roles[pid], 0.0) + max(
                0.0, last - self._first.get(pid, 0.0)
            )
        return {k: round(v, 3) for k, v in sorted(by_role.items())}


# --- data -------------------------------------------------------------------------------

TABLE = {"rows": 200_000, "features": 40, "seed": 0}


def generated_table(
    folder: Path, rows: int = TABLE["rows"], features: int = TABLE["features"], seed: int = 0
) -> Path:
    """A deterministic classification table as Parquet (columns x0..x{n-1}, target).

    ``make_classification`` with a fixed seed: half the features informative, a
    quarter redundant, 3 clusters a class and 2% flipped labels, so models differ
    in what they reach and no one setting is trivially best. Written once per
    (rows, features, seed) and reused.
    """
    path = folder / f"table-{rows}x{features}-seed{seed}.parquet"
    if path.exists():
        return path
    import numpy as np
    import pandas as pd
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=rows,
        n_features=features,
        n_informative=features // 2,
        n_redundant=features // 4,
        n_clusters_per_class=3,
        flip_y=0.02,
        class_sep=1.0,
        random_state=seed,
    )
    frame = pd.DataFrame(X.astype(np.float32), columns=[f"x{i}" for i in range(features)])
    frame["target"] = y.astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def safe_unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def make_churn(rows: int, seed: int):
    """The churn table of ``examples/make_csv.py`` (a DataFrame), without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_csv", ROOT / "examples" / "make_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_churn(rows=rows, seed=seed)


def register_churn(
    folder: Path,
    uri: str,
    name: str,
    *,
    cs: tuple[float, ...] = (1.0,),
    serve: dict[str, Any] | None = None,
    benchmark: str,
    log=print,
):
    """Fit a LogisticRegression on 6,000 churn rows for each ``C`` in ``cs`` and register
    each as a version of ``name`` at ``uri`` the way ``training.pipeline`` registers a
    winner (ONNX graph with the preprocessing inside, schema, profile, spec and drift
    reference); ``production`` on version 1. Returns the data's splits."""
    import numpy as np

    from training import export, registry
    from training.data import load_splits, profile
    from training.models import make_estimator
    from training.pipeline import drift_reference
    from training.preprocess import fit_preprocessor
    from training.spec import parse_spec, spec_to_yaml

    csv = folder / "churn.csv"
    make_churn(6000, 0).to_csv(csv, index=False)
    estimator = "sklearn.linear_model.LogisticRegression"
    raw = {
        "name": name,
        "task": "classification",
        "data": {"source": str(csv), "target": "churn", "categorical": ["plan", "region"]},
        "metric": "accuracy",
        "models": [{"type": "sklearn", "estimator": estimator}],
    }
    if serve is not None:
        raw["serve"] = serve
    spec = parse_spec(raw)
    splits = load_splits(spec.data, spec.task)
    schema = splits.schema
    pre = fit_preprocessor(spec.preprocess, schema, splits.X_train)
    feats = pre.transform(splits.X_train)
    y = np.array([schema.classes.index(c) for c in splits.y_train])
    for c in cs:
        est = make_estimator(estimator, {"C": c, "max_iter": 500}, 0).fit(feats, y)
        onnx_bytes = export.assemble(
            pre, export.sklearn_model_graph(est, feats.shape[1], spec.task), schema
        )
        sha = registry.sha256(onnx_bytes)
        run_id, source = registry.log_winner(
            uri,
            name,
            onnx_bytes=onnx_bytes,
            files={
                "schema.json": schema.to_dict(),
                "metrics.json": {},
                "profile.json": profile(splits.X_train, schema),
                "spec.yaml": spec_to_yaml(spec),
                "drift.json": drift_reference(spec, splits, onnx_bytes),
            },
            params={"C": c},
            metrics={},
            tags={"rayship.benchmark": benchmark, "onnx_sha256": sha},
        )
        version = registry.register_version(uri, name, source, run_id, tags={"onnx_sha256": sha})
        log(f"registered {name} version {version} (LogisticRegression C={c})")
        if str(version) == "1":
            registry.set_alias(uri, name, registry.PRODUCTION, version)
    return splits
