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
