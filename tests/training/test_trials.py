"""How trials run: reused actors, a 1-worker torch trial inside its Tune trial (and
its resume after its process is killed), scikit-learn estimators grown in steps so
ASHA stops the weak ones, PBT on torch trials, and the DDP example (and its resume after
one of its Ray Train worker processes is killed).

One local Ray of 2 CPUs is shared by the module; every search is real (Tune, MLflow
SQLite store, export and gate).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import joblib
import pytest
from ray.tune import Callback
from specs import ROOT, churn_spec

from training.evaluate import score
from training.pipeline import prepare, search_and_register
from training.spec import load_spec, parse_spec
from training.train import family_params

HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
LOGREG = "sklearn.linear_model.LogisticRegression"


@pytest.fixture(scope="module")
def ray_local(free_port):
    import ray

    # The dashboard serves the state API Ray Train's placement-group cleaner uses (DDP).
    ray.init(num_cpus=2, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def reports(experiment_path: str) -> dict[str, list[dict]]:
    """Every trial's reports (result.json lines), by trial folder name."""
    return {
        d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        for d in Path(experiment_path).glob("trial-*")
    }


def search(raw: dict, state: Path, **kwargs):
    return search_and_register(parse_spec(raw), state_dir=state, **kwargs)


def test_trial_actors_are_reused_across_trials_and_families(ray_local, churn_csv, tmp_path):
    """Eight trials of two families (a 1-worker torch MLP and a logistic regression),
    two at a time: every trial ran in one of two processes."""
    raw = churn_spec(
        churn_csv,
        models=[
            {"type": "sklearn", "estimator": LOGREG, "space": {"C": {"loguniform": [0.1, 10.0]}}},
            {"type": "torch_mlp", "workers": 1, "space": {"hidden_layers": [8], "epochs": 2}},
        ],
        search={
            "algorithm": "random",
            "scheduler": "none",
            "num_samples": 8,
            "max_concurrent_trials": 2,
        },
        gate={"min_metric": None},
    )
    result = search(raw, tmp_path)
    assert result.search.trials == 8 and result.search.errored == 0
    trials = reports(result.search.experiment_path).values()
    families = {family_params(r[0]["config"])[0] for r in trials}
    assert families == {0, 1}  # both families ran
    pids = {row["pid"] for r in trials for row in r}
    assert len(pids) <= 2, pids


