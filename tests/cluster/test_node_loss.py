"""A worker node lost during a search: the search finishes and registers a model.

A worker node is removed from a ``ray.cluster_utils.Cluster`` (its raylet stopped as
a scaled-down or preempted node's is: the GCS hears of it at once). Tune retries each
trial that ran there (the spec's ``search.max_failures``, Tune's
``FailureConfig``) from its last checkpoint, on the node that is left.

The trials grow a HistGradientBoosting model to 40 iterations in 10 reported steps,
each with a checkpoint, so a trial cut off mid-way shows where its retry started.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ray.tune import Callback

from training.pipeline import search_and_register
from training.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
STEPS = list(range(4, 41, 4))  # the iterations a HistGradientBoosting trial reports at


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
    """Every trial's reports (result.json lines), by trial folder name. Tune rolls a
    failed trial's log back to its last checkpoint: the log is the history of the
    model the trial ended with."""
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
