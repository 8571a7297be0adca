"""OnnxPredictor on the registered churn graph, without Ray: feeds, outputs, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from served import GOOD, offline_outputs, rows_of

from services.predictor import BadInput, OnnxPredictor
from training import export


@pytest.fixture(scope="module")
def predictor(registered) -> OnnxPredictor:
    return OnnxPredictor(registered.onnx_bytes, registered.schema.to_dict(), registered.name, "1")


def test_objects_match_offline_graph(predictor, registered):
    X = registered.X_test
    out = predictor.predict(rows_of(X), return_probabilities=True)
    pred, proba = export.run_onnx(registered.onnx_bytes, X, registered.schema)
    assert out["model_version"] == "1"
    assert out["predictions"] == pred.tolist()
    assert all(isinstance(p, str) for p in out["predictions"])
    assert out["classes"] == registered.schema.classes
    np.testing.assert_allclose(np.array(out["probabilities"]), proba, atol=1e-6)
    assert "probabilities" not in predictor.predict(rows_of(X[:2]))


def test_lists_in_feature_order_and_run_many(predictor, registered):
    rows = rows_of(registered.X_test[:20])
    as_lists = [[r[n] for n in predictor.names] for r in rows]
    assert predictor.predict(as_lists, True) == predictor.predict(rows, True)
    parts = [predictor.feeds(rows[:3]), predictor.feeds(rows[3:4]), predictor.feeds(rows[4:])]
    joined = predictor.run_many(parts)
    alone = [predictor.run(p) for p in parts]
    for (p1, q1), (p2, q2) in zip(joined, alone, strict=True):
        assert p1.tolist() == p2.tolist()
        np.testing.assert_allclose(q1, q2, atol=1e-6)


def test_unseen_category_nulls_and_loose_types(predictor, registered):
    row = rows_of(registered.X_test[:1])[0]
    odd = {**row, "plan": "enterprise", "region": None, "tenure_months": None, "support_tickets": 2}
    out = predictor.predict([odd], return_probabilities=True)
    pred, proba = offline_outputs(registered, odd)
    assert out["predictions"] == pred.tolist()
    np.testing.assert_allclose(out["probabilities"], proba, atol=1e-6)


@pytest.mark.parametrize(
    ("instances", "field", "expected"),
    [
        ({"plan": "basic"}, "instances", "list"),
        ([], "instances", "non-empty"),
        ([{k: v for k, v in GOOD.items() if k != "tenure_months"}], "tenure_months", "value"),
        ([{**GOOD, "colour": "red"}], "colour", "features"),
        ([{**GOOD, "tenure_months": "ten"}], "tenure_months", "number"),
        ([{**GOOD, "monthly_charges": 1e39}], "monthly_charges", "float32"),
        ([{**GOOD, "plan": {"name": "basic"}}], "plan", "string"),
        ([["basic", "north", 3.0]], "instances[0]", "5 values"),
        ([GOOD, 7], "instances[1]", "object"),
    ],
    ids=[
        "not-a-list",
        "empty",
        "missing",
        "unknown",
        "string-in-numeric",
        "overflow",
        "object-in-categorical",
        "short-list",
        "scalar-row",
    ],
)
def test_bad_input_names_the_field(predictor, instances, field, expected):
    with pytest.raises(BadInput) as info:
        predictor.predict(instances)
    first = info.value.details[0]
    assert first["field"] == field and expected in first["expected"]
    assert field in info.value.message


def test_many_problems_are_capped(predictor):
    rows = [{**GOOD, "tenure_months": "x"}] * 100
    with pytest.raises(BadInput) as info:
        predictor.predict(rows)
    assert len(info.value.details) == 20 and info.value.details[-1]["row"] == 19


def test_metadata(predictor, registered):
    meta = predictor.metadata()
    assert meta["version"] == "1" and meta["ready"] and meta["task"] == "classification"
    assert [f["name"] for f in meta["inputs"]] == registered.schema.names
    assert meta["outputs"][0] == {"name": "predictions", "dtype": "string", "shape": [-1]}
    assert meta["outputs"][1]["shape"] == [-1, 2]


def test_graph_that_does_not_fit_its_schema_is_refused(registered):
    schema = registered.schema.to_dict()
    schema["features"] = schema["features"] + [
        {"name": "extra", "dtype": "float", "categories": None}
    ]
    with pytest.raises(ValueError, match="extra"):
        OnnxPredictor(registered.onnx_bytes, schema, registered.name, "1")


def test_serving_modules_import_neither_torch_nor_sklearn():
    code = (
        "import sys, services.app, services.deploy, services.predictor; "
        "bad = {'torch', 'sklearn', 'skl2onnx'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def numeric_predictor():
    """An all-numeric model (breast_cancer, 30 features): its rows take the one-conversion path."""
    import numpy as np

    from training import export
    from training.data import load_splits
    from training.models import make_estimator
    from training.preprocess import fit_preprocessor
    from training.spec import parse_spec

    spec = parse_spec(
        {
            "name": "bc",
            "task": "classification",
            "data": {"source": "sklearn:breast_cancer", "target": "target"},
            "metric": "roc_auc",
            "models": [{"type": "sklearn", "estimator": "sklearn.linear_model.LogisticRegression"}],
        }
    )
    splits = load_splits(spec.data, spec.task)
    pre = fit_preprocessor(spec.preprocess, splits.schema, splits.X_train)
    feats = pre.transform(splits.X_train)
    y = np.array([splits.schema.classes.index(c) for c in splits.y_train])
    est = make_estimator("sklearn.linear_model.LogisticRegression", {}, 0).fit(feats, y)
    graph = export.assemble(
        pre, export.sklearn_model_graph(est, feats.shape[1], spec.task), splits.schema
    )
    return OnnxPredictor(graph, splits.schema.to_dict(), "bc", "1"), splits.X_test


def test_all_numeric_rows_take_one_conversion_with_the_same_answers(numeric_predictor):
    predictor, X = numeric_predictor
    assert predictor.all_numeric
    lists = X.to_numpy().tolist()
    objects = X.to_dict(orient="records")
    fast = predictor.feeds(lists)
    assert predictor.feeds(objects).keys() == fast.keys()
    predictor.all_numeric = False  # the cell-by-cell path, for reference
    try:
        checked = predictor.feeds(lists)
    finally:
        predictor.all_numeric = True
    for name in predictor.names:
        assert fast[name].dtype == checked[name].dtype and fast[name].shape == checked[name].shape
        assert (fast[name] == checked[name]).all()
    assert predictor.predict(lists) == predictor.predict(objects)
    with_null = [[None] + row[1:] for row in lists[:2]]  # null: missing, still served
    assert len(predictor.predict(with_null)["predictions"]) == 2


@pytest.mark.parametrize(
    ("cell", "got"), [("1.5", "string"), (1e39, "number"), (True, None)], ids=["str", "big", "bool"]
)
def test_all_numeric_rows_are_still_checked_cell_by_cell(numeric_predictor, cell, got):
    predictor, X = numeric_predictor
    row = X.to_numpy().tolist()[0]
    if got is None:  # a boolean is a number, as on the checked path
        assert predictor.feeds([[cell] + row[1:]])[predictor.names[0]][0, 0] == 1.0
        return
    with pytest.raises(BadInput) as info:
        predictor.feeds([row, [cell] + row[1:]])
    problem = info.value.details[0]
    assert (problem["field"], problem["row"]) == (predictor.names[0], 1)
    assert problem["got"].startswith(got)
