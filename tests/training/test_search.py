"""One real search on a two-node Ray cluster (``ray.cluster_utils.Cluster``), a real
MLflow SQLite store and a real Serve endpoint: register, gate, export check, serve.

The cluster and the first search are shared by the module (about 60 s on 2 cores).
Three families, searched by grid so each runs exactly once: a good and a weak
logistic regression and a one-worker torch MLP (trained inside its Tune trial) for
three epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from specs import churn_spec

from training import export, registry
from training.pipeline import search_and_register
from training.spec import ServeSpec, parse_spec
from training.train import family_params
from training.tune import planned_trials

LOGREG = "sklearn.linear_model.LogisticRegression"


MODELS = [
    {"type": "sklearn", "estimator": LOGREG, "space": {"C": 1.0, "max_iter": 500}},
    {"type": "sklearn", "estimator": LOGREG, "space": {"C": 1.0e-4}},
    {"type": "torch_mlp", "workers": 1, "space": {"hidden_layers": [16], "epochs": 3, "lr": 0.01}},
]


def search_spec(source, models=MODELS, min_metric=0.5):
    raw = churn_spec(
        source,
        models=models,
        search={"algorithm": "grid", "scheduler": "none", "num_samples": 1, "max_failures": 0},
        gate={"min_metric": min_metric, "must_beat_production": True},
    )
    return parse_spec(raw)


@pytest.fixture(scope="module")
def cluster(free_port):
    """A head and a worker node of one CPU each: two concurrent trials need both nodes."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        # The dashboard serves the state API Ray Train's placement-group cleaner uses.
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_port()},
    )
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def uri(state) -> str:
    return registry.tracking_uri(state)


@pytest.fixture(scope="module")
def spec(churn_csv):
    return search_spec(churn_csv)


@pytest.fixture(scope="module")
def outcome(cluster, spec, state):
    return search_and_register(spec, state_dir=state)


def test_a_search_registers_its_winner_as_candidate(outcome, uri, spec):
    assert outcome.passed, outcome.reasons
    assert outcome.version == "1"
    assert outcome.search.trials == planned_trials(spec) == 3
    assert outcome.search.errored == 0
    candidate = registry.resolve_version(uri, spec.name, registry.CANDIDATE)
    assert str(candidate.version) == "1"
    # The weak regression (C=1e-4 predicts one class) never wins.
    assert family_params(outcome.search.best_config)[0] in (0, 2)
    assert outcome.holdout >= 0.5


def test_the_version_carries_graph_spec_schema_metrics_profile_lineage(
    outcome, uri, spec, tmp_path
):
    mv = registry.resolve_version(uri, spec.name, "1")
    local = Path(
        mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path), tracking_uri=uri)
    )
    files = {p.name for p in local.iterdir()}
    assert {
        "model.onnx",
        "spec.yaml",
        "schema.json",
        "metrics.json",
        "profile.json",
        "lineage.json",
    } <= files
    assert mv.tags["onnx_sha256"] == registry.sha256((local / "model.onnx").read_bytes())
    lineage = json.loads((local / "lineage.json").read_text())
    assert lineage["data_sha256"] and lineage["trial_id"] == outcome.search.trial_id
    assert lineage["search_path"] == outcome.search.experiment_path
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["holdout_f1_macro"] == pytest.approx(outcome.holdout)
    profile = json.loads((local / "profile.json").read_text())
    assert set(profile["features"]) >= {"plan", "tenure_months"}
    schema = json.loads((local / "schema.json").read_text())
    assert schema["classes"] == ["churned", "stayed"]
    assert parse_spec(__import__("yaml").safe_load((local / "spec.yaml").read_text())) == spec


def test_trials_ran_on_more_than_one_node(cluster, churn_csv, state):
    """Two trials at a time on two 1-CPU nodes: one on each. (The module's first search
    cannot show it: its trials take well under a second, and a reused trial actor can
    run all three one after another.) Four torch trials of 20 epochs each overlap."""
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    raw = churn_spec(
        churn_csv,
        name="churn-nodes",
        models=[
            {
                "type": "torch_mlp",
                "workers": 1,
                "space": {
                    "hidden_layers": [16],
                    "epochs": 20,
                    "lr": {"choice": [0.01, 0.02, 0.03, 0.05]},
                },
            }
        ],
        search={
            "algorithm": "grid",
            "scheduler": "none",
            "num_samples": 1,
            "max_concurrent_trials": 2,
        },
        gate={"min_metric": None},
    )
    result = search_and_register(parse_spec(raw), state_dir=state)
    assert result.search.trials == 4 and result.search.errored == 0
    assert result.search.trial_nodes == alive


def test_every_trial_is_logged_to_mlflow_with_params_and_metrics(outcome, uri, spec):
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name(f"{spec.name}-search").experiment_id]
    )
    assert len(runs) == 3
    for run in runs:
        # grid configs are nested under "trial": trial/family, trial/f0/C, ...
        assert any(key.endswith("family") for key in run.data.params)
        assert "f1_macro" in run.data.metrics


