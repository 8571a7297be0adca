"""The training job: data → preprocessing → search → export → gate → register.

Nothing is registered unless the exported graph matches the native winner on the
holdout and the gate passes; the winner's run is logged either way, so a refused
model can still be inspected in MLflow.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training import drift, export, registry
from training.data import FeatureSchema, Splits, load_splits, profile
from training.evaluate import better, reaches, score
from training.models import TORCH_DEFAULTS, build_mlp
from training.preprocess import Preprocessor, fit_preprocessor
from training.spec import Spec, spec_to_yaml
from training.train import TrialContext, family_params
from training.tune import SearchResult, run_search, storage_root


@dataclass
class Outcome:
    name: str
    metric: str
    holdout: float
    passed: bool
    reasons: list[str]
    family: str
    search: SearchResult
    parity: export.Parity
    run_id: str
    version: str | None = None
    production_version: str | None = None
    production_holdout: float | None = None
    splits: Splits | None = None  # the data the search and the gate saw
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    splits: Splits
    pre: Preprocessor
    arrays: dict[str, np.ndarray]


def encode_labels(y: pd.Series, schema: FeatureSchema) -> np.ndarray:
    """Class labels → indices in schema order (classification) or float32 values."""
    if schema.task != "classification":
        return y.to_numpy(dtype=np.float32)
    index = {c: i for i, c in enumerate(schema.classes)}
    return y.map(index).to_numpy(dtype=np.int64)


def prepare(spec: Spec, splits: Splits | None = None) -> Prepared:
    """Load, split and preprocess; the arrays are what every trial trains and validates on.

    ``splits`` given (``rayship retrain``'s, holdout drawn from the new rows): used as
    they are instead of splitting the spec's data source."""
    splits = splits if splits is not None else load_splits(spec.data, spec.task)
    pre = fit_preprocessor(spec.preprocess, splits.schema, splits.X_train)
    arrays = {
        "X_train": pre.transform(splits.X_train),
        "y_train": encode_labels(splits.y_train, splits.schema),
        "X_valid": pre.transform(splits.X_valid),
        "y_valid": encode_labels(splits.y_valid, splits.schema),
    }
    return Prepared(splits, pre, arrays)


def holdout_score(metric: str, schema: FeatureSchema, y: pd.Series, pred, proba) -> float:
    """The spec's metric of predicted labels/values against the holdout's true ones."""
    if schema.task != "classification":
        return score(metric, y.to_numpy(dtype=float), np.asarray(pred, dtype=float))
    index = {str(c): i for i, c in enumerate(schema.classes)}
    y_idx = np.array([index[str(v)] for v in y])
    p_idx = np.array([index.get(str(v), -1) for v in pred])
    return score(metric, y_idx, p_idx, proba)


def load_winner(result: SearchResult, spec: Spec, schema: FeatureSchema, n_features: int):
    """The native winning model from its checkpoint: an estimator or a torch predictor."""
    family, params = family_params(result.best_config)
    model = spec.models[family]
    path = Path(result.best_checkpoint)
    if model.type == "sklearn":
        import joblib

        return joblib.load(path / "estimator.joblib"), model.estimator, None
    import torch

    state = torch.load(path / "model.pt", weights_only=True)
    config = {**TORCH_DEFAULTS, **params}
    n_out = len(schema.classes) if schema.task == "classification" else 1
    net = build_mlp(n_features, n_out, config["hidden_layers"], config["dropout"])
    net.load_state_dict(state["model"])
    net.eval()
    return net, "torch_mlp", (state["y_mean"], state["y_std"])


def build_graph(
    pre: Preprocessor, winner, schema: FeatureSchema, n_features: int, scaling
) -> bytes:
    if hasattr(winner, "predict"):
        return export.assemble(
            pre, export.sklearn_model_graph(winner, n_features, schema.task), schema
        )
    y_mean, y_std = scaling
    return export.assemble(
        pre, export.torch_model_graph(winner, n_features, schema.task, y_mean, y_std), schema
    )


def native_predictor(winner, schema: FeatureSchema, scaling):
    if hasattr(winner, "predict"):
        return winner
    return export.torch_predictor(winner, schema.task, schema.classes, *scaling)


def drift_reference(spec: Spec, splits: Splits, onnx_bytes: bytes) -> dict[str, Any]:
    """The version's drift reference (``drift.json``, see training.drift): slots and shares
    of the train split, alert levels calibrated on holdout windows of ``monitor.window``
    rows, permutation importance of the graph that serves (run by onnxruntime) on the
    holdout."""
    import onnxruntime as ort

    schema = splits.schema
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    classify = schema.task == "classification"

    def predict(X: pd.DataFrame) -> np.ndarray:
        out = session.run(None, export.onnx_feeds(X, schema))
        return out[1] if classify else np.asarray(out[0]).reshape(-1)

    return drift.build_reference(
        splits.X_train,
        splits.X_test,
        encode_labels(splits.y_test, schema),
        schema,
        predict,
        metric=spec.metric,
        window=spec.monitor.window,
        quantile=spec.monitor.calibration_quantile,
        seed=spec.data.seed,
    )


def production_holdout(
    uri: str, spec: Spec, splits: Splits
) -> tuple[str | None, float | None, str | None]:
    """(version, holdout score, reason it cannot be compared) of the current production version."""
    try:
        prod = registry.load_artifact(uri, spec.name, registry.PRODUCTION)
    except registry.RegistryError:
        return None, None, None
    prod_schema = FeatureSchema.from_dict(prod.schema)
    if [(f.name, f.dtype) for f in prod_schema.features] != [
        (f.name, f.dtype) for f in splits.schema.features
    ]:
        return prod.version, None, "production takes different features; compare by hand"
    if prod_schema.classes is not None and [str(c) for c in prod_schema.classes] != [
        str(c) for c in splits.schema.classes
    ]:
        return prod.version, None, "production predicts different classes; compare by hand"
    pred, proba = export.run_onnx(prod.onnx_bytes, splits.X_test, prod_schema)
    return prod.version, holdout_score(spec.metric, splits.schema, splits.y_test, pred, proba), None


def gate_reasons(
    spec: Spec,
    holdout: float,
    prod_version: str | None,
    prod_score: float | None,
    why: str | None = None,
) -> list[str]:
    """Why the gate refuses a candidate scoring ``holdout`` (empty: it passes).

    ``prod_*`` are :func:`production_holdout`'s answer on the same holdout (``why``: the
    reason production cannot be compared). Rules: ``min_metric`` is reached;
    ``must_beat_production``: strictly better than production; ``min_improvement`` > 0:
    better by at least that much, in the metric's direction (checked whether or not
    must_beat_production is set). Without a production version only min_metric applies.
    """
    gate, metric = spec.gate, spec.metric
    reasons = []
    if gate.min_metric is not None and not reaches(metric, holdout, gate.min_metric):
        reasons.append(
            f"holdout {metric} {holdout:.4f} does not reach min_metric {gate.min_metric}"
        )
    compare = gate.must_beat_production or gate.min_improvement > 0
    if prod_version is None or not compare:
        return reasons
    if why:
        return [*reasons, why]
    production = f"production v{prod_version} ({prod_score:.4f})"
    gain = holdout - prod_score if spec.mode == "max" else prod_score - holdout
    if gate.must_beat_production and not better(metric, holdout, prod_score):
        reasons.append(f"holdout {metric} {holdout:.4f} does not beat {production}")
    elif gate.min_improvement > 0 and gain < gate.min_improvement:
        reasons.append(
            f"holdout {metric} {holdout:.4f} improves on {production} by {gain:.4f}, "
            f"less than gate.min_improvement {gate.min_improvement}"
        )
    return reasons


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"rayship {pkg_version('rayship')}" + (f" ({sha})" if sha else "")


def search_and_register(
    spec: Spec,
    *,
    state_dir: Path = Path(".rayship"),
    num_samples: int | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    connect: Callable[[], None] | None = None,
    splits: Splits | None = None,
) -> Outcome:
    """Search, export, gate and (when the gate passes) register with alias ``candidate``.

    Data is loaded and preprocessed first, so bad data fails before any Ray starts;
    then ``connect`` (the CLI's: a cluster, or a new one) runs, else a local Ray starts.
    ``splits``: ready-made splits (see :func:`prepare`) instead of the spec's data source.
    """
    import ray

    uri = registry.tracking_uri(state_dir)
    prep = prepare(spec, splits)
    # A new MLflow store costs ~3 s here (import, SQLite migrations): it is created in a
    # thread while Ray starts and the search begins; the search's tracking waits for it.
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-store") as pool:
        store = pool.submit(registry.ensure_experiment, uri, f"{spec.name}-search")
        if not ray.is_initialized():
            connect() if connect else ray.init()
        result = _search(spec, prep, state_dir, uri, num_samples, resume, callbacks, store)
    return register_winner(spec, prep, result, uri)


def _search(spec, prep, state_dir, uri, num_samples, resume, callbacks, store) -> SearchResult:
    """Run the search on the connected Ray, the data put in its object store once."""
    import ray

    schema = prep.splits.schema
    ctx = TrialContext(
        task=spec.task,
        metric=spec.metric,
        n_classes=len(schema.classes or []),
        seed=spec.data.seed,
        models=[m.model_dump() for m in spec.models],
        cpus_per_trial=spec.search.cpus_per_trial,
        max_failures=spec.search.max_failures,
        storage_path=storage_root(state_dir, "train"),
        data_refs={k: ray.put(v) for k, v in prep.arrays.items()},
    )
    return run_search(
        spec,
        ctx,
        state_dir=state_dir,
        mlflow_uri=uri,
        num_samples=num_samples,
        resume=resume,
        callbacks=callbacks,
        store_ready=store,
    )


def register_winner(spec: Spec, prep: Prepared, result: SearchResult, uri: str) -> Outcome:
    """Export and check the search's winner, gate it, and register it when it passes."""
    splits, schema = prep.splits, prep.splits.schema
    n_features = prep.arrays["X_train"].shape[1]
    winner, family, scaling = load_winner(result, spec, schema, n_features)
    try:
        onnx_bytes = build_graph(prep.pre, winner, schema, n_features, scaling)
    except Exception as exc:  # skl2onnx has no converter, or cannot convert these params
        raise export.ExportError(
            f"the winner ({family}) cannot be exported to ONNX: {type(exc).__name__}: {exc}"
        ) from exc
    native = native_predictor(winner, schema, scaling)
    native_pred, native_proba = export.native_outputs(
        prep.pre, native, spec.task, schema.classes, splits.X_test
    )
    parity = export.check_parity(
        prep.pre, onnx_bytes, splits.X_test, schema, native_pred, native_proba
    )
    if not parity.ok:
        raise export.ExportError(
            f"ONNX graph does not match the native model on the holdout: {parity}"
        )
    holdout = holdout_score(spec.metric, schema, splits.y_test, native_pred, native_proba)

    prod_version, prod_score, why = production_holdout(uri, spec, splits)
    reasons = gate_reasons(spec, holdout, prod_version, prod_score, why)
    metrics = {
        f"holdout_{spec.metric}": holdout,
        f"valid_{spec.metric}": float(result.best_metrics[spec.metric]),
    }
    lineage = {
        "data_source": spec.data.source,
        "data_sha256": splits.content_hash,
        "search_path": result.experiment_path,
        "trial_id": result.trial_id,
        "trial_config": result.best_config,
        "family": family,
        "code_version": code_version(),
        "ray": pkg_version("ray"),
    }
    sha = registry.sha256(onnx_bytes)
    tags = {
        "onnx_sha256": sha,
        "metric": spec.metric,
        "holdout_score": f"{holdout:.6f}",
        "family": family,
        "trial_id": result.trial_id,
        "data_sha256": splits.content_hash,
    }
    run_id, source = registry.log_winner(
        uri,
        spec.name,
        onnx_bytes=onnx_bytes,
        files={
            "schema.json": schema.to_dict(),
            "spec.yaml": spec_to_yaml(spec),
            "metrics.json": {**metrics, "parity": parity.__dict__, "trials": result.trials},
            "profile.json": profile(splits.X_train, schema),
            "drift.json": drift_reference(spec, splits, onnx_bytes),
            "lineage.json": lineage,
        },
        params={"family": family, **{k: json.dumps(v) for k, v in result.best_config.items()}},
        metrics=metrics,
        tags={**tags, "gate": "passed" if not reasons else "refused"},
    )
    outcome = Outcome(
        name=spec.name,
        metric=spec.metric,
        holdout=holdout,
        passed=not reasons,
        reasons=reasons,
        family=family,
        search=result,
        parity=parity,
        run_id=run_id,
        production_version=prod_version,
        production_holdout=prod_score,
        splits=splits,
    )
    if outcome.passed:
        outcome.version = registry.register_version(
            uri, spec.name, source, run_id, {**tags, "run_id": run_id}
        )
        registry.set_alias(uri, spec.name, registry.CANDIDATE, outcome.version)
    return outcome
