"""The spec is refused before anything starts, naming the key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from specs import ROOT, churn_spec

from training.spec import SpecError, load_spec, parse_spec


def refusal(raw) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return str(info.value)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")))
def test_every_example_spec_is_valid(example: Path):
    spec = load_spec(example)
    assert spec.name and spec.models


def test_unknown_key_is_named_with_its_path():
    raw = churn_spec("d.csv")
    raw["data"]["sauce"] = "x"
    assert "data.sauce: unknown key" in refusal(raw)


def test_unknown_top_level_key_is_named():
    assert "serving: unknown key" in refusal(churn_spec("d.csv", serving={}))


def test_wrong_value_names_the_key_and_the_allowed_values():
    message = refusal(churn_spec("d.csv", search={"scheduler": "fifo"}))
    assert "search.scheduler" in message
    for allowed in ("asha", "hyperband", "median", "pbt", "none"):
        assert allowed in message


def test_wrong_type_in_a_nested_list_names_the_index():
    raw = churn_spec("d.csv")
    raw["models"].append({"type": "torch_mlp", "workers": "two"})
    assert "models.1.workers" in refusal(raw)


def test_metric_must_fit_the_task():
    message = refusal(churn_spec("d.csv", metric="rmse"))
    assert "metric" in message and "accuracy" in message


@pytest.mark.parametrize(
    "estimator",
    ["os.system", "subprocess.Popen", "torch.nn.Linear", "xgboost.XGBClassifier", "builtins.eval"],
)
def test_a_non_scikit_learn_estimator_is_refused(estimator: str):
    raw = churn_spec("d.csv")
    raw["models"][0] = {"type": "sklearn", "estimator": estimator}
    message = refusal(raw)
    assert "models.0.estimator" in message
    assert "not a scikit-learn estimator" in message


def test_a_scikit_learn_function_or_private_class_is_refused():
    for path in ("sklearn.utils.shuffle", "sklearn.base._BaseX"):
        raw = churn_spec("d.csv")
        raw["models"][0] = {"type": "sklearn", "estimator": path}
        assert "models.0.estimator" in refusal(raw)


def test_a_regressor_is_refused_for_classification():
    raw = churn_spec("d.csv")
    raw["models"][0] = {"type": "sklearn", "estimator": "sklearn.linear_model.Ridge"}
    message = refusal(raw)
    assert "models.0.estimator" in message and "not a classifier" in message


def test_an_estimator_parameter_that_does_not_exist_is_named():
    raw = churn_spec("d.csv")
    raw["models"][0]["space"] = {"C": 1.0, "depth": 3}
    message = refusal(raw)
    assert "models.0" in message and "depth" in message


def test_search_space_bounds_must_be_ordered():
    raw = churn_spec("d.csv")
    raw["models"][0]["space"] = {"C": {"loguniform": [10.0, 0.1]}}
    assert "lower bound" in refusal(raw)


def test_unknown_torch_parameter_lists_the_allowed_ones():
    raw = churn_spec("d.csv")
    raw["models"] = [{"type": "torch_mlp", "space": {"layers": [64]}}]
    message = refusal(raw)
    assert "models.0.space" in message and "hidden_layers" in message


def test_pbt_is_refused_with_a_sklearn_family():
    assert "pbt" in refusal(churn_spec("d.csv", search={"scheduler": "pbt"}))


def test_data_source_must_be_a_table_or_a_bundled_set():
    raw = churn_spec("data.json")
    assert "data.source" in refusal(raw)
    raw = churn_spec("sklearn:mnist")
    message = refusal(raw)
    assert "data.source" in message and "digits" in message


def test_replica_bounds_are_checked():
    message = refusal(churn_spec("d.csv", serve={"min_replicas": 3, "max_replicas": 2}))
    assert "serve" in message and "min_replicas" in message


def test_every_problem_is_reported_at_once():
    raw = churn_spec("d.csv", metric="auc", task="ranking")
    raw["search"] = {"num_samples": 0}
    message = refusal(raw)
    assert "task" in message and "metric" in message and "search.num_samples" in message


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path)


def test_a_grid_search_plans_every_combination_per_sample():
    from training.tune import planned_trials

    raw = churn_spec("d.csv", search={"algorithm": "grid", "num_samples": 2})
    raw["models"][0]["space"] = {"C": {"choice": [0.1, 1.0, 10.0]}}
    raw["models"].append({"type": "torch_mlp", "space": {"batch_size": {"choice": [32, 64]}}})
    # samples × (the regression's 3 choices + the MLP's 2): families' choices never cross
    assert planned_trials(parse_spec(raw)) == 2 * (3 + 2)
    raw["search"] = {"algorithm": "random", "num_samples": 5}
    raw["models"][0]["space"] = {"C": {"loguniform": [0.1, 10.0]}}
    assert planned_trials(parse_spec(raw), num_samples=7) == 7


@pytest.mark.parametrize(
    ("estimator", "space", "expected"),
    [
        ("sklearn.svm.SVC", {}, "no class probabilities"),
        ("sklearn.linear_model.RidgeClassifier", {}, "no class probabilities"),
        ("sklearn.ensemble.VotingClassifier", {}, "cannot be built from parameters alone"),
    ],
)
def test_estimators_rayship_cannot_serve_are_refused(estimator, space, expected):
    raw = churn_spec("d.csv")
    raw["models"][0] = {"type": "sklearn", "estimator": estimator, "space": space}
    message = refusal(raw)
    assert "models.0.estimator" in message and expected in message


def test_a_probabilistic_option_makes_a_classifier_acceptable():
    raw = churn_spec("d.csv")
    raw["models"][0] = {
        "type": "sklearn",
        "estimator": "sklearn.svm.SVC",
        "space": {"probability": True},
    }
    assert parse_spec(raw).models[0].estimator == "sklearn.svm.SVC"


def test_a_bad_distribution_gives_its_own_reason():
    raw = churn_spec("d.csv")
    raw["models"][0]["space"] = {"C": {"loguniform": [0, 1]}}
    assert "models.0.space.C.loguniform: loguniform bounds must be > 0" in refusal(raw)
    raw["models"][0]["space"] = {"C": {"logunif": [1, 2]}}
    message = refusal(raw)
    assert "models.0.space.C:" in message and "loguniform: [low, high]" in message


def test_pbt_needs_a_parameter_to_mutate():
    raw = churn_spec("d.csv", search={"scheduler": "pbt"})
    raw["models"] = [{"type": "torch_mlp", "space": {"lr": 0.01}}]
    assert "search.scheduler: pbt mutates" in refusal(raw)
    raw["models"][0]["space"]["lr"] = {"loguniform": [1e-3, 1e-1]}
    assert parse_spec(raw).search.scheduler == "pbt"


def test_a_relative_data_path_is_relative_to_the_spec_file(tmp_path):
    spec = load_spec(ROOT / "examples" / "churn.yaml")
    assert spec.data.source == str(ROOT / "examples" / "data" / "churn.csv")
    for source in ("sklearn:iris", "s3://bucket/t.csv", "/abs/t.parquet"):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(churn_spec(source)))
        assert load_spec(path).data.source == source