def test_the_torch_trial_reported_and_checkpointed_every_epoch(outcome):
    trial_dirs = Path(outcome.search.experiment_path).glob("trial-*")
    torch_trials = [
        d for d in trial_dirs if family_params(json.loads((d / "params.json").read_text()))[0] == 2
    ]
    assert len(torch_trials) == 1
    reports = [
        json.loads(line) for line in (torch_trials[0] / "result.json").read_text().splitlines()
    ]
    assert [r["epoch"] for r in reports] == [0, 1, 2]
    # One checkpoint a report (Tune keeps only the newest on disk).
    assert [r["checkpoint_dir_name"] for r in reports] == [f"checkpoint_00000{i}" for i in range(3)]


def test_a_failed_export_check_registers_nothing(cluster, spec, state, uri, outcome, monkeypatch):
    from training import pipeline
    from training.export import ExportError

    before = registry.list_versions(uri, spec.name)
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no graph can pass: the refusal path
    prep = pipeline.prepare(spec)
    with pytest.raises(ExportError, match="does not match"):
        pipeline.register_winner(spec, prep, outcome.search, uri)
    assert registry.list_versions(uri, spec.name) == before


def test_the_gate_refuses_a_model_worse_than_production(cluster, churn_csv, state, uri, outcome):
    registry.set_alias(uri, "churn", registry.PRODUCTION, outcome.version)
    worse = search_spec(churn_csv, models=MODELS[1:2], min_metric=None)  # the weak one only
    result = search_and_register(worse, state_dir=state)
    assert not result.passed and result.version is None
    assert result.production_version == outcome.version
    assert result.production_holdout == pytest.approx(outcome.holdout)
    assert any("does not beat production" in r for r in result.reasons)
    versions = registry.list_versions(uri, "churn")
    assert [v["version"] for v in versions] == ["1"]
    assert str(registry.resolve_version(uri, "churn", registry.PRODUCTION).version) == "1"


def test_http_predictions_equal_offline_predictions_of_the_registered_version(
    cluster, outcome, uri, spec, churn_csv, free_port
):
    from services.deploy import predict_http, serve_model
    from training.data import load_splits

    serve_spec = ServeSpec(min_replicas=1, max_replicas=1, cpus_per_replica=0.5)
    url = serve_model(
        spec.name, outcome.version, tracking_uri=uri, serve_spec=serve_spec, port=free_port()
    )
    splits = load_splits(spec.data, spec.task)
    X = splits.X_test
    artifact = registry.load_artifact(uri, spec.name, outcome.version)
    offline_pred, offline_proba = export.run_onnx(artifact.onnx_bytes, X, splits.schema)
    rows = [
        {k: (None if v == "" else v) for k, v in row.items()} for row in X.to_dict(orient="records")
    ]
    reply = predict_http(url, spec.route, rows, return_probabilities=True)
    assert reply["model_version"] == outcome.version
    assert reply["predictions"] == offline_pred.tolist()
    np.testing.assert_allclose(reply["probabilities"], offline_proba, atol=1e-6)


def test_asha_stops_a_poor_torch_trial_and_frees_its_cpus(cluster, churn_csv, state):
    """Trials run one at a time: a good one, one that cannot learn (ASHA stops it at
    its first rung), then another good one, which must get the stopped trial's CPU."""
    raw = churn_spec(
        churn_csv,
        name="churn-asha",
        models=[
            {
                "type": "torch_mlp",
                "workers": 1,
                "space": {"hidden_layers": [16], "epochs": 4, "lr": {"choice": [0.01, 1e-9, 0.02]}},
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
    result = search_and_register(parse_spec(raw), state_dir=state)
    assert result.search.trials == 3 and result.search.errored == 0
    epochs = {}
    for trial in Path(result.search.experiment_path).glob("trial-*"):
        lr = family_params(json.loads((trial / "params.json").read_text()))[1]["lr"]
        epochs[lr] = len((trial / "result.json").read_text().splitlines())
    assert epochs[0.01] == 4 and epochs[0.02] == 4  # ran to the end
    assert epochs[1e-9] < 4  # stopped early by ASHA, at its first rung (epoch 2)


@pytest.mark.parametrize(
    ("name", "task", "source", "metric", "estimator", "algorithm", "scheduler"),
    [
        ("churn-hyperopt", "classification", None, "roc_auc", LOGREG, "hyperopt", "hyperband"),
        (
            "diabetes",
            "regression",
            "sklearn:diabetes",
            "rmse",
            "sklearn.linear_model.Ridge",
            "random",
            "median",
        ),
    ],
)
def test_other_searchers_schedulers_and_regression_register_a_version(
    cluster, churn_csv, state, uri, name, task, source, metric, estimator, algorithm, scheduler
):
    space = (
        {"C": {"loguniform": [0.01, 10.0]}}
        if task == "classification"
        else {"alpha": {"loguniform": [0.01, 10.0]}}
    )
    raw = churn_spec(
        source or churn_csv,
        name=name,
        task=task,
        metric=metric,
        models=[{"type": "sklearn", "estimator": estimator, "space": space}],
        search={"algorithm": algorithm, "scheduler": scheduler, "num_samples": 3},
        gate={"min_metric": None},
    )
    if source:
        raw["data"] = {"source": source, "target": "target"}
    result = search_and_register(parse_spec(raw), state_dir=state)
    assert result.passed and result.version == "1"
    assert result.search.trials == 3 and result.search.errored == 0
    assert result.parity.ok
    artifact = registry.load_artifact(uri, name, "candidate")
    assert artifact.metrics[f"holdout_{metric}"] == pytest.approx(result.holdout)
