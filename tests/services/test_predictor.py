"""OnnxPredictor on the registered churn graph, without Ray: feeds, outputs, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from served import GOOD, keyed_by_column, offline_outputs, rows_of

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
def numeric_model():
    """An all-numeric model (breast_cancer, 30 features, column names with spaces): its
    graph and its splits."""
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
    return graph, splits


@pytest.fixture(scope="module")
def numeric_predictor(numeric_model):
    """The all-numeric model's predictor (its rows take the one-conversion path) and holdout."""
    graph, splits = numeric_model
    return OnnxPredictor(graph, splits.schema.to_dict(), "bc", "1"), splits.X_test


def by_columns(predictor: OnnxPredictor, rows: list[dict]) -> list[dict]:
    """Rows keyed by ONNX names, re-keyed by the data's own column names."""
    pairs = list(zip(predictor.columns, predictor.names, strict=True))
    return [{c: r[n] for c, n in pairs} for r in rows]


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
    assert (problem["field"], problem["row"]) == ("mean radius", 1)  # the data's column name
    assert problem["got"].startswith(got)


# -- column names: the data's own (spaces and all) and the ONNX names as aliases ---------


def test_all_numeric_rows_keyed_by_column_names_take_the_one_conversion(numeric_predictor):
    """breast_cancer's own columns ("mean radius"): the same feeds and answers as rows keyed
    by ONNX names ("mean_radius") or given as lists, through the one-conversion path."""
    predictor, X = numeric_predictor
    assert predictor.columns[0] == "mean radius" and predictor.names[0] == "mean_radius"
    by_name = X.to_dict(orient="records")
    by_column = by_columns(predictor, by_name)
    fast = predictor._numeric_feeds(by_column)
    assert fast is not None  # not the cell-by-cell path
    reference = predictor.feeds(X.to_numpy().tolist())
    assert fast.keys() == reference.keys() == set(predictor.names)
    for name in predictor.names:
        assert (fast[name] == reference[name]).all()
    assert predictor.predict(by_column, True) == predictor.predict(by_name, True)


def test_mixed_keyings_are_read_key_by_key(numeric_predictor):
    """Some features by column name and some by ONNX name in one row, or rows keyed
    differently in one request: the same answers."""
    predictor, X = numeric_predictor
    by_name = X[:6].to_dict(orient="records")
    by_column = by_columns(predictor, by_name)
    half = [
        {**dict(list(c.items())[:15]), **dict(list(n.items())[15:])}
        for c, n in zip(by_column, by_name, strict=True)
    ]
    alternating = [by_column[i] if i % 2 else by_name[i] for i in range(6)]
    want = predictor.predict(by_name, True)
    assert predictor.predict(half, True) == want
    assert predictor.predict(alternating, True) == want


def test_rows_with_categories_and_spaced_columns(spaced):
    """The checked (cell-by-cell) path: "sales region" or "sales_region", same answer."""
    predictor = OnnxPredictor(spaced.onnx_bytes, spaced.schema.to_dict(), spaced.name, "1")
    assert "sales region" in predictor.columns and "sales_region" in predictor.names
    by_name = rows_of(spaced.X_test)
    out = predictor.predict(keyed_by_column(by_name, spaced.schema), True)
    assert out == predictor.predict(by_name, True)
    pred, proba = export.run_onnx(spaced.onnx_bytes, spaced.X_test, spaced.schema)
    assert out["predictions"] == pred.tolist()
    np.testing.assert_allclose(out["probabilities"], proba, atol=1e-6)


def test_a_feature_given_under_both_names_is_refused(numeric_predictor, spaced):
    """Under its column name and its ONNX name in one row: a 400 naming the column, on the
    one-conversion path (all numeric) and on the cell-by-cell one (categories)."""
    predictor, X = numeric_predictor
    row = by_columns(predictor, X[:1].to_dict(orient="records"))[0]
    mixed = OnnxPredictor(spaced.onnx_bytes, spaced.schema.to_dict(), spaced.name, "1")
    spaced_row = keyed_by_column(rows_of(spaced.X_test[:1]), spaced.schema)[0]
    for p, bad, field, alias in (
        (predictor, {**row, "mean_radius": 1.0}, "mean radius", "mean_radius"),
        (mixed, {**spaced_row, "sales_region": "x"}, "sales region", "sales_region"),
    ):
        with pytest.raises(BadInput) as info:
            p.predict([bad])
        first = info.value.details[0]
        assert (first["field"], first["row"]) == (field, 0)
        assert first["got"] == f"both {field!r} and {alias!r}"
        assert info.value.message.startswith(f"instances[0].{field}: ")