class KillOnce(Callback):
    """A Tune callback that SIGKILLs a trial's process when it reports epoch ``epoch``."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.killed: int | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and result.get("epoch") == self.epoch:
            self.killed = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)


def test_a_one_worker_torch_trial_resumes_from_its_checkpoint_when_its_process_dies(
    ray_local, churn_csv, tmp_path
):
    raw = churn_spec(
        churn_csv,
        models=[{"type": "torch_mlp", "workers": 1, "space": {"hidden_layers": [16], "epochs": 6}}],
        search={"algorithm": "grid", "scheduler": "none", "num_samples": 1, "max_failures": 1},
        gate={"min_metric": None},
    )
    kill = KillOnce(epoch=1)
    result = search(raw, tmp_path, callbacks=[kill])
    assert kill.killed is not None
    assert result.search.trials == 1 and result.search.errored == 0
    (rows,) = reports(result.search.experiment_path).values()
    # The killed process reported from epoch 0; the retry went on from a checkpointed
    # epoch (not 0) to the last. Tune rolls a failed trial's log back to its last sync
    # to storage, so the killed process's rows after its last checkpoint (epoch 1, whose
    # checkpoint the kill cut off) may be there too: those epochs trained twice.
    killed = [r["epoch"] for r in rows if r["pid"] == kill.killed]
    retried = [r["epoch"] for r in rows if r["pid"] != kill.killed]
    assert killed == list(range(len(killed))) and killed
    assert retried == list(range(retried[0], 6)) and 1 <= retried[0] <= killed[-1] + 1
    assert [r["pid"] for r in rows[: len(killed)]] == [kill.killed] * len(killed)
    assert result.passed and result.search.best_metrics["epoch"] == 5


def test_asha_stops_a_growing_estimator_early_and_the_winner_is_the_model_reported(
    ray_local, churn_csv, tmp_path
):
    """HistGradientBoosting grows in 10 reported steps of 4 stages; one trial at a time:
    a good one, then one that cannot learn (learning rate 1e-9)."""
    raw = churn_spec(
        churn_csv,
        models=[
            {
                "type": "sklearn",
                "estimator": HGB,
                "space": {"max_iter": 40, "learning_rate": {"choice": [0.1, 1e-9]}},
            }
        ],
        search={
            "algorithm": "grid",
            "scheduler": "asha",
            "num_samples": 1,
            "max_concurrent_trials": 1,
            "max_failures": 0,
        },
        gate={"min_metric": None},
    )
    result = search(raw, tmp_path)
    assert result.search.trials == 2 and result.search.errored == 0
    steps = {}
    for rows in reports(result.search.experiment_path).values():
        lr = family_params(rows[0]["config"])[1]["learning_rate"]
        steps[lr] = [r["iterations"] for r in rows]
    assert steps[0.1] == list(range(4, 41, 4))  # grown to the end
    assert steps[1e-9] == [4, 8]  # stopped by ASHA at its first rung (2 reports)

    # The registered model is the estimator of the winner's last report.
    best = result.search.best_metrics
    est = joblib.load(Path(result.search.best_checkpoint) / "estimator.joblib")
    assert est.n_iter_ == best["iterations"] == 40
    arrays = prepare(parse_spec(raw)).arrays
    valid = score("f1_macro", arrays["y_valid"], est.predict(arrays["X_valid"]))
    assert valid == pytest.approx(best["f1_macro"])


def test_pbt_perturbs_torch_trials_and_registers_a_version(ray_local, churn_csv, tmp_path):
    raw = churn_spec(
        churn_csv,
        models=[
            {
                "type": "torch_mlp",
                "workers": 1,
                "space": {
                    "hidden_layers": [16],
                    "epochs": 8,
                    "lr": {"loguniform": [1.0e-4, 1.0e-1]},
                },
            }
        ],
        search={"algorithm": "random", "scheduler": "pbt", "num_samples": 4},
        gate={"min_metric": None},
    )
    result = search(raw, tmp_path)
    assert result.search.trials == 4 and result.search.errored == 0
    assert result.passed and result.version == "1"
    for rows in reports(result.search.experiment_path).values():
        assert rows[-1]["epoch"] == 7  # every trial trained to its last epoch


class KillTrainWorker(Callback):
    """A Tune callback that SIGKILLs one Ray Train worker process of the (only) DDP run
    when its trial reports epoch ``epoch``, which Ray Train has checkpointed by then."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.workers: list[int] = []
        self.killed: int | None = None
        self.killed_at: float | None = None
        self.reports_after: list[float] = []  # when each report after the kill came

    def restart_s(self) -> float:
        """The longest wait for a report after the kill: the worker group's restart."""
        times = [self.killed_at, *self.reports_after]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from ray.util.state import list_actors

        if self.killed is None and result.get("epoch") == self.epoch:
            alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            self.workers = sorted(a.pid for a in list_actors(filters=alive))
            self.killed = self.workers[-1]
            os.kill(self.killed, signal.SIGKILL)
            self.killed_at = time.monotonic()
        elif self.killed_at is not None:
            self.reports_after.append(time.monotonic())


def failures(experiment_path: str) -> list[int]:
    """Each trial's failure count in Tune's saved experiment state (Tune retries)."""
    (state,) = sorted(Path(experiment_path).glob("experiment_state-*.json"))[-1:]
    return [
        json.loads(meta)["num_failures"] for _, meta in json.loads(state.read_text())["trial_data"]
    ]


def test_the_ddp_example_resumes_from_its_checkpoint_when_a_train_worker_dies(ray_local, tmp_path):
    """The DDP example (2 Ray Train workers a trial); one worker process SIGKILLed after
    epoch 2's checkpoint. Ray Train's FailureConfig (search.max_failures) restarts the
    worker group from the checkpoint inside the same trial; the search registers."""
    spec = load_spec(ROOT / "examples" / "digits-ddp.yaml")
    (torch_family,) = [m for m in spec.models if m.type == "torch_mlp"]
    assert torch_family.workers == 2 and spec.search.max_failures >= 1
    kill = KillTrainWorker(epoch=2)
    result = search_and_register(spec, state_dir=tmp_path, num_samples=1, callbacks=[kill])
    assert len(kill.workers) == 2 and kill.killed is not None  # both workers were up
    assert result.search.trials == 1 and result.search.errored == 0
    assert result.passed and result.version == "1"
    (rows,) = reports(result.search.experiment_path).values()
    epochs = int(torch_family.space["epochs"])
    # Every epoch reported once: the new worker group went on from a checkpoint after
    # epoch 2 (one started at epoch 0 would report epochs 0-2 again) ...
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert all(r["checkpoint_path"] for r in rows)  # Ray Train's checkpoint of each epoch
    # ... and Ray Train recovered it, not a Tune retry of the whole trial.
    assert failures(result.search.experiment_path) == [0]
    assert len({r["pid"] for r in rows}) == 1
    assert result.search.best_metrics["epoch"] == epochs - 1
    print(f"DDP worker killed: longest wait for a report after it {kill.restart_s():.1f} s")
