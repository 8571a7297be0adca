"""Data: load a table, type its columns, split it, hash it and profile it.

A feature has two names. ``column`` is the table's own (``"mean radius"``): clients
send it and metadata shows it. ``name`` is the ONNX-safe one (:func:`safe_name`,
``"mean_radius"``): the graph's input, the key of the typed frames (``Splits.X_*``), of
the profile and of everything inside training. The table keeps its column names when
loaded; :func:`prepare` renames the features, and refuses a table where two columns
would get the same safe name.

Column typing is fixed here once for training and serving alike: numeric features
become float32 (missing values stay NaN, for the imputer); categorical features
become strings, and a missing categorical value becomes the empty string, which
the one-hot encoder treats as a category of its own when seen in training and as
unknown (all zeros) otherwise.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from training.categories import MISSING_CATEGORY, category_text
from training.spec import DataSpec


class DataError(ValueError):
    """The data does not fit the spec; the message names the spec key or column."""


@dataclass(frozen=True)
class Feature:
    """One model input: ``name`` is the ONNX input name (``[A-Za-z0-9_]``), ``column`` the
    data's own column name (spaces and all). Schemas written before ``column`` existed
    read back with ``column == name``."""

    name: str
    dtype: str  # "float" or "string"
    categories: list[str] | None = None
    column: str | None = None  # None: the same as name

    def __post_init__(self) -> None:
        if self.column is None:
            object.__setattr__(self, "column", self.name)


@dataclass(frozen=True)
class FeatureSchema:
    """What the model takes and gives: the contract between training and serving."""

    task: str
    target: str
    features: list[Feature]
    classes: list[Any] | None = None  # class labels, in probability-column order

    @property
    def names(self) -> list[str]:
        """ONNX input names, in feature order."""
        return [f.name for f in self.features]

    @property
    def columns(self) -> list[str]:
        """The data's own column names, in feature order."""
        return [f.column for f in self.features]

    @property
    def numeric(self) -> list[str]:
        return [f.name for f in self.features if f.dtype == "float"]

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features if f.dtype == "string"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        return cls(
            task=d["task"],
            target=d["target"],
            features=[Feature(**f) for f in d["features"]],
            classes=d.get("classes"),
        )


@dataclass
class Splits:
    """Train / valid / test frames of typed features and their targets."""

    X_train: pd.DataFrame
    y_train: pd.Series
    X_valid: pd.DataFrame
    y_valid: pd.Series
    X_test: pd.DataFrame
    y_test: pd.Series
    schema: FeatureSchema
    content_hash: str
    extra: dict[str, Any] = field(default_factory=dict)


def safe_name(column: str) -> str:
    """A column name as the ONNX graph knows it: [A-Za-z0-9_] only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(column))


def onnx_names(columns: list[str]) -> dict[str, str]:
    """Each column's ONNX-safe name; DataError naming the columns when two would share one."""
    safe: dict[str, list[str]] = {}
    for column in columns:
        safe.setdefault(safe_name(column), []).append(column)
    clashes = {name: cols for name, cols in safe.items() if len(cols) > 1}
    if clashes:
        listed = "; ".join(
            " and ".join(repr(c) for c in cols) + f" both become {name!r}"
            for name, cols in clashes.items()
        )
        raise DataError(
            f"data.source: columns whose ONNX input names collide ({listed}; only "
            "[A-Za-z0-9_] is kept, the rest becomes '_'): rename one of each"
        )
    return {column: safe_name(column) for column in columns}


def load_frame(source: str) -> pd.DataFrame:
    """Read ``sklearn:<set>``, a local path, ``file://`` or ``s3://`` CSV/Parquet into a frame.

    Column names are kept as the data has them (as strings); DataError when two of them
    would get the same ONNX-safe name (:func:`onnx_names`).
    """
    frame = _read(source)
    frame.columns = [str(c) for c in frame.columns]
    if len(set(frame.columns)) != len(frame.columns):
        dup = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
        raise DataError(f"data.source: column name(s) {dup} appear more than once")
    onnx_names(list(frame.columns))
    return frame


