"""The CLI refuses bad input with one clear line and a non-zero exit, before any Ray
or Serve starts and without leaving state behind. Runs the real Typer app in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the CLI keeps its state in ./.rayship
    return tmp_path


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def ray_started() -> bool:
    import ray

    return ray.is_initialized()


def write_spec(path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "examples" / "breast_cancer.yaml").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_the_commands():
    code, out = invoke("--help")
    assert code == 0
    for command in ("run", "tune", "models", "serve", "predict", "up", "down", "status"):
        assert command in out


def test_a_refused_spec_names_the_key_and_starts_nothing(workdir):
    spec = write_spec(workdir / "bad.yaml", search__sceduler="asha")
    code, out = invoke("tune", str(spec))
    assert code == 1
    assert "search.sceduler: unknown key" in out
    assert not (workdir / ".rayship").exists()
    assert not ray_started()


def test_a_non_scikit_learn_estimator_is_refused_by_the_cli(workdir):
    spec = write_spec(workdir / "evil.yaml")
    raw = yaml.safe_load(spec.read_text())
    raw["models"][0]["estimator"] = "os.system"
    spec.write_text(yaml.safe_dump(raw))
    code, out = invoke("run", str(spec))
    assert code == 1
    assert "models.0.estimator" in out and "not a scikit-learn estimator" in out
    assert not ray_started()


def test_missing_data_is_reported_before_ray_starts(workdir):
    spec = write_spec(workdir / "nodata.yaml", data__source=str(workdir / "none.csv"))
    code, out = invoke("tune", str(spec))
    assert code == 1
    assert "data.source: no such file" in out
    assert not ray_started()


def test_an_unreadable_spec_path_is_a_clear_error(workdir):
    code, out = invoke("tune", str(workdir / "missing.yaml"))
    assert code == 1 and "cannot read" in out


def test_serving_an_unknown_model_fails_before_ray_starts():
    code, out = invoke("serve", "nosuch@production")
    assert code == 1
    assert "nosuch" in out
    assert not ray_started()


def test_promoting_an_unknown_model_fails_clearly():
    code, out = invoke("models", "promote", "nosuch", "3")
    assert code == 1 and "nosuch" in out


def test_a_bad_model_reference_is_named():
    code, out = invoke("serve", "digits/latest")
    assert code == 1 and "must be a number" in out


def test_predict_against_no_server_names_the_url(workdir, free_port):
    rows = workdir / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    port = free_port()  # nothing listens on it
    code, out = invoke(
        "predict", "digits", "--input", str(rows), "--url", f"http://127.0.0.1:{port}"
    )
    assert code == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1/models/digits:predict" in out


def test_status_without_a_cluster_says_so():
    code, out = invoke("status")
    assert code == 1 and "no rayship cluster running" in out


def test_num_samples_must_be_positive(workdir):
    spec = write_spec(workdir / "ok.yaml")
    code, out = invoke("tune", str(spec), "--num-samples", "0")
    assert code == 2 and "num-samples" in out
