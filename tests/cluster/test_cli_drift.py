"""`rayship drift NAME --data FILE`: a real registered version (the churn spec's winner
through export, gate and registration, in a real MLflow store under ./.rayship), new
rows in CSV/Parquet with the data's own column names; the real Typer app in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cluster.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def make_churn(rows: int, seed: int) -> pd.DataFrame:
    spec = importlib.util.spec_from_file_location("make_csv", ROOT / "examples" / "make_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_churn(rows, seed)


@pytest.fixture(scope="module")
def project(tmp_path_factory, register_without_search) -> Path:
    """A working directory whose ./.rayship holds churn version 1 (production), trained
    on a churn table with a spaced column name ("monthly charges")."""
    from training.spec import parse_spec

    cwd = tmp_path_factory.mktemp("drift")
    csv = cwd / "churn.csv"
    make_churn(1500, 0).rename(columns={"monthly_charges": "monthly charges"}).to_csv(
        csv, index=False
    )
    spec = parse_spec(
        {
            "name": "churn",
            "task": "classification",
            "data": {"source": str(csv), "target": "churn", "categorical": ["plan", "region"]},
            "metric": "accuracy",
            "models": [{"type": "sklearn", "estimator": "sklearn.linear_model.LogisticRegression"}],
            "monitor": {"window": 1000},
        }
    )
    outcome = register_without_search(spec, cwd / ".rayship", production=True)
    assert outcome.version == "1"
    return cwd


@pytest.fixture(autouse=True)
def workdir(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)  # the CLI keeps its state in ./.rayship
    return project


def invoke(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "250"})
    return result.exit_code, " ".join(result.output.split())


def new_rows(rows: int, seed: int, *, shift: bool = False) -> pd.DataFrame:
    frame = make_churn(rows, seed).rename(columns={"monthly_charges": "monthly charges"})
    if shift:
        frame["monthly charges"] = frame["monthly charges"] + 25.0
        frame.loc[frame.index[: rows // 2], "plan"] = "pro"
    return frame


def table_rows(out: str) -> list[str]:
    """The feature names in the order the table shows them."""
    names = ["monthly charges", "plan", "region", "tenure_months", "support_tickets"]
    return sorted(names, key=out.index)


def test_drift_prints_the_shifted_features_first_and_writes_the_plot(workdir):
    data = workdir / "shifted.csv"
    new_rows(1200, 7, shift=True).to_csv(data, index=False)
    code, out = invoke("drift", "churn", "--data", str(data))
    assert code == 0, out
    assert "churn version 1: 1200 rows" in out
    assert set(table_rows(out)[:2]) == {"monthly charges", "plan"}
    assert out.count("DRIFT") == 2
    assert "2 of 5 features drifted: plan, monthly charges" in out
    png = workdir / "shifted.drift.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 500 and height > 300


def test_undrifted_rows_flag_nothing_and_parquet_works(workdir, tmp_path):
    data = tmp_path / "same.parquet"
    new_rows(2000, 11).to_parquet(data)
    plot = tmp_path / "plot.png"
    code, out = invoke("drift", "churn@production", "--data", str(data), "--out", str(plot))
    assert code == 0, out
    assert "no feature drifted" in out and "DRIFT" not in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_fail_on_drift_exits_1_only_when_something_drifted(workdir, tmp_path):
    shifted, same = tmp_path / "shifted.csv", tmp_path / "same.csv"
    new_rows(1000, 3, shift=True).to_csv(shifted, index=False)
    new_rows(1000, 4).to_csv(same, index=False)
    assert invoke("drift", "churn", "--data", str(shifted), "--fail-on-drift")[0] == 1
    assert invoke("drift", "churn", "--data", str(same), "--fail-on-drift")[0] == 0


def test_missing_columns_are_named(workdir, tmp_path):
    data = tmp_path / "partial.csv"
    new_rows(100, 5).drop(columns=["plan", "monthly charges"]).to_csv(data, index=False)
    code, out = invoke("drift", "churn", "--data", str(data))
    assert code == 1
    assert "error:" in out and "'plan'" in out and "'monthly charges'" in out
    assert not (tmp_path / "partial.drift.png").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("nomodel", "--data", "x.csv"), "model 'nomodel' has no version or alias 'production'"),
        (("churn", "--version", "7", "--data", "x.csv"), "has no version or alias '7'"),
        (("churn", "--data", "nowhere.csv"), "--data: no such file nowhere.csv"),
    ],
)
def test_bad_input_is_one_clear_line(workdir, args, expected):
    (workdir / "x.csv").write_text("plan\nbasic\n")
    code, out = invoke("drift", *args)
    assert code == 1 and expected in out


def test_an_unreadable_file_is_named(workdir, tmp_path):
    data = tmp_path / "broken.parquet"
    data.write_text("this is not parquet")
    code, out = invoke("drift", "churn", "--data", str(data))
    assert code == 1 and f"--data: cannot read {data} as Parquet" in out
