"""Faults of the registry: a registered ONNX file corrupted on disk, and two
`rayship tune` runs registering the same model at once (real subprocesses, each with
its own local Ray, one MLflow SQLite store)."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from specs import ROOT, churn_spec

sys.path.insert(0, str(ROOT / "tests" / "cluster"))
from cli_runner import start as start_rayship  # noqa: E402

from training import registry
from training.spec import parse_spec


def onnx_file(uri: str, name: str, version: str) -> Path:
    """The registered version's model.onnx in the local artifact store."""
    source = registry.resolve_version(uri, name, version).source
    return Path(urlparse(source).path) / "model.onnx"


def test_a_registered_onnx_file_corrupted_on_disk_is_refused_naming_both_checksums(
    churn_csv, tmp_path, register_without_search
):
    spec = parse_spec(churn_spec(churn_csv))
    outcome = register_without_search(spec, tmp_path)
    uri = registry.tracking_uri(tmp_path)
    assert registry.load_artifact(uri, "churn", outcome.version).onnx_bytes  # intact: loads
    path = onnx_file(uri, "churn", outcome.version)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte, size unchanged
    path.write_bytes(bytes(bad))
    with pytest.raises(registry.RegistryError) as refused:
        registry.load_artifact(uri, "churn", outcome.version)
    message = str(refused.value)
    assert f"churn version {outcome.version}" in message and "sha256" in message
    assert f"expected sha256 {registry.sha256(good)}" in message
    assert f"actual sha256 {registry.sha256(bytes(bad))}" in message


class AliasWatch(threading.Thread):
    """Polls the registry while the searches run: every alias of the model must name a
    version that exists and whose artifact passes its checksum."""

    def __init__(self, uri: str, name: str):
        super().__init__(daemon=True)
        self.uri, self.name = uri, name
        self.db = Path(uri.removeprefix("sqlite:///"))
        self.stop = threading.Event()
        self.checks = 0
        self.broken: list[str] = []

    def run(self) -> None:
        from mlflow.exceptions import MlflowException

        while not self.stop.wait(0.2):
            if not self.db.exists():
                continue  # the searches create the store, not this watch
            try:
                model = registry.client(self.uri).get_registered_model(self.name)
            except MlflowException:
                continue  # not registered yet
            for alias, version in (model.aliases or {}).items():
                try:
                    registry.load_artifact(self.uri, self.name, str(version))
                except registry.RegistryError as exc:
                    self.broken.append(f"{alias} -> {version}: {exc}")
                self.checks += 1


def test_two_searches_registering_one_model_at_once_both_land_intact(churn_csv, tmp_path):
    """Two `rayship tune` of the same spec, started together in one project folder
    (a new MLflow store, the same search folder root, the same model name)."""
    raw = churn_spec(
        churn_csv,
        search={"algorithm": "random", "scheduler": "none", "num_samples": 2},
        gate={"min_metric": None},
    )
    spec = tmp_path / "churn.yaml"
    spec.write_text(yaml.safe_dump(raw))
    state = tmp_path / ".rayship"
    uri = registry.tracking_uri(state)
    runs = [start_rayship("tune", str(spec), cwd=tmp_path) for _ in range(2)]
    watch = AliasWatch(uri, "churn")
    watch.start()
    outs = [run.communicate(timeout=300)[0] for run in runs]
    watch.stop.set()
    watch.join()
    for run, out in zip(runs, outs, strict=True):
        assert run.returncode == 0, out
    registered = sorted(
        re.search(r"registered churn version (\d+) as candidate", out).group(1) for out in outs
    )
    assert registered == ["1", "2"]
    assert len(list(state.glob("searches/churn-*"))) == 2  # a search folder each
    versions = registry.list_versions(uri, "churn")
    assert [v["version"] for v in versions] == ["1", "2"]
    runs_of = set()
    for version in ("1", "2"):
        artifact = registry.load_artifact(uri, "churn", version)  # passes its checksum
        assert artifact.schema and artifact.metrics and artifact.profile
        runs_of.add(registry.resolve_version(uri, "churn", version).run_id)
    assert len(runs_of) == 2  # each version is its own search's winner run
    # `candidate` names the version of whichever search set it last: one that exists.
    assert str(registry.resolve_version(uri, "churn", registry.CANDIDATE).version) in ("1", "2")
    assert watch.broken == [] and watch.checks > 0


def test_searches_started_in_one_second_get_their_own_folders_and_resume_takes_the_newest(
    churn_csv, tmp_path
):
    from training.tune import latest_search, search_name

    spec = parse_spec(churn_spec(churn_csv))
    names = [search_name(spec) for _ in range(2)]
    assert names[0] != names[1]  # microseconds apart
    older = ["churn-20251130-235959", "churn-20261201-041000", "churn-20261201-041000-000001"]
    for name in [*older, *names, "churn-v2-20991231-000000", "churner-20991231-000000"]:
        (tmp_path / "searches" / name).mkdir(parents=True)
    assert latest_search(tmp_path, "churn").name == names[1]
