"""Fixtures of the training tests: the churn table (categorical columns, missing
values, string labels) written as CSV to a tmp dir once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from specs import make_churn


@pytest.fixture(scope="session")
def churn_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "churn.csv"
    make_churn().to_csv(path, index=False)
    return path
