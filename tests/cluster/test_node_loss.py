"""A worker node lost during a search: the search finishes and registers a model.

A node goes two ways here. Removed from a ``ray.cluster_utils.Cluster`` (its raylet
stopped as a scaled-down or preempted node's is: the GCS hears of it at once), and
every process of a ``rayship up`` worker node SIGKILLed under a running ``rayship
tune`` (a crashed machine: the GCS notices by its health checks). Either way Tune
retries each trial that ran there (the spec's ``search.max_failures``, Tune's
``FailureConfig``) from its last checkpoint, on the node that is left.

Trials grow their model in 10 reported steps, each with a checkpoint, so a trial cut
off mid-way shows where its retry started: HistGradientBoosting in-process, a random
forest of long trials through the CLI (a trial must outlast a cold trial actor's start
on the worker node, else Tune hands the worker's trials to the head's reused actors).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from cli_runner import rayship
from ray.tune import Callback

from cluster import local
from training.pipeline import search_and_register
from training.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
STEPS = list(range(4, 41, 4))  # the iterations a HistGradientBoosting trial reports at
FOREST = "sklearn.ensemble.RandomForestClassifier"
TREES = list(range(300, 3001, 300))  # the trees a random forest trial reports at


def _churn_csv(path: Path) -> Path:
    """The churn table of examples/make_csv.py, written to ``path``."""
    spec = importlib.util.spec_from_file_location("make_csv", ROOT / "examples" / "make_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_churn(1200, 0).to_csv(path, index=False)
    return path


def node_loss_spec(source: Path, model: dict) -> dict:
    """One grid trial per combination of ``model``'s choices, all grown to the end (no
    scheduler), each retried up to twice."""
    return {
        "name": "churn",
        "task": "classification",
        "data": {"source": str(source), "target": "churn", "categorical": ["plan", "region"]},
        "metric": "f1_macro",
        "models": [{"type": "sklearn", **model}],
        "search": {
            "algorithm": "grid",
            "scheduler": "none",
            "num_samples": 1,
            "max_failures": 2,
        },
        "gate": {"min_metric": None},
    }


def reports(experiment_path: str | Path) -> dict[str, list[dict]]:
    """Every trial's reports (result.json lines), by trial folder name. Tune appends a
    retried trial's reports to the same log, after those of its first run."""
    return {
        d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        for d in Path(experiment_path).glob("trial-*")
    }


def moved_trials(
    trials: dict[str, list[dict]], lost: str, steps: list[int] = STEPS
) -> dict[str, list[dict]]:
    """Check that every trial grew to the end; return those that began on node ``lost``
    and were finished on another node. A trial cut off between a report and Tune's
    record of its checkpoint reruns that step (it is in the log twice)."""
    moved = {}
    for name, rows in trials.items():
        done = [r["iterations"] for r in rows]
        assert done == sorted(done) and sorted(set(done)) == steps, (name, done)
        nodes = [r["node_id"] for r in rows]
        if lost in nodes and nodes[-1] != lost:
            cut = nodes.index(next(n for n in nodes if n != lost))
            # On the lost node until it went, never there again.
            assert set(nodes[:cut]) == {lost} and lost not in nodes[cut:], (name, nodes)
            moved[name] = rows
    return moved


# --------------------------------------------------------------------------- in-process