@pytest.mark.parametrize("case", ["missing", "unknown", "bad-value", "short-list"])
def test_errors_name_the_datas_column_names(numeric_predictor, case):
    predictor, X = numeric_predictor
    values = X.to_numpy().tolist()[0]
    row = dict(zip(predictor.names, values, strict=True))  # ONNX names; errors say columns
    if case == "missing":
        instances = [{k: v for k, v in row.items() if k != "mean_radius"}]
    elif case == "unknown":
        instances = [{**row, "colour": 1.0}]
    elif case == "bad-value":
        instances = [{**row, "mean_radius": "big"}]
    else:
        instances = [values[:3]]
    with pytest.raises(BadInput) as info:
        predictor.predict(instances)
    first = info.value.details[0]
    if case in ("missing", "bad-value"):
        assert first["field"] == "mean radius"
    else:
        assert "'mean radius'" in first["expected"] and "mean_radius" not in first["expected"]


def test_metadata_names_inputs_by_column_with_the_onnx_name_beside(numeric_predictor):
    from services import v2

    predictor, _ = numeric_predictor
    inputs = predictor.metadata()["inputs"]
    assert (inputs[0]["name"], inputs[0]["onnx_name"]) == ("mean radius", "mean_radius")
    assert [i["name"] for i in inputs] == predictor.columns
    assert [i["onnx_name"] for i in inputs] == predictor.names
    assert [t["name"] for t in v2.metadata(predictor, "bc", ["1"])["inputs"]] == predictor.columns


def test_v2_tensors_by_column_or_onnx_name_but_not_both(numeric_predictor):
    from services import v2

    predictor, X = numeric_predictor
    by_name = {n: X[n].to_numpy().reshape(-1, 1) for n in predictor.names}
    by_column = {c: by_name[n] for c, n in zip(predictor.columns, predictor.names, strict=True)}
    mixed = {**dict(list(by_column.items())[:10]), **dict(list(by_name.items())[10:])}
    want = predictor.run(v2.feeds(predictor, by_name))
    for tensors in (by_column, mixed):
        got = predictor.run(v2.feeds(predictor, tensors))
        assert got[0].tolist() == want[0].tolist() and (got[1] == want[1]).all()
    with pytest.raises(BadInput) as info:
        v2.feeds(predictor, {**by_column, "mean_radius": by_name["mean_radius"]})
    assert info.value.details[0]["field"] == "mean radius"
    with pytest.raises(BadInput) as info:
        v2.feeds(predictor, {k: v for k, v in by_column.items() if k != "mean radius"})
    assert info.value.details[0] == {
        "field": "mean radius",
        "row": None,
        "expected": "an input tensor",
        "got": "missing",
    }


def test_a_schema_from_before_column_names_still_serves(numeric_model, numeric_predictor):
    """schema.json of a version registered before columns were recorded: no "column"; its
    ONNX names are then its column names, as clients have been sending them."""
    predictor, X = numeric_predictor
    old = {**predictor.schema, "features": [
        {k: v for k, v in f.items() if k != "column"} for f in predictor.schema["features"]
    ]}  # fmt: skip
    assert all("column" not in f for f in old["features"])
    legacy = OnnxPredictor(numeric_model[0], old, "bc", "1")
    assert legacy.columns == legacy.names == predictor.names
    assert [i["name"] for i in legacy.metadata()["inputs"]] == predictor.names
    by_name = X[:10].to_dict(orient="records")
    assert legacy.predict(by_name, True) == predictor.predict(by_name, True)
    with pytest.raises(BadInput) as info:  # it never knew "mean radius"
        legacy.predict([{**by_name[0], "mean radius": 1.0}])
    assert info.value.details[0]["field"] == "mean radius"
    assert info.value.details[0]["got"] == "unknown column"


def test_a_schema_where_one_name_belongs_to_two_features_is_refused(
    numeric_model, numeric_predictor
):
    predictor, _ = numeric_predictor
    features = [dict(f) for f in predictor.schema["features"]]
    features[0]["column"] = features[1]["name"]  # "mean_texture" would mean two features
    with pytest.raises(ValueError, match="mean_texture"):
        OnnxPredictor(numeric_model[0], {**predictor.schema, "features": features}, "bc", "1")
