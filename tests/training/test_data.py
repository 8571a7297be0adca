"""Data loading, the deterministic split, and preprocessing fitted on the train split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from specs import churn_spec, make_churn

from training.data import MISSING_CATEGORY, DataError, FeatureSchema, load_frame, load_splits
from training.pipeline import prepare
from training.spec import parse_spec


def spec_for(source, **data):
    raw = churn_spec(source)
    raw["data"].update(data)
    return parse_spec(raw)


def indexes(splits):
    return [list(s.index) for s in (splits.X_train, splits.X_valid, splits.X_test)]


def test_split_is_deterministic_and_seeded(churn_csv):
    spec = spec_for(churn_csv)
    first = load_splits(spec.data, spec.task)
    again = load_splits(spec.data, spec.task)
    assert indexes(first) == indexes(again)
    other = load_splits(spec_for(churn_csv, seed=1).data, "classification")
    assert indexes(other)[2] != indexes(first)[2]


def test_splits_are_disjoint_cover_the_data_and_are_stratified(churn_csv):
    spec = spec_for(churn_csv, test_fraction=0.25, valid_fraction=0.2)
    s = load_splits(spec.data, spec.task)
    train, valid, test = map(set, indexes(s))
    assert not (train & valid or train & test or valid & test)
    assert len(train | valid | test) == 1200
    assert len(test) == 300
    overall = (pd.read_csv(churn_csv)["churn"] == "churned").mean()
    for y in (s.y_train, s.y_valid, s.y_test):
        assert abs((y == "churned").mean() - overall) < 0.01


def test_the_holdout_never_reaches_the_search(churn_csv):
    """What the search receives is built from the train and valid rows alone."""
    spec = spec_for(churn_csv)
    prep = prepare(spec)
    s = prep.splits
    assert set(prep.arrays) == {"X_train", "y_train", "X_valid", "y_valid"}
    np.testing.assert_array_equal(prep.arrays["X_train"], prep.pre.transform(s.X_train))
    np.testing.assert_array_equal(prep.arrays["X_valid"], prep.pre.transform(s.X_valid))
    test_rows = {tuple(r) for r in prep.pre.transform(s.X_test).round(5)}
    search_rows = {
        tuple(r) for r in np.vstack([prep.arrays["X_train"], prep.arrays["X_valid"]]).round(5)
    }
    assert len(prep.arrays["y_train"]) + len(prep.arrays["y_valid"]) == 1200 - len(s.X_test)
    # Rows are continuous-valued: a shared row would mean a test row leaked.
    assert not test_rows & search_rows


def test_preprocessing_statistics_come_from_the_train_split_alone(tmp_path):
    """Holdout rows with huge values and a category of their own move no statistic."""
    frame = make_churn(600, seed=3)
    path = tmp_path / "shifted.csv"
    frame.to_csv(path, index=False)
    spec = spec_for(path)
    test_index = load_splits(spec.data, spec.task).X_test.index
    # The split depends on the labels and the seed, not on feature values: shift the
    # holdout rows in the file itself and the same rows are the holdout again.
    frame.loc[test_index, "tenure_months"] = 10_000.0
    frame.loc[test_index, "plan"] = "holdout-only"
    frame.to_csv(path, index=False)

    prep = prepare(spec)  # the pipeline's own path: load, split, fit preprocessing
    s = prep.splits
    assert list(s.X_test.index) == list(test_index)
    numeric = prep.pre.columns.named_transformers_["numeric"]
    imputer, clipper, scaler = (step for _, step in numeric.steps)
    col = s.schema.numeric.index("tenure_months")
    train = s.X_train["tenure_months"].astype("float64")
    assert imputer.statistics_[col] == pytest.approx(train.median())
    imputed = train.fillna(train.median())
    q1, med, q3 = np.quantile(imputed, [0.25, 0.5, 0.75])
    assert clipper.upper_[col] == pytest.approx(med + 4.0 * (q3 - q1))
    clipped = imputed.clip(clipper.lower_[col], clipper.upper_[col])
    assert scaler.mean_[col] == pytest.approx(clipped.mean())
    assert scaler.mean_[col] < 200  # the holdout's 10 000s would pull it into the thousands
    assert "holdout-only" not in s.schema.features[0].categories
    onehot = prep.pre.columns.named_transformers_["categorical"]
    assert "holdout-only" not in list(onehot.categories_[0])


def test_string_labels_categories_and_missing_values_are_typed(churn_csv):
    spec = spec_for(churn_csv)
    s = load_splits(spec.data, spec.task)
    assert s.schema.classes == ["churned", "stayed"]
    assert s.schema.categorical == ["plan", "region"]
    assert s.X_train["tenure_months"].dtype == np.float32
    assert s.X_train["tenure_months"].isna().any()
    # Missing categories become the '' category, a category of their own.
    assert MISSING_CATEGORY in s.schema.features[1].categories


def test_csv_parquet_and_file_uri_give_the_same_data_and_hash(churn_csv, tmp_path):
    parquet = tmp_path / "churn.parquet"
    pd.read_csv(churn_csv).to_parquet(parquet)
    hashes = set()
    for source in (str(churn_csv), f"file://{churn_csv}", str(parquet), f"file://{parquet}"):
        s = load_splits(spec_for(source).data, "classification")
        hashes.add(s.content_hash)
        assert len(s.X_test) == 240
    assert len(hashes) == 1


def test_content_hash_changes_with_one_value(churn_csv, tmp_path):
    frame = pd.read_csv(churn_csv)
    frame.loc[7, "support_tickets"] += 1
    changed = tmp_path / "changed.csv"
    frame.to_csv(changed, index=False)
    a = load_splits(spec_for(churn_csv).data, "classification").content_hash
    b = load_splits(spec_for(changed).data, "classification").content_hash
    assert a != b


def test_bundled_sets_keep_their_column_names_and_the_schema_records_both():
    frame = load_frame("sklearn:breast_cancer")
    assert "mean radius" in frame.columns
    spec = parse_spec(
        {
            "name": "bc",
            "task": "classification",
            "data": {"source": "sklearn:breast_cancer", "target": "target"},
            "metric": "accuracy",
            "models": [{"type": "sklearn", "estimator": "sklearn.linear_model.LogisticRegression"}],
        }
    )
    s = load_splits(spec.data, spec.task)
    assert s.schema.columns == [c for c in frame.columns if c != "target"]
    first = s.schema.features[0]
    assert (first.column, first.name) == ("mean radius", "mean_radius")
    assert all(n.replace("_", "").isalnum() for n in s.schema.names)
    assert list(s.X_test.columns) == list(s.X_train.columns) == s.schema.names  # ONNX names
    assert FeatureSchema.from_dict(s.schema.to_dict()) == s.schema
    assert s.schema.to_dict()["features"][0]["column"] == "mean radius"


SPACED = {"region": "sales region", "tenure_months": "tenure (months)", "churn": "churn status"}


@pytest.mark.parametrize(
    "names",
    [
        {"target": "churn status", "categorical": ["plan", "sales region"]},
        {"target": "churn_status", "categorical": ["plan", "sales_region"]},  # ONNX names work
    ],
    ids=["column-names", "onnx-names"],
)
def test_a_spec_names_spaced_columns_by_either_name(tmp_path, names):
    path = tmp_path / "spaced.csv"
    make_churn(300).rename(columns=SPACED).to_csv(path, index=False)
    spec = spec_for(path, features=["tenure (months)", "sales region", "plan"], **names)
    s = load_splits(spec.data, spec.task)
    assert [(f.column, f.name, f.dtype) for f in s.schema.features] == [
        ("tenure (months)", "tenure__months_", "float"),
        ("sales region", "sales_region", "string"),
        ("plan", "plan", "string"),
    ]
    assert s.schema.target == "churn_status" and s.y_train.name == "churn_status"
    assert list(s.X_train.columns) == s.schema.names
    assert s.schema.features[1].categories == ["", "east", "north", "south", "west"]


def test_columns_that_share_an_onnx_name_are_refused_naming_both(tmp_path):
    frame = make_churn(100)
    frame["monthly-charges"] = frame["monthly_charges"]
    frame["monthly charges"] = frame["monthly_charges"]
    path = tmp_path / "clash.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_frame(str(path))
    message = str(info.value)
    assert message.startswith("data.source:")
    for name in ("'monthly_charges'", "'monthly-charges'", "'monthly charges'"):
        assert name in message
    with pytest.raises(DataError, match="monthly-charges"):
        load_splits(spec_for(path).data, "classification")


def test_a_schema_from_before_column_names_reads_back_with_its_onnx_names():
    old = {
        "task": "classification",
        "target": "target",
        "features": [
            {"name": "mean_radius", "dtype": "float", "categories": None},
            {"name": "plan", "dtype": "string", "categories": ["a", "b"]},
        ],
        "classes": [0, 1],
    }
    schema = FeatureSchema.from_dict(old)
    assert schema.columns == schema.names == ["mean_radius", "plan"]
    assert schema.features[1].categories == ["a", "b"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"target": "label"}, "data.target"),
        ({"categorical": ["plan"]}, "data.categorical"),
        ({"features": ["plan", "nope"], "categorical": ["plan"]}, "data.features"),
    ],
)
def test_data_that_does_not_fit_the_spec_names_the_field(churn_csv, data, expected):
    spec = spec_for(churn_csv, **data)
    with pytest.raises(DataError, match=expected):
        load_splits(spec.data, spec.task)


def test_a_missing_file_is_named(tmp_path):
    spec = spec_for(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="data.source: no such file"):
        load_splits(spec.data, spec.task)


def test_numeric_category_codes_are_typed_the_same_in_training_and_serving(tmp_path):
    """Codes read as floats (a gap makes the column float) are '1', not '1.0', as a
    JSON client's 1 is."""
    from services.predictor import _categorical

    frame = make_churn(300)
    frame["plan"] = frame["plan"].map({"basic": 1, "plus": 2, "pro": 3})
    frame.loc[::17, "plan"] = None  # now a float column with gaps
    path = tmp_path / "codes.csv"
    frame.to_csv(path, index=False)
    s = load_splits(spec_for(path).data, "classification")
    categories = s.schema.features[0].categories
    assert categories == ["", "1", "2", "3"]
    assert {_categorical(v) for v in (1, 1.0, 2, None)} == {"1", "2", ""}


def test_a_numeric_column_empty_in_training_is_named(tmp_path):
    frame = make_churn(200)
    frame["tenure_months"] = None
    path = tmp_path / "empty.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"tenure_months.*no value in the train split"):
        load_splits(spec_for(path).data, "classification")