class RemoveNodeOnCheckpoint(Callback):
    """Removes a worker node from a ``Cluster`` once a trial on it has reported a step
    that is not its last and Tune has recorded that step's checkpoint. Tune calls
    callbacks before it lets the trial go on (a function trial waits in
    ``tune.report`` for the driver's next ``train`` call), so that trial is cut off
    mid-way, every time."""

    def __init__(self, cluster, node):
        self.cluster, self.node = cluster, node
        self.reported: dict[str, int] = {}  # trial id -> iterations of its last report
        self.removed_at: tuple[str, int] | None = None  # (trial folder, iterations)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into each experiment snapshot; a cluster does not pickle.
        return {**self.__dict__, "cluster": None, "node": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("node_id") == self.node.node_id and result["iterations"] < STEPS[-1]:
            self.reported[trial.trial_id] = result["iterations"]

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.removed_at is None and trial.trial_id in self.reported:
            self.removed_at = (f"trial-{trial.trial_id}", self.reported[trial.trial_id])
            self.cluster.remove_node(self.node)


def test_a_search_finishes_when_a_worker_node_is_removed(tmp_path):
    """A 1-CPU head and a 2-CPU worker: of the first three trials two run on the worker,
    which is removed once one of them has reported."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        head = ray.get_runtime_context().get_node_id()
        hgb = {
            "estimator": HGB,
            "space": {"max_iter": STEPS[-1], "learning_rate": {"choice": [0.05, 0.1, 0.2, 0.3]}},
        }
        spec = parse_spec(node_loss_spec(_churn_csv(tmp_path / "churn.csv"), hgb))
        remove = RemoveNodeOnCheckpoint(cluster, worker)
        outcome = search_and_register(spec, state_dir=tmp_path, callbacks=[remove])
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert remove.removed_at is not None
    assert outcome.search.trials == 4 and outcome.search.errored == 0
    assert outcome.passed and outcome.version == "1"
    moved = moved_trials(reports(outcome.search.experiment_path), lost=worker.node_id)
    name, iterations = remove.removed_at
    assert name in moved
    # Its retry on the head began after the step it had checkpointed, not at 0.
    rows = moved[name]
    assert [r["iterations"] for r in rows] == STEPS  # each step once
    first_retried = next(r for r in rows if r["node_id"] != worker.node_id)
    assert first_retried["node_id"] == head
    assert first_retried["iterations"] == iterations + 4
    assert outcome.search.trial_nodes == {head, worker.node_id}


# --------------------------------------------------------------------------- the CLI


def _node_procs(session_id: int) -> list[psutil.Process]:
    """The live processes of one `rayship up` node: its `ray start`'s session."""
    procs = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(p.pid) == session_id and p.info["status"] != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return procs


def _wait_for_report_from(searches: Path, node_id: str, tune: subprocess.Popen) -> None:
    """Wait until a trial on ``node_id`` has reported a step that is not its last
    (Tune's JSON logger writes each report as it comes)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and tune.poll() is None:
        for log in searches.glob("*/trial-*/result.json"):
            for line in log.read_text().splitlines():
                row = json.loads(line) if line.endswith("}") else {}
                if row.get("node_id") == node_id and row["iterations"] < TREES[-1]:
                    return
        time.sleep(0.05)
    out = tune.communicate()[0] if tune.poll() is not None else ""
    raise AssertionError(f"no trial on node {node_id} reported; rayship tune: {out}")


def test_rayship_tune_finishes_when_a_worker_node_is_killed(tmp_path):
    """`rayship up --workers 1 --cpus-per-node 2`, then `rayship tune` of four trials at
    once, two a node; once a trial on the worker has reported, every process of the
    worker node is SIGKILLed."""
    spec = tmp_path / "churn.yaml"
    forest = {
        "estimator": FOREST,
        "space": {
            "n_estimators": TREES[-1],
            "max_depth": 4,
            "max_features": {"choice": [0.4, 0.6, 0.8, 1.0]},
        },
    }
    raw = node_loss_spec(_churn_csv(tmp_path / "churn.csv"), forest)
    spec.write_text(yaml.safe_dump(raw))
    tune = None
    try:
        started = rayship("up", "--workers", "1", "--cpus-per-node", "2", cwd=tmp_path)
        assert started.returncode == 0, started.stdout + started.stderr
        state = tmp_path / ".rayship"
        info = local.info(state)
        status = local.status(state)
        assert info is not None and status is not None
        (lost,) = [n.node_id for n in status.nodes if not n.is_head]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        tune = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "tune", str(spec)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _wait_for_report_from(state / "searches", lost, tune)
        killed = _node_procs(info.session_ids[1])
        names = {p.name() for p in killed}
        for p in killed:
            p.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert "raylet" in names, names
        out, _ = tune.communicate(timeout=180)
        print(f"rayship tune exited {time.monotonic() - killed_at:.1f} s after the kill")
        assert tune.returncode == 0, out
        assert "search: 4 trials (0 errored) on 2 node(s)" in out, out
        assert "gate passed: registered churn version 1 as candidate" in out, out
        (search,) = (state / "searches").glob("churn-*")
        assert moved_trials(reports(search), lost=lost, steps=TREES)
        assert _node_procs(info.session_ids[1]) == []
    finally:
        if tune is not None and tune.poll() is None:
            tune.kill()
            tune.wait()
        rayship("down", cwd=tmp_path, timeout=120)
