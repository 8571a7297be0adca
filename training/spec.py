"""The experiment spec: parsing and validation of the YAML that drives a search.

Everything a spec can be wrong about is checked here, before any data is read or
Ray is started: unknown keys, wrong types, impossible values and combinations
(a regression metric on a classification task, PBT over a scikit-learn family,
an estimator outside scikit-learn). Errors name the key path and what is allowed.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine", "diabetes", "iris")
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "roc_auc", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")
PBT_MUTABLE = ("lr", "dropout", "weight_decay")
TORCH_MLP_PARAMS = ("hidden_layers", "lr", "dropout", "batch_size", "epochs", "weight_decay")


class SpecError(ValueError):
    """A spec was refused; ``problems`` holds one ``"key.path: what is allowed"`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid spec: " + "; ".join(problems))


class _Strict(BaseModel):
    # NaN and ±inf are refused in every float field (YAML's .nan / .inf): no setting means
    # "unbounded" or "unset" by them (null does), and a NaN compares false to everything.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Choice(_Strict):
    choice: list[Any] = Field(min_length=1)


class Uniform(_Strict):
    uniform: tuple[float, float]

    @property
    def bounds(self) -> tuple[float, float]:
        return self.uniform


class LogUniform(_Strict):
    loguniform: tuple[float, float]

    @field_validator("loguniform")
    @classmethod
    def _positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0:
            raise ValueError("loguniform bounds must be > 0")
        return v

    @property
    def bounds(self) -> tuple[float, float]:
        return self.loguniform


class RandInt(_Strict):
    randint: tuple[int, int]

    @property
    def bounds(self) -> tuple[int, int]:
        return self.randint


Range = Uniform | LogUniform | RandInt  # the distributions with (low, high) bounds
Distribution = Choice | Range
# A space value is a distribution or a constant (a number, string, bool or list).
SpaceValue = Distribution | bool | int | float | str | list[Any] | None


def _check_bounds(space: dict[str, SpaceValue], prefix: str = "") -> dict[str, SpaceValue]:
    """Every range's low < high; errors name ``prefix`` + the key (``space.`` where the
    validator's own location is the model, not its space)."""
    for key, value in space.items():
        if isinstance(value, Range) and not value.bounds[0] < value.bounds[1]:
            raise ValueError(
                f"{prefix}{key}: lower bound must be below upper bound, got {list(value.bounds)}"
            )
    return space


def _trial_values(value: SpaceValue) -> list[Any]:
    """Values standing for what a trial can get from a space value: a constant itself,
    every choice, and a range's extremes (a randint's upper bound is exclusive in Tune;
    a float range's ends are nudged inward, as Tune samples inside them)."""
    if isinstance(value, Choice):
        return list(value.choice)
    if isinstance(value, RandInt):
        low, high = value.randint
        return [low, high - 1]
    if isinstance(value, Uniform | LogUniform):
        low, high = value.bounds
        return [math.nextafter(low, high), math.nextafter(high, low)]
    return [value]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# What each torch_mlp parameter takes (training.torch_train), checked on every value a
# trial can get so that a bad one is refused here rather than in a trial on Ray.
TORCH_PARAM_CHECKS: dict[str, tuple[Any, str]] = {
    "hidden_layers": (
        lambda v: isinstance(v, list) and all(_count(h) for h in v),
        "a list of layer widths (integers >= 1)",
    ),
    "lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "batch_size": (_count, "an integer >= 1"),
    "epochs": (_count, "an integer >= 1"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
}


class DataSpec(_Strict):
    source: str
    target: str = "target"
    features: list[str] | None = None
    categorical: list[str] = []
    test_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    valid_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    seed: int = 0

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("sklearn:"):
            if v.split(":", 1)[1] not in SKLEARN_DATASETS:
                raise ValueError(f"sklearn:<set> must name one of {', '.join(SKLEARN_DATASETS)}")
            return v
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("", "file", "s3"):
            raise ValueError("a path, file:// or s3:// URI, or sklearn:<bundled set>")
        if not v.lower().endswith((".csv", ".parquet")):
            raise ValueError("a .csv or .parquet file, or sklearn:<bundled set>")
        return v


class PreprocessSpec(_Strict):
    impute: Literal["mean", "median", "most_frequent", "none"] = "median"
    clip_outliers: float | None = Field(4.0, gt=0.0)
    scale: Literal["standard", "minmax", "robust", "none"] = "standard"


class TorchMLPSpec(_Strict):
    type: Literal["torch_mlp"]
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    space: dict[str, SpaceValue] = {}

    @field_validator("space")
    @classmethod
    def _known_params(cls, v: dict[str, SpaceValue]) -> dict[str, SpaceValue]:
        unknown = sorted(set(v) - set(TORCH_MLP_PARAMS))
        if unknown:
            raise ValueError(
                f"unknown torch_mlp parameter(s) {unknown}; allowed: {list(TORCH_MLP_PARAMS)}"
            )
        _check_bounds(v)
        for key, value in v.items():
            check, expected = TORCH_PARAM_CHECKS[key]
            for x in _trial_values(value):
                if not check(x):
                    raise ValueError(f"{key}: expected {expected}, got {x!r}")
        return v


class SklearnSpec(_Strict):
    type: Literal["sklearn"]
    estimator: str
    space: dict[str, SpaceValue] = {}

    @field_validator("estimator")
    @classmethod
    def _scikit_learn_only(cls, v: str) -> str:
        resolve_estimator(v)
        return v

    @model_validator(mode="after")
    def _known_params(self) -> SklearnSpec:
        try:
            allowed = set(instantiate(self.estimator).get_params())
        except ValueError as exc:
            raise ValueError(f"estimator: {exc}") from None
        unknown = sorted(set(self.space) - allowed)
        if unknown:
            raise ValueError(
                f"space: {self.estimator} has no parameter(s) {unknown}; allowed: {sorted(allowed)}"
            )
        _check_bounds(self.space, "space.")
        _check_sklearn_values(self.estimator, self.space)
        return self


ModelSpec = Annotated[TorchMLPSpec | SklearnSpec, Field(discriminator="type")]


class SearchSpec(_Strict):
    algorithm: Literal["random", "grid", "optuna", "hyperopt"] = "optuna"
    scheduler: Literal["asha", "hyperband", "median", "pbt", "none"] = "asha"
    num_samples: int = Field(20, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    cpus_per_trial: float = Field(1, gt=0)
    max_failures: int = Field(2, ge=0)


class GateSpec(_Strict):
    min_metric: float | None = None
    must_beat_production: bool = True
    # The candidate must beat production's holdout score by at least this much (in the
    # metric's direction); 0: any strict improvement.
    min_improvement: float = Field(0.0, ge=0)


class MonitorSpec(_Strict):
    """Drift on live traffic, and when to retrain (see training.drift)."""

    window: int = Field(1000, ge=10)  # rows in the sliding window (per model, all replicas)
    sample_rate: float = Field(1.0, gt=0.0, le=1.0)  # share of requests counted
    # alert level: this quantile of the statistic on holdout windows of `window` rows
    calibration_quantile: float = Field(0.99, ge=0.5, lt=1.0)
    cooldown_s: float = Field(3600.0, ge=0)  # no second `retrain --if-drifted` within it


class ServeSpec(_Strict):
    route: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    max_queued_requests: int = Field(256, ge=1)
    max_batch_size: int = Field(64, ge=1)
    # 0: a lone request runs at once; under load, batches form while the graph runs. On
    # the native ingress it beat 5 ms at every concurrency measured (docs/serving.md).
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(1, gt=0)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # larger bodies get 413
    access_log: bool = False  # a log line per request from each replica (~0.4 ms CPU each)

    @model_validator(mode="after")
    def _replicas(self) -> ServeSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: Literal["classification", "regression"]
    data: DataSpec
    preprocess: PreprocessSpec = PreprocessSpec()
    metric: Literal["accuracy", "f1_macro", "roc_auc", "log_loss", "rmse", "mae", "r2"]
    models: list[ModelSpec] = Field(min_length=1)
    search: SearchSpec = SearchSpec()
    gate: GateSpec = GateSpec()
    serve: ServeSpec = ServeSpec()
    monitor: MonitorSpec = MonitorSpec()

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        allowed = CLASSIFICATION_METRICS if self.task == "classification" else REGRESSION_METRICS
        if self.metric not in allowed:
            raise ValueError(f"metric: {self.task} allows {', '.join(allowed)}")
        if self.search.scheduler == "pbt":
            if any(m.type != "torch_mlp" for m in self.models):
                raise ValueError("search.scheduler: pbt needs every model to be torch_mlp")
            if self.search.algorithm == "grid":
                raise ValueError(
                    "search.scheduler: pbt explores by mutating parameters, a grid does not; "
                    "use algorithm random, optuna or hyperopt"
                )
            if not any(
                isinstance(m.space.get(k), Distribution) for m in self.models for k in PBT_MUTABLE
            ):
                raise ValueError(
                    "search.scheduler: pbt mutates lr, dropout or weight_decay; give at least "
                    "one of them a distribution in a torch_mlp space"
                )
        for i, model in enumerate(self.models):
            if model.type == "sklearn":
                _check_estimator_task(model, self.task, f"models.{i}.estimator")
            if self.search.algorithm == "grid":
                for key, value in model.space.items():
                    if isinstance(value, Range):
                        raise ValueError(
                            f"models.{i}.space.{key}: search.algorithm grid takes only "
                            "{choice: [...]} or constant values"
                        )
        return self

    @property
    def route(self) -> str:
        return self.serve.route or self.name

    @property
    def mode(self) -> Literal["max", "min"]:
        return "min" if self.metric in ("log_loss", "rmse", "mae") else "max"


def resolve_estimator(path: str) -> type:
    """Import a scikit-learn estimator class by dotted path, refusing anything else.

    Only modules under ``sklearn.`` are ever imported, so a spec cannot run code of
    its own choosing.
    """
    module_name, _, class_name = path.rpartition(".")
    if not module_name.startswith("sklearn.") or class_name.startswith("_"):
        raise ValueError(
            f"{path!r} is not a scikit-learn estimator; expected sklearn.<module>.<Estimator>"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # not there, or a module that fails on import (any error)
        raise ValueError(f"{path!r} does not exist in scikit-learn") from exc
    from sklearn.base import BaseEstimator

    if not (inspect.isclass(cls) and issubclass(cls, BaseEstimator)):
        raise ValueError(f"{path!r} is not a scikit-learn estimator class")
    return cls


def _check_sklearn_values(path: str, space: dict[str, SpaceValue]) -> None:
    """Every value a trial can get (see ``_trial_values``), checked by scikit-learn's own
    parameter validation: the error ``fit`` would raise in a trial on Ray, raised here
    instead. Uses the estimator's ``_validate_params`` (scikit-learn >= 1.2; private, but
    it is the one place the constraints live); an estimator without constraints is not
    checked."""
    cls = resolve_estimator(path)
    if getattr(cls, "_parameter_constraints", None) is None:
        return
    for key, value in space.items():
        for x in _trial_values(value):
            try:
                cls(**{key: x})._validate_params()
            except Exception as exc:  # InvalidParameterError: a ValueError and a TypeError
                raise ValueError(f"space.{key}: {exc}") from None


def instantiate(path: str, params: dict[str, Any] | None = None):
    """An estimator of the class at ``path`` with ``params``; a class that cannot be built
    from parameters alone (a meta-estimator needing estimators) is refused."""
    try:
        return resolve_estimator(path)(**(params or {}))
    except TypeError as exc:
        raise ValueError(
            f"{path} cannot be built from parameters alone ({exc}); "
            "meta-estimators such as pipelines and ensembles of estimators are not supported"
        ) from None


def _check_estimator_task(model: SklearnSpec, task: str, where: str) -> None:
    """The estimator must be the task's kind; a classifier must give probabilities
    (the artifact's contract) with the space's constant parameters."""
    from sklearn.base import is_classifier, is_regressor

    constants = {k: v for k, v in model.space.items() if not isinstance(v, Distribution)}
    est = instantiate(model.estimator, constants)
    ok = is_classifier(est) if task == "classification" else is_regressor(est)
    if not ok:
        kind = "classifier" if task == "classification" else "regressor"
        raise ValueError(f"{where}: {model.estimator} is not a {kind}, which task {task} needs")
    if task == "classification" and not hasattr(est, "predict_proba"):
        raise ValueError(
            f"{where}: {model.estimator} gives no class probabilities (predict_proba) with "
            "these parameters; choose a probabilistic classifier or set its option "
            "(e.g. probability: true for SVC, loss: log_loss for SGDClassifier)"
        )


def _format_errors(exc: ValidationError) -> list[str]:
    """One line per bad key: its dotted path and what is allowed.

    A space value is a union (a distribution or a constant), which pydantic reports
    once per branch; the branch's own complaint (``loguniform bounds must be > 0``) is
    kept when there is one, else one line says what a space value may be.
    """
    problems: dict[str, list[tuple[str, str]]] = {}
    for err in exc.errors():
        loc = [
            str(p)
            for i, p in enumerate(err["loc"])
            if not (isinstance(p, str) and (p in UNION_TAGS or "[" in p))
            and not (p in MODEL_TYPES and i > 0 and isinstance(err["loc"][i - 1], int))
        ]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # models.N: the discriminator itself is the bad key
            loc.append(err["ctx"]["discriminator"].strip("'"))
            got = "missing" if err["type"] == "union_tag_not_found" else repr(err["ctx"]["tag"])
            msg = f"expected one of {', '.join(sorted(MODEL_TYPES))}, got {got}"
        if "space" in loc[:-1] and len(loc) > loc.index("space") + 1:
            group = ".".join(loc[: loc.index("space") + 2])  # models.N.space.KEY
        else:
            group = ".".join(loc) or "spec"
        problems.setdefault(group, []).append((".".join(loc) or "spec", msg, err["type"]))
    lines = []
    for group, errs in problems.items():
        own = [
            (path, msg)
            for path, msg, kind in errs
            if kind not in ("missing", "extra_forbidden") and not kind.endswith("_type")
        ]
        if ".space." not in f"{group}." or len(errs) == 1:
            lines.append(_join(*errs[0][:2]))  # one line per key
        elif own:
            lines += [_join(path, msg) for path, msg in own]
        else:
            lines.append(f"{group}: {SPACE_VALUE_HELP}")
    return list(dict.fromkeys(lines))


def _join(path: str, msg: str) -> str:
    """``spec`` + ``models.0.estimator: ...`` → ``models.0.estimator: ...``;
    ``models.0`` + ``space: ...`` → ``models.0.space: ...`` (validators name their key)."""
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", head):
        return f"{head}: {rest}" if path == "spec" else f"{path}.{head}: {rest}"
    return f"{path}: {msg}"


SPACE_VALUE_HELP = (
    "expected a constant (number, string, bool, list) or one of {choice: [...]}, "
    "{uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]}"
)
UNION_TAGS = {
    "Choice",
    "Uniform",
    "LogUniform",
    "RandInt",
    "TorchMLPSpec",
    "SklearnSpec",
    "bool",
    "int",
    "float",
    "str",
    "list[any]",
    "none",
    "tagged-union",
}
MODEL_TYPES = {"torch_mlp", "sklearn"}  # discriminator tags pydantic puts after models.N


def parse_spec(raw: Any) -> Spec:
    """Validate an already-loaded YAML document into a :class:`Spec`."""
    if not isinstance(raw, dict):
        raise SpecError(["spec: expected a mapping of keys (name, task, data, ...)"])
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raises :class:`SpecError` naming each bad key.

    A relative ``data.source`` path is relative to the spec file's folder (as in
    kustomize or compose files), so a spec runs from any working directory.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"spec: cannot read {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        problem = f"spec: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise SpecError([problem]) from None
    try:
        raw = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError([f"spec: not valid YAML: {_yaml_problem(exc)}"]) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise SpecError(["spec: not valid YAML: nested too deeply"]) from None
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        source = raw["data"].get("source")
        if isinstance(source, str) and _is_relative_path(source):
            raw["data"]["source"] = str((Path(path).parent / source).resolve())
    return parse_spec(raw)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line, with where it is (its own text spans five)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


class _SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping (plain
    YAML keeps the last one silently: a second ``search:`` would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found the key {key_node.value!r} twice",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def spec_to_yaml(spec: Spec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=False), sort_keys=False)


def _is_relative_path(source: str) -> bool:
    return not (source.startswith("sklearn:") or "://" in source or Path(source).is_absolute())
