"""Retraining on new data: the splits ``rayship retrain`` searches on, and its cooldown.

Two modes (``--mode``):

- ``replace``: the new file alone is the data, split as ``rayship tune`` splits a data
  source (its holdout is the gate's).
- ``append``: the new file's rows are added to the spec's data source. The gate's
  holdout is drawn from the new rows only (``data.test_fraction`` of them, seeded,
  stratified for classification): the question the gate answers is which model is
  better on the data the endpoint sees now, and production, trained on the old rows,
  would be flattered by a holdout half made of them. The old rows and the rest of the
  new ones are split into train and valid as usual.

Either way the new file must have the spec's data's columns, no more and no fewer
(extra columns would silently become features when ``data.features`` is not set).
What the search saw is written to one file (``<state>/retrain/<name>-<hash>.parquet``)
that becomes the spec's ``data.source``, so the registered version's spec and lineage
name data that exists. Appends do not accumulate: each retrain appends to the spec's
own source (pass the file a previous retrain wrote, or ``--mode replace``, to go on).

Cooldown: the time of a model's last retrain is the registered-model tag
:data:`LAST_RETRAIN` in MLflow (seconds since the epoch), where a local run and a
Kubernetes CronJob sharing the tracking server both see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from training import registry
from training.data import (
    DataError,
    Splits,
    assemble_splits,
    content_hash,
    load_frame,
    prepare,
    split,
)
from training.spec import Spec

Mode = Literal["append", "replace"]
MODES: tuple[str, ...] = ("append", "replace")
LAST_RETRAIN = "rayship.last_retrain"


@dataclass
class RetrainData:
    """The spec to search with (``data.source`` = ``path``), its splits, and how many
    rows came from the new file (``new_rows``) and from the spec's source (``old_rows``)."""

    spec: Spec
    splits: Splits
    path: Path
    new_rows: int
    old_rows: int


def check_columns(new: pd.DataFrame, reference: pd.DataFrame, where: str) -> None:
    """DataError naming the missing and extra columns when ``new`` has not exactly the
    columns of ``reference`` (the spec's data); the order may differ."""
    missing = [c for c in reference.columns if c not in new.columns]
    extra = [c for c in new.columns if c not in reference.columns]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {missing}")
        if extra:
            parts.append(f"extra column(s) {extra}")
        raise DataError(
            f"{where}: {' and '.join(parts)}; a retrain's data has the columns of the spec's "
            f"data.source ({list(reference.columns)})"
        )


def retrain_data(spec: Spec, data: Path, mode: Mode, state_dir: Path) -> RetrainData:
    """Read ``data``, check its columns against the spec's data source, split it as
    ``mode`` says (module docstring) and write what the search sees under ``state_dir``.

    Raises DataError (naming ``--data`` or the spec key) before anything starts."""
    if mode not in MODES:
        raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")
    where = f"--data {data}"
    if not Path(data).is_file():
        raise DataError(f"{where}: no such file")
    new = load_frame(str(data))
    if new.empty:
        raise DataError(f"{where}: no rows")
    old = load_frame(spec.data.source)
    check_columns(new, old, where)
    new = new[list(old.columns)]
    if mode == "replace":
        frame, splits = new, split(new, spec.data, spec.task)
        old_rows = 0
    else:
        frame = pd.concat([old, new], ignore_index=True)
        splits = _split_appended(frame, len(old), spec, where)
        old_rows = len(old)
    path = _write(frame, Path(state_dir) / "retrain", spec.name, splits.content_hash)
    data_spec = spec.data.model_copy(update={"source": str(path)})
    return RetrainData(
        spec.model_copy(update={"data": data_spec}), splits, path, len(new), old_rows
    )


def _split_appended(frame: pd.DataFrame, n_old: int, spec: Spec, where: str) -> Splits:
    """Train/valid/test of old + new rows with the test (holdout) rows from the new ones."""
    X, y, schema = prepare(frame, spec.data, spec.task)  # drops rows without a target
    is_new = X.index >= n_old
    X_new, y_new = X[is_new], y[is_new]
    X_keep, X_test, y_keep, y_test = _cut(
        X_new,
        y_new,
        spec.data.test_fraction,
        spec,
        f"{where}: cannot draw the holdout (data.test_fraction) from its {len(X_new)} rows",
    )
    X_rest = pd.concat([X[~is_new], X_keep])
    y_rest = pd.concat([y[~is_new], y_keep])
    X_train, X_valid, y_train, y_valid = _cut(
        X_rest,
        y_rest,
        spec.data.valid_fraction,
        spec,
        f"data.valid_fraction: cannot split {len(X_rest)} rows",
    )
    return assemble_splits(
        (X_train, y_train), (X_valid, y_valid), (X_test, y_test), schema, content_hash(frame)
    )


def _cut(X: pd.DataFrame, y: pd.Series, fraction: float, spec: Spec, what: str) -> list:
    """``train_test_split`` of ``fraction`` (stratified for classification); a split it
    cannot make is a DataError that starts with ``what``."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(
            X,
            y,
            test_size=fraction,
            random_state=spec.data.seed,
            stratify=y if spec.task == "classification" else None,
        )
    except ValueError as exc:
        raise DataError(f"{what}: {exc}") from None


def _write(frame: pd.DataFrame, folder: Path, name: str, sha: str) -> Path:
    """The searched data as Parquet (types kept), named by its content hash."""
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / f"{name}-{sha[:12]}.parquet").resolve()
    if not path.exists():
        frame.to_parquet(path, index=False)
    return path


# --------------------------------------------------------------------------- cooldown


def last_retrain(uri: str, name: str) -> float | None:
    """When ``name`` was last retrained (epoch seconds), or None (never, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        model = registry.client(uri).get_registered_model(name)
    except MlflowException:
        return None
    value = (model.tags or {}).get(LAST_RETRAIN)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def record_retrain(uri: str, name: str, when: float | None = None) -> None:
    """Record a retrain of ``name`` now (or at ``when``); a model not registered yet
    is created, so a retrain whose first candidate was refused counts too."""
    from mlflow.exceptions import MlflowException

    c = registry.client(uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name)
    c.set_registered_model_tag(name, LAST_RETRAIN, f"{time.time() if when is None else when:.3f}")


def cooldown_left(uri: str, name: str, cooldown_s: float, now: float | None = None) -> float:
    """Seconds until ``name`` may be retrained again (0: now)."""
    last = last_retrain(uri, name)
    if last is None or cooldown_s <= 0:
        return 0.0
    now = time.time() if now is None else now
    return max(0.0, last + cooldown_s - now)