def _read(source: str) -> pd.DataFrame:
    if source.startswith("sklearn:"):
        import sklearn.datasets

        name = source.split(":", 1)[1]
        bunch = getattr(sklearn.datasets, f"load_{name}")(as_frame=True)
        return bunch.frame
    path = source.removeprefix("file://")
    reader = pd.read_parquet if path.lower().endswith(".parquet") else pd.read_csv
    try:
        return reader(path)
    except FileNotFoundError:
        raise DataError(f"data.source: no such file {path}") from None
    except ImportError as exc:  # s3:// without s3fs
        raise DataError(f"data.source: {exc}; install rayship[s3] for s3:// URIs") from None


def content_hash(frame: pd.DataFrame) -> str:
    """A sha256 over column names, dtypes and every value, independent of the file format."""
    h = hashlib.sha256()
    h.update(repr([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()


def type_features(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """Cast features to the serving dtypes: float32 numerics, string categoricals ('' = missing)."""
    out = {}
    for name in numeric:
        out[name] = pd.to_numeric(frame[name], errors="raise").astype("float32")
    for name in categorical:
        out[name] = frame[name].astype(object).map(category_text).astype(str)
    return pd.DataFrame(out, index=frame.index)[list(frame.columns.intersection(out.keys()))]


def _resolve(frame: pd.DataFrame, name: str) -> str | None:
    """The frame's column a spec names: by the data's own name, or by its ONNX-safe name."""
    if name in frame.columns:
        return name
    wanted = safe_name(name)
    return next((c for c in frame.columns if safe_name(c) == wanted), None)


def _choose_columns(frame: pd.DataFrame, spec: DataSpec) -> tuple[str, list[str], list[str]]:
    """(target, features in order, categorical features), as the frame's column names."""
    columns = list(frame.columns)
    target = _resolve(frame, spec.target)
    if target is None:
        raise DataError(f"data.target: no column {spec.target!r} in the data (columns: {columns})")
    wanted = list(spec.features) if spec.features else [c for c in columns if c != target]
    resolved = {n: _resolve(frame, n) for n in [*wanted, *spec.categorical]}
    missing = [n for n, c in resolved.items() if c is None]
    if missing:
        raise DataError(f"data.features/categorical: no column(s) {missing} in the data")
    features = [resolved[n] for n in wanted]
    if target in features:
        raise DataError(f"data.features: the target {spec.target!r} cannot be a feature")
    wanted_categorical = {resolved[n] for n in spec.categorical}
    categorical = [c for c in features if c in wanted_categorical]
    for name in features:
        if name in wanted_categorical:
            continue
        if not pd.api.types.is_numeric_dtype(frame[name]) and not pd.api.types.is_bool_dtype(
            frame[name]
        ):
            raise DataError(
                f"data.categorical: column {name!r} holds non-numeric values; "
                "list it in data.categorical"
            )
    return target, features, categorical


def _label_values(y: pd.Series) -> tuple[pd.Series, list[Any]]:
    """Class labels as int64 when they are whole numbers, else as strings; sorted classes."""
    if pd.api.types.is_numeric_dtype(y) and np.all(np.mod(y.to_numpy(dtype=float), 1) == 0):
        y = y.astype("int64")
        return y, sorted(int(c) for c in y.unique())
    y = y.astype(str)
    return y, sorted(y.unique().tolist())


def prepare(
    frame: pd.DataFrame, spec: DataSpec, task: str
) -> tuple[pd.DataFrame, pd.Series, FeatureSchema]:
    """Pick and type the feature columns and the target; build the feature schema.

    Rows without a target are dropped. Categories in the schema are filled in by
    :func:`split` from the train split alone.
    """
    safe = onnx_names([str(c) for c in frame.columns])
    frame = frame.rename(columns=str)
    target, order, categorical = _choose_columns(frame, spec)
    numeric = [c for c in order if c not in categorical]
    frame = frame[frame[target].notna()]
    X = type_features(frame, numeric, categorical)[order]
    X.columns = [safe[c] for c in order]
    y = frame[target].rename(safe[target])
    classes = None
    if task == "classification":
        y, classes = _label_values(y)
        if len(classes) < 2:
            raise DataError(
                f"data.target: classification needs at least 2 classes, found {classes}"
            )
    else:
        if not pd.api.types.is_numeric_dtype(y):
            raise DataError(
                f"data.target: regression needs a numeric target, {spec.target!r} is not"
            )
        y = y.astype("float64")
    features = [
        Feature(safe[c], "string" if c in categorical else "float", column=c) for c in order
    ]
    return X, y, FeatureSchema(task=task, target=safe[target], features=features, classes=classes)


def split(frame: pd.DataFrame, spec: DataSpec, task: str) -> Splits:
    """Deterministic (seeded), stratified for classification, train/valid/test split.

    The test split is the gate's holdout: nothing in the search ever sees it.
    """
    from sklearn.model_selection import train_test_split

    X, y, schema = prepare(frame, spec, task)
    strat = y if task == "classification" else None
    try:
        X_rest, X_test, y_rest, y_test = train_test_split(
            X, y, test_size=spec.test_fraction, random_state=spec.seed, stratify=strat
        )
        strat = y_rest if task == "classification" else None
        X_train, X_valid, y_train, y_valid = train_test_split(
            X_rest, y_rest, test_size=spec.valid_fraction, random_state=spec.seed, stratify=strat
        )
    except ValueError as exc:
        raise DataError(
            f"data.test_fraction/valid_fraction: cannot split {len(X)} rows: {exc}"
        ) from None
    return assemble_splits(
        (X_train, y_train), (X_valid, y_valid), (X_test, y_test), schema, content_hash(frame)
    )


def assemble_splits(
    train: tuple[pd.DataFrame, pd.Series],
    valid: tuple[pd.DataFrame, pd.Series],
    test: tuple[pd.DataFrame, pd.Series],
    schema: FeatureSchema,
    data_hash: str,
) -> Splits:
    """Splits from (X, y) parts that :func:`prepare` typed: the schema's categories are
    taken from the train part alone; DataError when a numeric feature has no value there."""
    (X_train, y_train), (X_valid, y_valid), (X_test, y_test) = train, valid, test
    empty = [c for c in schema.numeric if X_train[c].isna().all()]
    if empty:
        raise DataError(
            f"data.features: column(s) {empty} have no value in the train split; "
            "drop them (data.features) or supply data"
        )
    features = [
        Feature(
            f.name,
            f.dtype,
            sorted(X_train[f.name].unique().tolist()) if f.dtype == "string" else None,
            f.column,
        )
        for f in schema.features
    ]
    schema = FeatureSchema(schema.task, schema.target, features, schema.classes)
    return Splits(X_train, y_train, X_valid, y_valid, X_test, y_test, schema, data_hash)


def load_splits(spec: DataSpec, task: str) -> Splits:
    """Load the spec's data source and split it."""
    return split(load_frame(spec.source), spec, task)


QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def profile(X: pd.DataFrame, schema: FeatureSchema, bins: int = 10) -> dict[str, Any]:
    """Per-feature training profile for drift checks: histogram and quantiles, or frequencies."""
    out: dict[str, Any] = {"rows": int(len(X)), "features": {}}
    for f in schema.features:
        col = X[f.name]
        if f.dtype == "float":
            values = col.dropna().to_numpy(dtype="float64")
            counts, edges = np.histogram(values, bins=bins) if len(values) else ([], [])
            out["features"][f.name] = {
                "dtype": "float",
                "missing": float(col.isna().mean()),
                "mean": float(values.mean()) if len(values) else None,
                "std": float(values.std()) if len(values) else None,
                "quantiles": dict(
                    zip(map(str, QUANTILES), np.quantile(values, QUANTILES).tolist(), strict=True)
                )
                if len(values)
                else {},
                "histogram": {"edges": list(map(float, edges)), "counts": list(map(int, counts))},
            }
        else:
            freqs = col.value_counts(normalize=True)
            out["features"][f.name] = {
                "dtype": "string",
                "missing": float((col == MISSING_CATEGORY).mean()),
                "frequencies": {str(k): float(v) for k, v in freqs.items()},
            }
    return out
