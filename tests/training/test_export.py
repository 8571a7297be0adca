"""The exported graph (preprocessing + model, raw columns in) matches the native model.

No Ray here: the models are trained in-process on the same features a trial gets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from specs import churn_spec

from training import export
from training.models import build_mlp, make_estimator
from training.pipeline import encode_labels, prepare
from training.spec import parse_spec

HGB = {
    "classification": "sklearn.ensemble.HistGradientBoostingClassifier",
    "regression": "sklearn.ensemble.HistGradientBoostingRegressor",
}


def spec_of(source: str, task: str = "classification", **data):
    raw = churn_spec(source, task=task, metric="accuracy" if task == "classification" else "rmse")
    raw["data"] = {"source": source, "target": "target", **data}
    raw["models"] = [{"type": "sklearn", "estimator": HGB[task]}]
    return parse_spec(raw)


@pytest.fixture(scope="module")
def digits():
    return prepare(spec_of("sklearn:digits"))


@pytest.fixture(scope="module")
def churn(churn_csv):
    raw = churn_spec(churn_csv)
    return prepare(parse_spec(raw))


@pytest.fixture(scope="module")
def diabetes():
    return prepare(spec_of("sklearn:diabetes", task="regression"))


def with_unseen_and_missing(prep) -> pd.DataFrame:
    """The holdout plus rows a server will meet: an unseen category, every value missing."""
    X = prep.splits.X_test
    extra = X.iloc[:3].copy()
    extra["plan"] = ["enterprise", "enterprise", ""]  # never seen in training; '' = missing
    extra["region"] = ["", "mars", "north"]
    extra.iloc[0, [2, 3, 4]] = np.nan
    extra.iloc[2, [2, 3, 4]] = np.nan
    return pd.concat([X, extra])


def train_mlp(prep, epochs: int = 30):
    """A small MLP trained as a trial's workers would, on the graph's features."""
    torch.manual_seed(0)
    X = torch.as_tensor(prep.arrays["X_train"])
    classify = prep.splits.schema.task == "classification"
    y = np.array(prep.arrays["y_train"])
    y_mean, y_std = (0.0, 1.0) if classify else (float(y.mean()), float(y.std()))
    target = torch.as_tensor(y).long() if classify else torch.as_tensor((y - y_mean) / y_std)
    n_out = len(prep.splits.schema.classes) if classify else 1
    net = build_mlp(X.shape[1], n_out, [32], 0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    for _ in range(epochs):
        opt.zero_grad()
        out = net(X) if classify else net(X)[:, 0]
        loss_fn(out, target.float() if not classify else target).backward()
        opt.step()
    return net.eval(), (y_mean, y_std)


def export_and_check(prep, family: str, X: pd.DataFrame):
    schema = prep.splits.schema
    n = prep.arrays["X_train"].shape[1]
    if family == "sklearn":
        est = make_estimator(HGB[schema.task], {"max_iter": 50}, 0)
        est.fit(prep.arrays["X_train"], prep.arrays["y_train"])
        graph = export.sklearn_model_graph(est, n, schema.task)
        native = est
    else:
        net, (y_mean, y_std) = train_mlp(prep)
        graph = export.torch_model_graph(net, n, schema.task, y_mean, y_std)
        native = export.torch_predictor(net, schema.task, schema.classes, y_mean, y_std)
    onnx_bytes = export.assemble(prep.pre, graph, schema)
    pred, proba = export.native_outputs(prep.pre, native, schema.task, schema.classes, X)
    parity = export.check_parity(prep.pre, onnx_bytes, X, schema, pred, proba)
    return onnx_bytes, parity, pred


@pytest.mark.parametrize("family", ["sklearn", "torch_mlp"])
def test_digits_graph_matches_the_native_model(digits, family):
    X = digits.splits.X_test
    onnx_bytes, parity, native_pred = export_and_check(digits, family, X)
    assert parity.ok, parity
    assert parity.rows == len(X) and parity.label_mismatches == 0
    assert parity.max_abs_diff <= export.TOLERANCE
    # The graph takes the raw pixel columns and answers with the digit labels.
    pred, proba = export.run_onnx(onnx_bytes, X, digits.splits.schema)
    assert set(np.unique(pred)) <= set(range(10))
    assert proba.shape == (len(X), 10)
    assert np.mean(pred == digits.splits.y_test.to_numpy()) > 0.85


@pytest.mark.parametrize("family", ["sklearn", "torch_mlp"])
def test_churn_graph_matches_with_missing_values_and_unseen_categories(churn, family):
    X = with_unseen_and_missing(churn)
    assert X["tenure_months"].isna().sum() > 2 and "enterprise" in set(X["plan"])
    onnx_bytes, parity, _ = export_and_check(churn, family, X)
    assert parity.ok, parity
    pred, proba = export.run_onnx(onnx_bytes, X, churn.splits.schema)
    assert set(pred) <= {"churned", "stayed"}  # string labels come out of the graph
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", ["sklearn", "torch_mlp"])
def test_regression_graph_matches_the_native_model(diabetes, family):
    _, parity, _ = export_and_check(diabetes, family, diabetes.splits.X_test)
    assert parity.ok, parity


def test_a_graph_of_another_model_fails_the_check(churn):
    """The check compares against the native model: a graph that differs is caught."""
    schema = churn.splits.schema
    X = churn.splits.X_test
    est = make_estimator(HGB["classification"], {"max_iter": 50}, 0)
    est.fit(churn.arrays["X_train"], churn.arrays["y_train"])
    flipped = make_estimator(HGB["classification"], {"max_iter": 50}, 0)
    flipped.fit(churn.arrays["X_train"], 1 - churn.arrays["y_train"])
    graph = export.assemble(
        churn.pre, export.sklearn_model_graph(flipped, est.n_features_in_, "classification"), schema
    )
    pred, proba = export.native_outputs(churn.pre, est, "classification", schema.classes, X)
    parity = export.check_parity(churn.pre, graph, X, schema, pred, proba)
    assert not parity.ok
    assert parity.label_mismatches > len(X) // 2


def test_labels_are_encoded_in_schema_order(churn):
    schema = churn.splits.schema
    encoded = encode_labels(churn.splits.y_train, schema)
    decoded = np.asarray(schema.classes)[encoded]
    np.testing.assert_array_equal(decoded, churn.splits.y_train.to_numpy())


def test_spaced_columns_are_the_graphs_inputs_by_their_onnx_names():
    """breast_cancer's "mean radius" is the graph's input "mean_radius": the schema maps one
    to the other, and the graph still matches the native model."""
    import onnx

    prep = prepare(spec_of("sklearn:breast_cancer"))
    schema = prep.splits.schema
    onnx_bytes, parity, _ = export_and_check(prep, "sklearn", prep.splits.X_test)
    assert parity.ok, parity
    inputs = [i.name for i in onnx.load_from_string(onnx_bytes).graph.input]
    assert inputs == schema.names and inputs[0] == "mean_radius"
    assert schema.columns[0] == "mean radius"
