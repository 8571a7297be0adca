"""A real registered model for the serving tests: churn CSV → preprocessing + logistic
regression → one ONNX graph → MLflow (SQLite store in a tmp dir), trained once per session.

Versions: 1 (alias ``production``), 2 (its model.onnx overwritten after registration:
fails its checksum), 3 (the same graph as 1, for the hot swap). A second model,
``churn-tree`` (a depth-2 decision tree on the same features, version 1 in production),
is the other model of a two-model endpoint. ``churn-spaced`` (fixture ``spaced``, built
only by the tests that use it) has column names with spaces, for the tests of column names.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = "churn"


@dataclass
class Registered:
    uri: str
    name: str
    onnx_bytes: bytes
    schema: object  # training.data.FeatureSchema
    X_test: pd.DataFrame
    good_version: str
    tampered_version: str
    swap_version: str
    other_name: str
    other_onnx_bytes: bytes


def _make_churn():
    spec = importlib.util.spec_from_file_location("make_csv", ROOT / "examples" / "make_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_churn()


def _log_and_register(uri: str, name: str, onnx_bytes: bytes, sha: str, files: dict, metrics: dict):
    from training import registry

    run_id, source = registry.log_winner(
        uri,
        name,
        onnx_bytes=onnx_bytes,
        files=files,
        params={"family": "logreg"},
        metrics=metrics,
        tags={"rayship.test": "services"},
    )
    version = registry.register_version(uri, name, source, run_id, tags={"onnx_sha256": sha})
    return version, source


@pytest.fixture(scope="module", autouse=True)
def native_ingress(free_port):
    """Every Ray these tests start serves through Serve's native ingress (HAProxy → replica),
    as rayship's clusters do: the environment Ray's processes inherit from ``ray.init``.
    Per module (each starts its own Ray): the environment is restored after it, so tests
    elsewhere start Ray as users do."""
    import os
    import shutil
    import tempfile

    from cluster.local import claim_replica_ports
    from services import ingress

    files = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: HAProxy's socket paths
    env = ingress.serve_env(
        files_dir=files,
        stats_port=free_port(),
        metrics_port=free_port(),
        replica_ports=claim_replica_ports(files),  # free again once `files` is removed
        fallback_ports=(free_port(), free_port()),
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(files, ignore_errors=True)


@pytest.fixture(scope="session")
def registered(tmp_path_factory) -> Registered:
    from training import export, registry
    from training.models import make_estimator
    from training.spec import parse_spec, spec_to_yaml

    tmp = tmp_path_factory.mktemp("services")
    csv = tmp / "churn.csv"
    _make_churn().to_csv(csv, index=False)
    spec = parse_spec(
        {
            "name": NAME,
            "task": "classification",
            "data": {"source": str(csv), "target": "churn", "categorical": ["plan", "region"]},
            "metric": "accuracy",
            "models": [{"type": "sklearn", "estimator": LOGISTIC, "space": {}}],
        }
    )
    fit = _fit_logistic(spec)
    splits, schema, pre, feats, y = fit.splits, fit.splits.schema, fit.pre, fit.feats, fit.y
    onnx_bytes, accuracy, files = fit.onnx_bytes, fit.accuracy, fit.files

    uri = f"sqlite:///{tmp / 'state' / 'mlflow.db'}"
    (tmp / "state").mkdir()
    sha = registry.sha256(onnx_bytes)
    good, _ = _log_and_register(uri, NAME, onnx_bytes, sha, files, {"accuracy": accuracy})
    registry.set_alias(uri, NAME, registry.PRODUCTION, good)
    # A version whose model.onnx is replaced after registration: a valid graph with one
    # byte string changed, so only the checksum can tell.
    tampered, source = _log_and_register(uri, NAME, onnx_bytes, sha, files, {"accuracy": accuracy})
    onnx_path = Path(unquote(urlparse(source).path)) / "model.onnx"
    assert onnx_path.read_bytes() == onnx_bytes
    onnx_path.write_bytes(onnx_bytes.replace(b"rayship", b"tampers"))
    swap, _ = _log_and_register(uri, NAME, onnx_bytes, sha, files, {"accuracy": accuracy})

    tree = make_estimator(
        "sklearn.tree.DecisionTreeClassifier", {"max_depth": 2}, spec.data.seed
    ).fit(feats, y)
    tree_bytes = export.assemble(
        pre, export.sklearn_model_graph(tree, feats.shape[1], spec.task), schema
    )
    other = f"{NAME}-tree"
    tree_files = {**files, "spec.yaml": spec_to_yaml(spec.model_copy(update={"name": other}))}
    tree_version, _ = _log_and_register(
        uri, other, tree_bytes, registry.sha256(tree_bytes), tree_files, {"accuracy": accuracy}
    )
    registry.set_alias(uri, other, registry.PRODUCTION, tree_version)
    return Registered(
        uri, NAME, onnx_bytes, schema, splits.X_test, good, tampered, swap, other, tree_bytes
    )


SPACED_COLUMNS = {
    "region": "sales region",
    "tenure_months": "tenure (months)",
    "monthly_charges": "monthly charges",
    "support_tickets": "support tickets",
}


@dataclass
class Spaced:
    """``churn-spaced``: the churn table with spaced column names, registered (version 1,
    production) in the ``registered`` store; its ``X_test`` is keyed by ONNX names."""

    name: str
    version: str
    onnx_bytes: bytes
    schema: object  # training.data.FeatureSchema
    X_test: pd.DataFrame


@pytest.fixture(scope="session")
def spaced(registered, tmp_path_factory) -> Spaced:
    """A model whose columns have spaces and parentheses ("sales region", "tenure
    (months)"), for the tests of column names: the churn data renamed, a logistic
    regression (about a second), in the same MLflow store as ``registered`` so one
    endpoint can serve both."""
    from training import registry
    from training.spec import parse_spec

    csv = tmp_path_factory.mktemp("spaced") / "churn spaced.csv"
    _make_churn().rename(columns=SPACED_COLUMNS).to_csv(csv, index=False)
    spec = parse_spec(
        {
            "name": f"{NAME}-spaced",
            "task": "classification",
            "data": {
                "source": str(csv),
                "target": "churn",
                "categorical": ["plan", "sales region"],
            },
            "metric": "accuracy",
            "models": [{"type": "sklearn", "estimator": LOGISTIC, "space": {}}],
        }
    )
    fit = _fit_logistic(spec)
    onnx_bytes, accuracy, files = fit.onnx_bytes, fit.accuracy, fit.files
    version, _ = _log_and_register(
        registered.uri,
        spec.name,
        onnx_bytes,
        registry.sha256(onnx_bytes),
        files,
        {"accuracy": accuracy},
    )
    registry.set_alias(registered.uri, spec.name, registry.PRODUCTION, version)
    return Spaced(spec.name, version, onnx_bytes, fit.splits.schema, fit.splits.X_test)


LOGISTIC = "sklearn.linear_model.LogisticRegression"


@dataclass
class Fitted:
    """A spec's split, its fitted preprocessing and training matrix, a logistic regression
    behind that preprocessing as one ONNX graph, its holdout accuracy, and the artifact
    files a registered version carries."""

    splits: object  # training.data.Splits
    pre: object
    feats: object
    y: object
    onnx_bytes: bytes
    accuracy: float
    files: dict


def _fit_logistic(spec) -> Fitted:
    import numpy as np

    from training import export
    from training.data import load_splits, profile
    from training.models import make_estimator
    from training.preprocess import fit_preprocessor
    from training.spec import spec_to_yaml

    splits = load_splits(spec.data, spec.task)
    schema = splits.schema
    pre = fit_preprocessor(spec.preprocess, schema, splits.X_train)
    feats = pre.transform(splits.X_train)
    y = np.array([schema.classes.index(c) for c in splits.y_train])
    est = make_estimator(LOGISTIC, {"max_iter": 500}, spec.data.seed).fit(feats, y)
    onnx_bytes = export.assemble(
        pre, export.sklearn_model_graph(est, feats.shape[1], spec.task), schema
    )
    pred, _ = export.run_onnx(onnx_bytes, splits.X_test, schema)
    accuracy = float(np.mean(pred == splits.y_test.to_numpy()))
    files = {
        "schema.json": schema.to_dict(),
        "metrics.json": {"accuracy": accuracy},
        "profile.json": profile(splits.X_train, schema),
        "spec.yaml": spec_to_yaml(spec),
        "lineage.json": {"data_hash": splits.content_hash},
    }
    return Fitted(splits, pre, feats, y, onnx_bytes, accuracy, files)
