"""Data and specs the training tests share (a module of its own: two `conftest`
modules cannot both be imported by name)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


# A LogisticRegression family with scikit-learn's default parameters (no search space).
LOGREG = {"type": "sklearn", "estimator": "sklearn.linear_model.LogisticRegression"}

# One valid churn row (the columns of examples/make_csv.py's churn table).
CHURN_ROW = {
    "plan": "basic",
    "region": "north",
    "tenure_months": 3.0,
    "monthly_charges": 50.0,
    "support_tickets": 1.0,
}


def make_churn(rows: int = 1200, seed: int = 0) -> pd.DataFrame:
    spec = importlib.util.spec_from_file_location("make_csv", ROOT / "examples" / "make_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_churn(rows, seed)


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
