"""Registry: versions of a model in MLflow, their artifacts, aliases and checksums.

A registered version's source is a run artifact folder ``model/`` holding
``model.onnx``, ``schema.json``, ``spec.yaml``, ``metrics.json``, ``profile.json``,
``drift.json`` (versions registered before drift monitoring have none) and
``lineage.json``; the version's ``onnx_sha256`` tag is checked on every load.
The embedded default store is SQLite under ``<state>/`` with artifacts beside it;
``MLFLOW_TRACKING_URI`` points everything at a real MLflow server instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATE = "candidate"
PRODUCTION = "production"


class RegistryError(LookupError):
    """Unknown model, version or alias, or an artifact that fails its checksum."""


@dataclass(frozen=True)
class ModelArtifact:
    name: str
    version: str
    onnx_bytes: bytes
    schema: dict[str, Any]
    metrics: dict[str, Any]
    profile: dict[str, Any]
    spec_yaml: str = ""  # the spec the version was searched with (its serve section too)
    drift: dict[str, Any] | None = None  # drift.json (training.drift); None: registered before


def tracking_uri(state_dir: Path = Path(".rayship")) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI under ``state_dir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state_dir / 'mlflow.db'}"


_stores_ready: set[str] = set()  # SQLite stores this process has opened (see client)


def client(uri: str):
    """An MlflowClient for tracking and registry at ``uri``.

    MLflow creates a new SQLite store's tables and runs its migrations when a process
    first opens it, with no lock: two ``rayship tune`` started together on a new store
    failed with "duplicate column name" (both migrating), and a process opening the
    store mid-migration would see tables that exist and skip to a half-migrated schema.
    So each process opens a SQLite store first under an exclusive lock on
    ``<db>.lock`` beside it."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _stores_ready:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(f"{db}.lock", "a")  # noqa: SIM115 (held across the block below)
    except OSError:  # a state folder this process cannot write to: open it unlocked
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)  # the tracking store is open (and migrated)
        c.search_registered_models(max_results=1)  # and so is the registry store
    finally:
        if lock is not None:
            lock.close()
    _stores_ready.add(uri)
    return c


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it with artifacts beside a SQLite store when local.

    Two searches of one model started together both find no experiment; the one whose
    create loses the race takes the winner's."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        exp = c.get_experiment_by_name(name)
        if exp is None or not _already_exists(exc):
            raise
        return exp.experiment_id


def _already_exists(exc: Exception) -> bool:
    text = str(exc)
    return "already exists" in text.lower() or "RESOURCE_ALREADY_EXISTS" in text


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def log_winner(
    uri: str,
    name: str,
    *,
    onnx_bytes: bytes,
    files: dict[str, Any],
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> tuple[str, str]:
    """Log the winner's run with its ``model/`` artifacts; returns (run id, artifact source URI)."""
    c = client(uri)
    run = c.create_run(
        ensure_experiment(uri, name), tags={**tags, "mlflow.runName": f"{name}-winner"}
    )
    run_id = run.info.run_id
    try:
        for key, value in params.items():
            c.log_param(run_id, key, str(value)[:6000])
        for key, value in metrics.items():
            c.log_metric(run_id, key, float(value))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            (folder / "model.onnx").write_bytes(onnx_bytes)
            for filename, content in files.items():
                text = (
                    content
                    if isinstance(content, str)
                    else json.dumps(content, indent=2, default=str)
                )
                (folder / filename).write_text(text)
            c.log_artifacts(run_id, str(folder), artifact_path="model")
        c.set_terminated(run_id)
    except Exception:
        c.set_terminated(run_id, status="FAILED")
        raise
    return run_id, f"{run.info.artifact_uri}/model"


def register_version(uri: str, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
    """Create a new version of ``name`` from a logged ``model/`` folder; returns its number.

    The artifacts are complete before this is called (:func:`log_winner`), and
    ``create_model_version`` returns only once MLflow has the version READY (it waits up
    to 300 s), so an alias set afterwards never names a missing or half-made version.
    Two searches registering at once get consecutive numbers (MLflow's SQL store takes
    max + 1 and retries on a clash); the ``candidate`` alias ends on whichever set it
    last."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if not _already_exists(exc):
            raise
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return str(mv.version)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    resolve_version(uri, name, version)
    client(uri).set_registered_model_alias(name, alias, str(version))


def resolve_version(uri: str, name: str, ref: str) -> Any:
    """The ModelVersion for a version number or an alias; RegistryError if there is none."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        if str(ref).isdigit():
            return c.get_model_version(name, str(ref))
        return c.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version or alias {ref!r}") from None


def load_artifact(uri: str, name: str, ref: str = PRODUCTION) -> ModelArtifact:
    """Download a version's artifacts and verify the ONNX checksum against its tag."""
    import mlflow.artifacts

    mv = resolve_version(uri, name, ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=tmp, tracking_uri=uri
            )
        )
        onnx_bytes = (local / "model.onnx").read_bytes()
        verify_checksum(name, str(mv.version), onnx_bytes, mv.tags.get("onnx_sha256"))

        def read(filename: str) -> dict[str, Any]:
            return json.loads((local / filename).read_text())

        return ModelArtifact(
            name=name,
            version=str(mv.version),
            onnx_bytes=onnx_bytes,
            schema=read("schema.json"),
            metrics=read("metrics.json"),
            profile=read("profile.json"),
            spec_yaml=(local / "spec.yaml").read_text() if (local / "spec.yaml").exists() else "",
            drift=read("drift.json") if (local / "drift.json").exists() else None,
        )


def verify_checksum(name: str, version: str, onnx_bytes: bytes, expected: str | None) -> None:
    """Raise RegistryError unless ``onnx_bytes`` hash to the version's ``onnx_sha256``
    tag; the message names both digests, so an operator can tell a corrupted file (the
    actual digest changed) from a wrong tag."""
    actual = sha256(onnx_bytes)
    if not expected:
        raise RegistryError(
            f"{name} version {version}: model.onnx fails its sha256 check: the version has "
            f"no onnx_sha256 tag (actual sha256 {actual})"
        )
    if actual != expected:
        raise RegistryError(
            f"{name} version {version}: model.onnx fails its sha256 check: "
            f"expected sha256 {expected} (its onnx_sha256 tag), actual sha256 {actual}"
        )


def list_versions(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every version (of one model or all): number, aliases, metrics tags, creation time."""
    c = client(uri)
    names = [name] if name else [m.name for m in c.search_registered_models()]
    rows = []
    for model_name in names:
        try:
            model = c.get_registered_model(model_name)
        except Exception:
            raise RegistryError(f"no registered model {model_name!r}") from None
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in c.search_model_versions(f"name='{model_name}'"):
            rows.append(
                {
                    "name": model_name,
                    "version": str(mv.version),
                    "aliases": sorted(aliases.get(str(mv.version), [])),
                    "metric": mv.tags.get("metric", ""),
                    "holdout": mv.tags.get("holdout_score", ""),
                    "family": mv.tags.get("family", ""),
                    "created": mv.creation_timestamp,
                }
            )
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))
