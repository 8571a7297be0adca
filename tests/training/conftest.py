"""Shared data for the training tests: the churn table (categorical columns, missing
values, string labels) written as CSV to a tmp dir, and specs built around it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def make_churn(rows: int = 1200, seed: int = 0) -> pd.DataFrame:
    spec = importlib.util.spec_from_file_location("make_csv", ROOT / "examples" / "make_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_churn(rows, seed)


@pytest.fixture(scope="session")
def churn_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "churn.csv"
    make_churn().to_csv(path, index=False)
    return path


def churn_spec(source: str | Path, **overrides) -> dict:
    """A valid spec dict for the churn CSV; ``overrides`` replace top-level keys."""
    spec = {
        "name": "churn",
        "task": "classification",
        "data": {"source": str(source), "target": "churn", "categorical": ["plan", "region"]},
        "metric": "f1_macro",
        "models": [
            {
                "type": "sklearn",
                "estimator": "sklearn.linear_model.LogisticRegression",
                "space": {"C": {"loguniform": [0.1, 10.0]}},
            }
        ],
    }
    spec.update(overrides)
    return spec
