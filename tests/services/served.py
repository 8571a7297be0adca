"""Request rows and offline reference outputs the serving tests share (a module of
its own: two `conftest` modules cannot both be imported by name)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pandas as pd

GOOD = {
    "plan": "basic",
    "region": "north",
    "tenure_months": 3.0,
    "monthly_charges": 50.0,
    "support_tickets": 1.0,
}


def rows_of(X: pd.DataFrame) -> list[dict]:
    """Rows as a JSON client sends them: NaN and the missing category '' become null."""
    return [
        {
            k: None if pd.isna(v) or v == "" else (v.item() if hasattr(v, "item") else v)
            for k, v in r.items()
        }
        for r in X.to_dict(orient="records")
    ]


def offline_outputs(registered, row: dict):
    """The registered graph's own answer for one JSON row (null → missing)."""
    typed = {
        k: ("" if v is None else v)
        if k in registered.schema.categorical
        else (np.nan if v is None else v)
        for k, v in row.items()
    }
    frame = pd.DataFrame([typed])[registered.schema.names]
    frame = frame.astype({c: "float32" for c in registered.schema.numeric})
    from training import export

    return export.run_onnx(registered.onnx_bytes, frame, registered.schema)


def keyed_by_column(rows: list[dict], schema) -> list[dict]:
    """Rows keyed by ONNX input names (as ``rows_of`` gives them) re-keyed by the data's own
    column names, in feature order."""
    return [{f.column: row[f.name] for f in schema.features} for row in rows]


@contextlib.contextmanager
def ray_with_metrics(metrics_port: int) -> Iterator[None]:
    """A private local Ray (2 CPUs) whose metrics agent exports on ``metrics_port`` and
    reports every second; Serve and Ray are shut down after."""
    import ray
    from ray import serve

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
