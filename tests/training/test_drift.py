"""Drift against a version's training reference (training.drift): slots, statistics,
calibrated alert levels, importance; the monitor section of the spec; and drift.json
registered with every version (a real MLflow store, a real ONNX graph).

The statistics run on synthetic tables drawn from a known distribution, so "undrifted"
and "shifted" windows are known to be what they are."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from specs import churn_spec

from training import drift
from training.data import Feature, FeatureSchema
from training.spec import SpecError, parse_spec

PLANS = ["basic", "plus", "pro"]


def table(rows: int, seed: int, *, shift: bool = False) -> pd.DataFrame:
    """A typed frame (Feature.name keys, float32 numerics with NaN, '' for a missing
    category): two numerics, one discrete, one categorical. ``shift``: 'tenure' scaled
    by 1.5 and 'plan' moved towards 'pro' (the others as before)."""
    rng = np.random.default_rng(seed)
    tenure = rng.gamma(2.0, 12.0, rows) * (1.5 if shift else 1.0)
    charges = rng.normal(50, 15, rows)
    tickets = rng.poisson(1.5, rows).astype(float)
    p = [0.2, 0.3, 0.5] if shift else [0.5, 0.3, 0.2]
    plan = rng.choice(PLANS, size=rows, p=p).astype(object)
    tenure[rng.random(rows) < 0.05] = np.nan
    plan[rng.random(rows) < 0.04] = ""
    return pd.DataFrame(
        {
            "tenure": tenure.astype(np.float32),
            "monthly_charges": charges.astype(np.float32),
            "tickets": tickets.astype(np.float32),
            "plan": plan.astype(str).astype(object),
        }
    )


SCHEMA = FeatureSchema(
    task="regression",
    target="y",
    features=[
        Feature("tenure", "float", column="tenure (months)"),
        Feature("monthly_charges", "float", column="monthly charges"),
        Feature("tickets", "float"),
        Feature("plan", "string", PLANS),
    ],
)


def predict_from_tickets(X: pd.DataFrame) -> np.ndarray:
    """A 'model' that only looks at tickets."""
    return 2.0 * X["tickets"].to_numpy(dtype=float)


def inputs(X: pd.DataFrame) -> dict[str, np.ndarray]:
    """Columns as serving feeds them: (n, 1), float32 or object strings."""
    return {c: X[c].to_numpy().reshape(-1, 1) for c in X.columns}


@pytest.fixture(scope="module")
def reference() -> dict:
    X_train, X_hold = table(3000, 0), table(800, 1)
    y_hold = predict_from_tickets(X_hold) + np.random.default_rng(2).normal(0, 0.1, len(X_hold))
    ref = drift.build_reference(
        X_train,
        X_hold,
        y_hold,
        SCHEMA,
        predict_from_tickets,
        metric="rmse",
        window=1000,
        quantile=0.99,
    )
    return json.loads(json.dumps(ref))  # as stored in drift.json and read back


def drift_of(reference: dict, X: pd.DataFrame) -> dict:
    return drift.report(reference, drift.codes(reference, inputs(X)), model="m", version="3")


def test_the_reference_is_what_drift_json_promises(reference):
    assert reference["window"] == 1000 and reference["quantile"] == 0.99
    by_name = {f["name"]: f for f in reference["features"]}
    assert [f["column"] for f in reference["features"]] == [
        "tenure (months)",
        "monthly charges",
        "tickets",
        "plan",
    ]
    tenure = by_name["tenure"]
    assert tenure["kind"] == "numeric" and len(tenure["edges"]) == 9
    assert tenure["edges"] == sorted(tenure["edges"]) and tenure["lo"] < tenure["edges"][0]
    assert tenure["missing"] == pytest.approx(0.05, abs=0.015)
    assert len(by_name["tickets"]["edges"]) < 9  # deduplicated: a discrete feature
    plan = by_name["plan"]
    assert plan["kind"] == "categorical" and plan["categories"] == PLANS
    assert "edges" not in plan and "lo" not in plan
    for f in reference["features"]:
        assert len(f["expected"]) == drift.n_slots(reference)[reference["features"].index(f)]
        assert sum(f["expected"]) == pytest.approx(1.0)
        assert f["expected"][-1] == 0.0  # training never falls outside its own range
        assert f["threshold"] > 0 and 0 < f["js_threshold"] < 1


def test_codes_are_one_int16_slot_per_row_and_feature(reference):
    X = pd.DataFrame(
        {
            "tenure": np.array([np.nan, -5.0, 1e6, 20.0], dtype=np.float32),
            "monthly_charges": np.array([50, 50, 50, 50], dtype=np.float32),
            "tickets": np.array([0, 1, 2, 3], dtype=np.float32),
            "plan": np.array(["", "enterprise", "basic", "pro"], dtype=object),
        }
    )
    codes = drift.codes(reference, inputs(X))
    assert codes.dtype == np.int16 and codes.shape == (4, 4)
    k_tenure = len(reference["features"][0]["edges"]) + 1
    assert list(codes[:, 0][:3]) == [k_tenure, k_tenure + 1, k_tenure + 1]  # missing, out, out
    assert 0 <= codes[3, 0] < k_tenure
    assert list(codes[:, 3]) == [3, 4, 0, 2]  # missing, unseen, basic, pro
    flat = {c: X[c].to_numpy() for c in X.columns}  # shape (n,) works the same
    assert np.array_equal(drift.codes(reference, flat), codes)


@pytest.mark.parametrize("seed", [10, 11, 12, 13, 14])
def test_undrifted_windows_flag_no_feature(reference, seed):
    for i in range(10):
        result = drift_of(reference, table(1000, seed * 100 + i))
        assert result["drifted"] == [], result["features"]
        assert result["score"] < 1


def test_more_rows_than_the_window_from_the_training_distribution_flag_nothing(reference):
    result = drift_of(reference, table(2000, 99))
    assert result["window_rows"] == 2000 and result["drifted"] == []


def test_a_shifted_numeric_and_categorical_feature_are_exactly_the_drifted_ones(reference):
    for seed in (20, 21, 22):
        result = drift_of(reference, table(1000, seed, shift=True))
        assert result["drifted"] == ["tenure (months)", "plan"]
        flagged = {f["name"]: f for f in result["features"] if f["drifted"]}
        for f in flagged.values():
            assert f["psi"] > f["threshold"]
            assert f["js"] > 0


def test_many_features_do_not_turn_noise_into_alarms():
    """64 independent features: each at its own 99th percentile, an undrifted window
    would flag some feature about half the time; the levels are set so that it does not."""
    rng = np.random.default_rng(5)
    cols = [f"x{i}" for i in range(64)]
    schema = FeatureSchema("regression", "y", [Feature(c, "float") for c in cols])

    def frame(rows: int) -> pd.DataFrame:
        scale = np.arange(1, 65, dtype=float)
        return pd.DataFrame(rng.gamma(2.0, scale, (rows, 64)).astype(np.float32), columns=cols)

    X_train, X_hold = frame(1200), frame(360)
    ref = drift.build_reference(
        X_train,
        X_hold,
        X_hold["x0"].to_numpy(),
        schema,
        lambda X: X["x0"].to_numpy(),
        metric="mae",
        window=500,
        quantile=0.99,
    )
    flagged = [drift_of(ref, frame(500))["drifted"] for _ in range(40)]
    assert sum(bool(f) for f in flagged) <= 1, flagged


def test_shares_missing_out_of_range_and_unseen_are_exact(reference):
    X = table(1000, 30)
    X.loc[:, "tenure"] = np.float32(20.0)
    X.loc[X.index[:100], "tenure"] = np.nan  # 10% missing
    X.loc[X.index[100:150], "tenure"] = np.float32(1e6)  # 5% out of range
    X.loc[:, "plan"] = "basic"
    X.loc[X.index[:250], "plan"] = "enterprise"  # 25% unseen
    X.loc[X.index[250:270], "plan"] = ""  # 2% missing
    by_name = {f["name"]: f for f in drift_of(reference, X)["features"]}
    tenure, plan = by_name["tenure (months)"], by_name["plan"]
    assert tenure["missing"] == pytest.approx(0.10)
    assert tenure["out_of_range"] == pytest.approx(0.05) and tenure["unseen"] == 0.0
    assert plan["unseen"] == pytest.approx(0.25) and plan["missing"] == pytest.approx(0.02)
    assert plan["out_of_range"] == 0.0
    assert tenure["drifted"] and plan["drifted"]


def test_importance_is_the_models_own_reliance_on_each_feature(reference):
    importance = {f["name"]: f["importance"] for f in reference["features"]}
    assert importance["tickets"] == pytest.approx(1.0)
    assert sum(importance.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in importance.values())


def test_the_report_has_the_endpoints_fields_and_no_nan(reference):
    result = drift_of(reference, table(1000, 40, shift=True))
    assert set(result) == {"model", "version", "window_rows", "features", "drifted", "score"}
    assert (result["model"], result["version"], result["window_rows"]) == ("m", "3", 1000)
    assert [f["name"] for f in result["features"]] == [
        "tenure (months)",
        "monthly charges",
        "tickets",
        "plan",
    ]
    for f in result["features"]:
        assert set(f) == {
            "name",
            "kind",
            "psi",
            "js",
            "missing",
            "out_of_range",
            "unseen",
            "threshold",
            "importance",
            "drifted",
        }
    json.dumps(result, allow_nan=False)
    empty = drift.report(reference, np.zeros((0, 4), dtype=np.int16))
    assert empty["window_rows"] == 0 and empty["drifted"] == [] and empty["score"] == 0.0
    json.dumps(empty, allow_nan=False)


def test_a_window_still_filling_needs_more_drift_to_alert(reference):
    """Fewer rows than the calibration window: noise is larger, so is the level used."""
    full = drift_of(reference, table(1000, 50))
    partial = drift_of(reference, table(100, 50))
    assert partial["features"][0]["threshold"] == pytest.approx(
        10 * full["features"][0]["threshold"]
    )
    assert partial["drifted"] == []


def test_counts_report_equals_the_report_of_the_codes(reference):
    codes = drift.codes(reference, inputs(table(700, 60, shift=True)))
    counts = [np.bincount(codes[:, i], minlength=s) for i, s in enumerate(drift.n_slots(reference))]
    assert drift.counts_report(reference, counts, 700) == drift.report(reference, codes)


@pytest.mark.parametrize(
    ("monitor", "key"),
    [
        ({"window": 5}, "monitor.window"),
        ({"sample_rate": 0}, "monitor.sample_rate"),
        ({"sample_rate": 1.5}, "monitor.sample_rate"),
        ({"calibration_quantile": 1.0}, "monitor.calibration_quantile"),
        ({"calibration_quantile": 0.2}, "monitor.calibration_quantile"),
        ({"cooldown_s": -1}, "monitor.cooldown_s"),
        ({"windw": 100}, "monitor.windw: unknown key"),
    ],
)
def test_a_bad_monitor_value_is_refused_naming_its_key(monitor, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        parse_spec(churn_spec("d.csv", monitor=monitor))


def test_monitor_defaults_and_min_improvement():
    spec = parse_spec(churn_spec("d.csv"))
    assert spec.monitor.window == 1000 and spec.monitor.sample_rate == 1.0
    assert spec.monitor.calibration_quantile == 0.99 and spec.monitor.cooldown_s == 3600
    assert spec.gate.min_improvement == 0
    assert parse_spec(churn_spec("d.csv", gate={"min_improvement": 0.02})).gate.min_improvement
    with pytest.raises(SpecError, match=r"gate\.min_improvement"):
        parse_spec(churn_spec("d.csv", gate={"min_improvement": -0.1}))


# -- drift.json with every registered version -------------------------------------------


def test_a_registered_version_carries_its_drift_reference(
    churn_csv, tmp_path, register_without_search
):
    from training import registry
    from training.data import load_splits

    spec = parse_spec(churn_spec(churn_csv, monitor={"window": 200, "calibration_quantile": 0.95}))
    outcome = register_without_search(spec, tmp_path)
    assert outcome.passed and outcome.version == "1"
    artifact = registry.load_artifact(registry.tracking_uri(tmp_path), "churn", "1")
    ref = artifact.drift
    assert ref["window"] == 200 and ref["quantile"] == 0.95
    splits = load_splits(spec.data, spec.task)
    assert [f["column"] for f in ref["features"]] == splits.schema.columns
    assert sum(f["importance"] for f in ref["features"]) == pytest.approx(1.0)
    # The holdout itself, as serving feeds it, is no drift from its own training data.
    from training.export import onnx_feeds

    result = drift.report(ref, drift.codes(ref, onnx_feeds(splits.X_test, splits.schema)))
    assert result["drifted"] == []


def test_a_version_registered_before_drift_monitoring_has_no_reference(tmp_path):
    from training import registry

    uri = registry.tracking_uri(tmp_path)
    onnx_bytes = b"not read by load_artifact"
    run_id, source = registry.log_winner(
        uri,
        "old",
        onnx_bytes=onnx_bytes,
        files={"schema.json": {}, "metrics.json": {}, "profile.json": {}},
        params={},
        metrics={},
        tags={},
    )
    registry.register_version(
        uri, "old", source, run_id, {"onnx_sha256": registry.sha256(onnx_bytes)}
    )
    assert registry.load_artifact(uri, "old", "1").drift is None


def test_a_file_of_new_rows_is_read_by_its_own_column_names_or_onnx_names(reference):
    X = table(300, 70)
    frame = X.rename(columns={"tenure": "tenure (months)"}).assign(target=1.0)
    frame["plan"] = frame["plan"].replace("", None)  # a file's empty cell
    same = drift.codes(reference, drift.frame_inputs(reference, frame))
    assert np.array_equal(same, drift.codes(reference, inputs(X)))
    by_onnx_names = drift.frame_inputs(reference, X)  # "tenure", "monthly_charges"
    assert np.array_equal(drift.codes(reference, by_onnx_names), same)
    with pytest.raises(ValueError, match=r"\['tenure \(months\)', 'plan'\]"):
        drift.frame_inputs(reference, frame.drop(columns=["tenure (months)", "plan"]))
    with pytest.raises(ValueError, match="'tickets': expected numbers"):
        drift.frame_inputs(reference, frame.assign(tickets="many"))
