"""Spec fuzzing: hypothesis builds valid specs, then breaks one key at a time.

Every valid spec parses (and survives a YAML round trip); every broken one is refused
with :class:`SpecError` whose problems name the broken key's path — never another
exception, never a silent acceptance. Breakages: an unknown key in any mapping, a
required key removed, a value of the wrong type, a number out of its range (NaN and
±inf included), a word outside a key's allowed set, an estimator from outside
scikit-learn, a space value no trial could run with. Spec files that are not YAML
mappings (binary, deeply nested, duplicated keys) are refused the same way.

Pure Python (no Ray): the spec is checked before anything starts; that a refused spec
starts no Ray and creates no MLflow store through the real CLI is shown in
tests/cluster/test_security.py. Examples are drawn deterministically (``derandomize``)
so CI runs the same cases every time; about 10 s in all.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from training.spec import SpecError, load_spec, parse_spec, spec_to_yaml

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- valid specs

NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
WORD = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
COLUMN = st.text("abcdefghijklmnopqrstuvwxyz_ ()", min_size=1, max_size=16)


def ordered(low: float, high: float, integer: bool = False):
    """(a, b) with low <= a < b <= high."""
    draw = st.integers(int(low), int(high)) if integer else st.floats(low, high)
    return st.tuples(draw, draw).filter(lambda t: t[0] < t[1])


def real(low: float, high: float, log: bool = False, grid: bool = False):
    """A space value for a float parameter taking values in [low, high]."""
    constant = st.floats(low, high)
    options = [constant, st.builds(lambda v: {"choice": v}, st.lists(constant, min_size=1))]
    if not grid:
        key = "loguniform" if log else "uniform"
        options.append(ordered(low, high).map(lambda t: {key: list(t)}))
    return st.one_of(options)


def integer(low: int, high: int, grid: bool = False):
    constant = st.integers(low, high)
    options = [constant, st.builds(lambda v: {"choice": v}, st.lists(constant, min_size=1))]
    if not grid:
        options.append(ordered(low, high + 1, integer=True).map(lambda t: {"randint": list(t)}))
    return st.one_of(options)


# estimator -> its parameters' space values (valid for scikit-learn's own checks)
CLASSIFIERS = {
    "sklearn.linear_model.LogisticRegression": {
        "C": lambda g: real(1e-3, 100.0, log=True, grid=g),
        "max_iter": lambda g: integer(50, 500, g),
    },
    "sklearn.tree.DecisionTreeClassifier": {
        "max_depth": lambda g: integer(1, 20, g),
        "min_samples_leaf": lambda g: integer(1, 10, g),
    },
    "sklearn.ensemble.RandomForestClassifier": {
        "n_estimators": lambda g: integer(5, 60, g),
        "max_depth": lambda g: integer(2, 12, g),
    },
    "sklearn.neighbors.KNeighborsClassifier": {"n_neighbors": lambda g: integer(1, 30, g)},
}
REGRESSORS = {
    "sklearn.linear_model.Ridge": {"alpha": lambda g: real(1e-3, 10.0, log=True, grid=g)},
    "sklearn.tree.DecisionTreeRegressor": {"max_depth": lambda g: integer(1, 20, g)},
    "sklearn.ensemble.RandomForestRegressor": {"n_estimators": lambda g: integer(5, 60, g)},
}
TORCH = {
    "hidden_layers": lambda g: st.one_of(
        st.lists(st.integers(1, 256), max_size=3),
        st.builds(
            lambda v: {"choice": v},
            st.lists(st.lists(st.integers(1, 256), min_size=1, max_size=3), min_size=1),
        ),
    ),
    "lr": lambda g: real(1e-5, 0.5, log=True, grid=g),
    "dropout": lambda g: real(0.0, 0.8, grid=g),
    "batch_size": lambda g: integer(1, 512, g),
    "epochs": lambda g: integer(1, 30, g),
    "weight_decay": lambda g: real(0.0, 0.1, grid=g),
}


@st.composite
def spaces(draw, params: dict, grid: bool) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(params)), unique=True))
    return {k: draw(params[k](grid)) for k in keys}


@st.composite
def models(draw, task: str, grid: bool, torch_only: bool = False) -> list[dict]:
    families = CLASSIFIERS if task == "classification" else REGRESSORS
    out = []
    for _ in range(draw(st.integers(1, 3))):
        if torch_only or draw(st.booleans()):
            model: dict[str, Any] = {"type": "torch_mlp"}
            if draw(st.booleans()):
                model["workers"] = draw(st.integers(1, 4))
            model["space"] = draw(spaces(TORCH, grid))
        else:
            estimator = draw(st.sampled_from(sorted(families)))
            model = {"type": "sklearn", "estimator": estimator}
            model["space"] = draw(spaces(families[estimator], grid))
        out.append(model)
    return out


def maybe(draw, section: dict) -> dict:
    """Each key of ``section`` kept or left to its default."""
    return {k: v for k, v in section.items() if draw(st.booleans())}


@st.composite
def valid_specs(draw) -> dict:
    task = draw(st.sampled_from(["classification", "regression"]))
    metrics = (
        ["accuracy", "f1_macro", "roc_auc", "log_loss"]
        if task == "classification"
        else ["rmse", "mae", "r2"]
    )
    scheduler = draw(st.sampled_from(["asha", "hyperband", "median", "none", "pbt"]))
    algorithms = ["random", "optuna", "hyperopt"] + ([] if scheduler == "pbt" else ["grid"])
    algorithm = draw(st.sampled_from(algorithms))
    grid = algorithm == "grid"
    spec_models = draw(models(task, grid, torch_only=scheduler == "pbt"))
    if scheduler == "pbt":  # pbt needs a distribution on a parameter it can mutate
        spec_models[0]["space"]["lr"] = {"loguniform": [1e-4, 1e-1]}
    source = draw(
        st.one_of(
            st.sampled_from(["sklearn:iris", "sklearn:wine", "sklearn:diabetes"]),
            st.builds(lambda w, x: f"/data/{w}{x}", WORD, st.sampled_from([".csv", ".parquet"])),
            st.builds(lambda w: f"s3://bucket/{w}.parquet", WORD),
        )
    )
    spec: dict[str, Any] = {
        "name": draw(NAME),
        "task": task,
        "data": {"source": source}
        | maybe(
            draw,
            {
                "target": draw(COLUMN),
                "features": draw(st.none() | st.lists(COLUMN, max_size=4)),
                "categorical": draw(st.lists(COLUMN, max_size=3)),
                "test_fraction": draw(st.floats(0.01, 0.8)),
                "valid_fraction": draw(st.floats(0.01, 0.8)),
                "seed": draw(st.integers(0, 2**31)),
            },
        ),
        "metric": draw(st.sampled_from(metrics)),
        "models": spec_models,
    }
    min_replicas = draw(st.integers(0, 4))
    sections = {
        "preprocess": {
            "impute": draw(st.sampled_from(["mean", "median", "most_frequent", "none"])),
            "clip_outliers": draw(st.none() | st.floats(0.1, 10.0)),
            "scale": draw(st.sampled_from(["standard", "minmax", "robust", "none"])),
        },
        "search": {
            "algorithm": algorithm,
            "scheduler": scheduler,
            "num_samples": draw(st.integers(1, 500)),
            "max_concurrent_trials": draw(st.none() | st.integers(1, 64)),
            "time_budget_s": draw(st.none() | st.floats(1.0, 1e5)),
            "cpus_per_trial": draw(st.floats(0.1, 8.0)),
            "max_failures": draw(st.integers(0, 5)),
        },
        "gate": {
            "min_metric": draw(st.none() | st.floats(-1e3, 1e3)),
            "must_beat_production": draw(st.booleans()),
            "min_improvement": draw(st.floats(0.0, 1.0)),
        },
        "serve": {
            "route": draw(NAME),
            "min_replicas": min_replicas,
            "max_replicas": draw(st.integers(max(1, min_replicas), 8)),
            "target_ongoing_requests": draw(st.floats(0.5, 64.0)),
            "max_queued_requests": draw(st.integers(1, 4096)),
            "max_batch_size": draw(st.integers(1, 512)),
            "batch_wait_timeout_s": draw(st.floats(0.0, 1.0)),
            "cpus_per_replica": draw(st.floats(0.1, 4.0)),
            "max_request_bytes": draw(st.integers(1024, 2**30)),
            "access_log": draw(st.booleans()),
        },
        "monitor": {
            "window": draw(st.integers(10, 100_000)),
            "sample_rate": draw(st.floats(0.01, 1.0)),
            "calibration_quantile": draw(st.floats(0.5, 0.999)),
            "cooldown_s": draw(st.floats(0.0, 1e5)),
        },
    }
    for key, section in sections.items():
        if draw(st.booleans()):
            spec[key] = maybe(draw, section)
    # the pbt/algorithm pair is drawn above: keep it when search is dropped or thinned
    if scheduler == "pbt":
        spec["search"] = {**spec.get("search", {}), "scheduler": "pbt", "algorithm": algorithm}
    elif grid:
        spec["search"] = {**spec.get("search", {}), "algorithm": "grid"}
    return spec


# --------------------------------------------------------------------------- bad values

NOT_A_NUMBER = st.one_of(
    st.sampled_from(["many", "", "1e", "ten"]), st.lists(st.integers(), max_size=2), st.just({})
)
NOT_A_STRING = st.one_of(st.integers(), st.lists(WORD, max_size=2), st.just({"a": 1}))
NOT_A_BOOL = st.one_of(st.sampled_from(["maybe", "2", "sometimes"]), st.just([]), st.just({}))
NOT_A_LIST = st.one_of(st.integers(), st.just({"a": "b"}))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def below(limit: float, integer: bool = False):
    if integer:
        return st.integers(max_value=int(math.ceil(limit)) - 1)
    return st.one_of(st.floats(max_value=limit, exclude_max=True, allow_nan=False), NON_FINITE)


def at_most(limit: float):
    return st.one_of(st.floats(max_value=limit, allow_nan=False), NON_FINITE)


def above(limit: float, inclusive: bool = False):
    return st.one_of(
        st.floats(min_value=limit, exclude_min=not inclusive, allow_nan=False), NON_FINITE
    )


def not_in(allowed: list[str]):
    return st.one_of(WORD.filter(lambda w: w not in allowed), NOT_A_STRING)


BAD_NAMES = st.one_of(
    st.sampled_from(["", "-lead", "has space", "a/b", "ü", ".x", "a:b"]), NOT_A_STRING
)
BAD_SOURCES = st.one_of(
    st.sampled_from(
        ["http://x/y.csv", "ftp://h/t.csv", "table.json", "", "sklearn:mnist", "sklearn:", "x.xlsx"]
    ),
    NOT_A_STRING,
)

# leaf key path -> values no spec may give it (numbers out of range include NaN and ±inf)
LEAVES: dict[str, Any] = {
    "name": BAD_NAMES,
    "task": not_in(["classification", "regression"]),
    "metric": not_in([]).filter(
        lambda w: w not in ("accuracy", "f1_macro", "roc_auc", "log_loss", "rmse", "mae", "r2")
    ),
    "data.source": BAD_SOURCES,
    "data.target": NOT_A_STRING,
    "data.features": st.one_of(NOT_A_LIST, st.lists(NOT_A_STRING, min_size=1, max_size=2)),
    "data.categorical": st.one_of(NOT_A_LIST, st.none()),
    "data.test_fraction": st.one_of(at_most(0.0), above(0.9, inclusive=True), NOT_A_NUMBER),
    "data.valid_fraction": st.one_of(at_most(0.0), above(0.9, inclusive=True), NOT_A_NUMBER),
    "data.seed": st.one_of(st.floats(0.1, 0.9), NOT_A_NUMBER),
    "preprocess.impute": not_in(["mean", "median", "most_frequent", "none"]),
    "preprocess.clip_outliers": st.one_of(at_most(0.0), NOT_A_NUMBER),
    "preprocess.scale": not_in(["standard", "minmax", "robust", "none"]),
    "search.algorithm": not_in(["random", "grid", "optuna", "hyperopt"]),
    "search.scheduler": not_in(["asha", "hyperband", "median", "pbt", "none"]),
    "search.num_samples": st.one_of(below(1, integer=True), NOT_A_NUMBER),
    "search.max_concurrent_trials": st.one_of(below(1, integer=True), NOT_A_NUMBER),
    "search.time_budget_s": st.one_of(at_most(0.0), NOT_A_NUMBER),
    "search.cpus_per_trial": st.one_of(at_most(0.0), NOT_A_NUMBER),
    "search.max_failures": st.one_of(below(0, integer=True), NOT_A_NUMBER),
    "gate.min_metric": st.one_of(NON_FINITE, NOT_A_NUMBER),
    "gate.must_beat_production": NOT_A_BOOL,
    "gate.min_improvement": st.one_of(below(0.0), NOT_A_NUMBER),
    "serve.route": BAD_NAMES,
    "serve.min_replicas": st.one_of(below(0, integer=True), NOT_A_NUMBER),
    "serve.max_replicas": st.one_of(below(1, integer=True), NOT_A_NUMBER),
    "serve.target_ongoing_requests": st.one_of(at_most(0.0), NOT_A_NUMBER),
    "serve.max_queued_requests": st.one_of(below(1, integer=True), NOT_A_NUMBER),
    "serve.max_batch_size": st.one_of(below(1, integer=True), NOT_A_NUMBER),
    "serve.batch_wait_timeout_s": st.one_of(below(0.0), NOT_A_NUMBER),
    "serve.cpus_per_replica": st.one_of(at_most(0.0), NOT_A_NUMBER),
    "serve.max_request_bytes": st.one_of(below(1024, integer=True), NOT_A_NUMBER),
    "serve.access_log": NOT_A_BOOL,
    "monitor.window": st.one_of(below(10, integer=True), NOT_A_NUMBER),
    "monitor.sample_rate": st.one_of(at_most(0.0), above(1.0), NOT_A_NUMBER),
    "monitor.calibration_quantile": st.one_of(below(0.5), above(1.0, inclusive=True), NOT_A_NUMBER),
    "monitor.cooldown_s": st.one_of(below(0.0), NOT_A_NUMBER),
}
SECTIONS = ["data", "preprocess", "search", "gate", "serve", "monitor"]
# values no torch_mlp parameter takes, per parameter (constants, choices, range ends)
BAD_TORCH = {
    "hidden_layers": st.one_of(
        st.integers(), st.lists(st.integers(max_value=0), min_size=1), st.just(["64"])
    ),
    "lr": st.one_of(at_most(0.0).map(lambda v: v if math.isfinite(v) else -1.0), st.just("fast")),
    "dropout": st.one_of(
        st.sampled_from([-0.1, 1.0, 1.5]), st.just({"uniform": [0.5, 1.5]}), st.just("half")
    ),
    "batch_size": st.one_of(
        st.integers(max_value=0), st.just({"uniform": [8.0, 64.0]}), st.just({"choice": [32, 0]})
    ),
    "epochs": st.one_of(st.integers(max_value=0), st.just(2.5), st.just("ten")),
    "weight_decay": st.one_of(st.just(-1e-3), st.just({"choice": [0.0, -1.0]})),
}
# scikit-learn rejects these in its own parameter checks (what fit would raise in a trial)
BAD_SKLEARN = {
    "sklearn.linear_model.LogisticRegression": {
        "C": st.one_of(st.just(0.0), st.just(-1.0), st.just("abc"), st.just({"choice": [1, -1]})),
        "max_iter": st.one_of(st.just(-5), st.just("long")),
    },
    "sklearn.tree.DecisionTreeClassifier": {
        "max_depth": st.one_of(st.just(0), st.just({"uniform": [2.0, 9.0]}), st.just("deep")),
        "min_samples_leaf": st.one_of(st.just(0), st.just({"randint": [-3, 2]})),
    },
    "sklearn.ensemble.RandomForestClassifier": {
        "n_estimators": st.one_of(st.just(0), st.just({"randint": [0, 5]}))
    },
    "sklearn.neighbors.KNeighborsClassifier": {"n_neighbors": st.one_of(st.just(0), st.just(1.5))},
    "sklearn.linear_model.Ridge": {"alpha": st.one_of(st.just(-1.0), st.just("strong"))},
    "sklearn.tree.DecisionTreeRegressor": {"max_depth": st.one_of(st.just(-1), st.just([3]))},
    "sklearn.ensemble.RandomForestRegressor": {"n_estimators": st.one_of(st.just(-2))},
}


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def put(raw: dict, path: tuple, value: Any) -> None:
    node = raw
    for p in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(p, {})
        else:
            node = node[p]
    node[path[-1]] = value


def remove(raw: dict, path: tuple) -> None:
    node = raw
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


def refusal(raw: Any) -> list[str]:
    """The problems ``parse_spec`` refuses ``raw`` with (any other outcome fails)."""
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return info.value.problems


def names(problems: list[str], path: str) -> bool:
    """Whether one problem is about ``path`` (or a key below it)."""
    return any(p.startswith((f"{path}:", f"{path}.")) for p in problems)


# --------------------------------------------------------------------------- tests


@FUZZ
@given(valid_specs())
def test_a_valid_spec_parses_and_survives_a_yaml_round_trip(raw: dict) -> None:
    spec = parse_spec(copy.deepcopy(raw))
    assert spec.name == raw["name"] and len(spec.models) == len(raw["models"])
    assert parse_spec(yaml.safe_load(spec_to_yaml(spec))) == spec


@FUZZ
@given(valid_specs(), st.sampled_from(sorted(LEAVES)), st.data())
def test_a_bad_value_is_refused_naming_its_key(raw: dict, leaf: str, data) -> None:
    value = data.draw(LEAVES[leaf], label=leaf)
    put(raw, tuple(leaf.split(".")), value)
    problems = refusal(raw)
    assert names(problems, leaf), (leaf, value, problems)


@FUZZ
@given(valid_specs(), st.data())
def test_an_unknown_key_is_refused_by_its_path(raw: dict, data) -> None:
    mappings = [()] + [(s,) for s in SECTIONS] + [("models", i) for i in range(len(raw["models"]))]
    where = data.draw(st.sampled_from(mappings), label="mapping")
    key = data.draw(WORD.filter(lambda w: w not in _known_keys(where, raw)), label="key")
    put(raw, (*where, key), 1)
    assert f"{dotted((*where, key))}: unknown key" in refusal(raw)


def _known_keys(where: tuple, raw: dict) -> set[str]:
    from training.spec import SklearnSpec, Spec, TorchMLPSpec

    if not where:
        return set(Spec.model_fields)
    if where[0] == "models":
        kind = raw["models"][where[1]]["type"]
        return set((TorchMLPSpec if kind == "torch_mlp" else SklearnSpec).model_fields)
    return set(Spec.model_fields[where[0]].annotation.model_fields)


REQUIRED = [("name",), ("task",), ("data",), ("metric",), ("models",), ("data", "source")]


@FUZZ
@given(valid_specs(), st.data())
def test_a_missing_required_key_is_named(raw: dict, data) -> None:
    required = REQUIRED + [("models", i, "type") for i in range(len(raw["models"]))]
    required += [
        ("models", i, "estimator") for i, m in enumerate(raw["models"]) if m["type"] == "sklearn"
    ]
    path = data.draw(st.sampled_from(required), label="path")
    remove(raw, path)
    assert names(refusal(raw), dotted(path))


@FUZZ
@given(valid_specs(), st.data())
def test_a_model_entry_of_the_wrong_shape_is_named(raw: dict, data) -> None:
    i = data.draw(st.integers(0, len(raw["models"]) - 1), label="model")
    kind = data.draw(st.sampled_from(["tag", "entry", "space", "list"]), label="kind")
    if kind == "tag":
        raw["models"][i]["type"] = data.draw(not_in(["torch_mlp", "sklearn"]))
        path = f"models.{i}.type"
    elif kind == "entry":
        raw["models"][i] = data.draw(st.one_of(NOT_A_STRING, st.none()))
        path = f"models.{i}"
    elif kind == "space":
        raw["models"][i]["space"] = data.draw(st.one_of(NOT_A_LIST, st.lists(WORD), st.none()))
        path = f"models.{i}.space"
    else:
        raw["models"] = data.draw(st.one_of(st.just([]), st.just({}), st.integers()))
        path = "models"
    assert names(refusal(raw), path)


LINEAR_REGRESSION = "sklearn.linear_model.LinearRegression"
ESTIMATOR_PATHS = st.one_of(
    st.sampled_from(
        [
            "os.system",
            "builtins.eval",
            "subprocess.Popen",
            "posix.system",
            "pickle.loads",
            "torch.nn.Linear",
            "numpy.linalg.inv",
            "sklearn",
            "sklearn.",
            "sklearn..LogisticRegression",
            "sklearn.linear_model",
            "sklearn.linear_model._logistic._logistic_regression_path",
            "sklearn.base.BaseEstimator.__init__",
            "sklearn.utils.Bunch",
            "sklearn.datasets.load_iris",
            "sklearn.base.ClassifierMixin",
            "sklearn.pipeline.Pipeline",
            "sklearn.preprocessing.StandardScaler",
            "sklearn.decomposition.PCA",
            LINEAR_REGRESSION,  # a regressor: refused for classification
            "sklearn.svm.LinearSVC",
            " sklearn.linear_model.LogisticRegression",
            "sklearn.linear_model.LogisticRegression\x00",
        ]
    ),
    st.builds(lambda a, b: f"sklearn.{a}.{b}", WORD, WORD),
    st.text(max_size=40),
    NOT_A_STRING,
)


@FUZZ
@given(valid_specs(), ESTIMATOR_PATHS, st.data())
def test_an_estimator_outside_the_allowed_set_is_refused_naming_it(
    raw: dict, estimator: Any, data
) -> None:
    assume(not (raw["task"] == "regression" and estimator == LINEAR_REGRESSION))
    i = data.draw(st.integers(0, len(raw["models"]) - 1), label="model")
    raw["models"][i] = {"type": "sklearn", "estimator": estimator}
    problems = refusal(raw)
    assert names(problems, f"models.{i}.estimator") or names(problems, "search.scheduler"), problems


@FUZZ
@given(valid_specs(), st.data())
def test_a_space_value_no_trial_could_run_is_refused_naming_the_parameter(raw: dict, data) -> None:
    i = data.draw(st.integers(0, len(raw["models"]) - 1), label="model")
    model = raw["models"][i]
    if model["type"] == "torch_mlp":
        key = data.draw(st.sampled_from(sorted(BAD_TORCH)), label="param")
        value = data.draw(BAD_TORCH[key], label="value")
    else:
        bad = BAD_SKLEARN[model["estimator"]]
        key = data.draw(st.sampled_from(sorted(bad)), label="param")
        value = data.draw(bad[key], label="value")
    model["space"][key] = value
    if raw.get("search", {}).get("algorithm") == "grid" and isinstance(value, dict):
        raw["search"]["algorithm"] = "random"  # else grid's own refusal of ranges may come first
    problems = refusal(raw)
    assert names(problems, f"models.{i}.space.{key}"), (key, value, problems)


@FUZZ
@given(valid_specs(), st.data())
def test_every_broken_section_is_named_at_once(raw: dict, data) -> None:
    """Two keys broken in two sections: one refusal names both (a user fixes all at once)."""
    first, second = data.draw(
        st.lists(st.sampled_from(SECTIONS[1:]), min_size=2, max_size=2, unique=True)
    )
    leaves = []
    for section in (first, second):
        leaf = data.draw(st.sampled_from([k for k in LEAVES if k.startswith(f"{section}.")]))
        put(raw, tuple(leaf.split(".")), data.draw(LEAVES[leaf]))
        leaves.append(leaf)
    problems = refusal(raw)
    assert all(names(problems, leaf) for leaf in leaves), (leaves, problems)


@FUZZ
@given(valid_specs(), st.data())
def test_inconsistent_choices_are_refused_naming_the_key(raw: dict, data) -> None:
    kind = data.draw(st.sampled_from(["metric", "replicas", "pbt", "grid"]))
    if kind == "metric":  # a metric of the other task
        raw["metric"] = "rmse" if raw["task"] == "classification" else "accuracy"
        path = "metric"
    elif kind == "replicas":
        raw["serve"] = {"min_replicas": data.draw(st.integers(2, 9)), "max_replicas": 1}
        path = "serve"
    elif kind == "pbt":
        raw["search"] = {"scheduler": "pbt", "algorithm": "random"}
        raw["models"].append(
            {"type": "sklearn", "estimator": "sklearn.tree.DecisionTreeClassifier"}
            if raw["task"] == "classification"
            else {"type": "sklearn", "estimator": "sklearn.linear_model.Ridge"}
        )
        path = "search.scheduler"
    else:
        raw["search"] = {"algorithm": "grid", "scheduler": "asha"}
        raw["models"][0]["space"] = {}
        if raw["models"][0]["type"] == "torch_mlp":
            raw["models"][0]["space"]["lr"] = {"loguniform": [1e-4, 1e-2]}
            path = "models.0.space.lr"
        else:
            key, make = next(iter(_families(raw["task"])[raw["models"][0]["estimator"]].items()))
            raw["models"][0]["space"][key] = data.draw(make(False).filter(_is_range))
            path = f"models.0.space.{key}"
    assert names(refusal(raw), path)


def _families(task: str) -> dict:
    return CLASSIFIERS if task == "classification" else REGRESSORS


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and ("choice" not in value)


# --------------------------------------------------------------------------- spec files


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_file_is_a_spec_or_a_refusal(tmp_path_factory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_bytes(content)
    try:
        load_spec(path)
    except SpecError as exc:
        assert exc.problems and all(": " in p for p in exc.problems)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[" * 5000, "spec: not valid YAML: nested too deeply"),
        (b"\xff\xfe\x00name: x", "is not UTF-8 text"),
        (b"name: a\ntask: classification\nname: b\n", "found the key 'name' twice (line 3"),
        (b"name: [a\n", "spec: not valid YAML: expected ',' or ']'"),
        (b"search:\n  num_samples: 2\nsearch:\n  num_samples: 3\n", "the key 'search' twice"),
    ],
)
def test_a_file_that_is_no_yaml_mapping_is_refused_in_one_line(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert expected in problem and "\n" not in problem


FLOAT_LEAVES = [
    "data.test_fraction",
    "data.valid_fraction",
    "preprocess.clip_outliers",
    "search.time_budget_s",
    "search.cpus_per_trial",
    "gate.min_metric",
    "gate.min_improvement",
    "serve.target_ongoing_requests",
    "serve.batch_wait_timeout_s",
    "serve.cpus_per_replica",
    "monitor.sample_rate",
    "monitor.calibration_quantile",
    "monitor.cooldown_s",
    "models.0.space.C",
    "models.0.space.C.loguniform.1",
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("leaf", FLOAT_LEAVES)
def test_nan_and_infinity_are_refused_in_every_number(leaf: str, value: float) -> None:
    """YAML's .nan and .inf: no setting means "unset" or "unbounded" by them (null does)."""
    from specs import churn_spec

    raw = churn_spec("d.csv")
    path = tuple(int(p) if p.isdigit() else p for p in leaf.split("."))
    put(raw, path, value)
    assert names(refusal(raw), leaf.removesuffix(".loguniform.1"))
