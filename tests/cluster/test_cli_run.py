"""The main job through the real CLI, as a user runs it: `rayship run` in a fresh
working directory starts a cluster that outlives it, and the printed `curl` line
works after the command has exited; then models list/promote, serve, predict, down.

Real processes throughout (about 60 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def rayship(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    yield cwd
    rayship("down", cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def run(workdir, free_port):
    port = free_port()
    spec = ROOT / "examples" / "breast_cancer.yaml"
    done = rayship("run", str(spec), "--port", str(port), "--num-samples", "3", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, port


def test_run_registers_promotes_and_serves(run, workdir):
    out, port = run
    assert "gate passed: registered breast_cancer version 1 as candidate" in out
    assert "promoted breast_cancer version 1 to production" in out
    assert re.search(r'sample prediction: \{"predictions": \[[01]\], "model_version": "1"\}', out)


def test_the_printed_curl_line_works_after_run_exits(run, workdir):
    out, port = run
    line = next(ln for ln in out.splitlines() if ln.startswith("curl "))
    answer = subprocess.run(shlex.split(line), cwd=workdir, capture_output=True, text=True)
    assert answer.returncode == 0
    body = json.loads(answer.stdout)
    assert body["model_version"] == "1" and body["predictions"][0] in (0, 1)


def test_models_list_shows_the_aliases(run, workdir):
    done = rayship("models", "list", cwd=workdir)
    assert done.returncode == 0
    row = next(ln for ln in done.stdout.splitlines() if "breast_cancer" in ln)
    assert "candidate" in row and "production" in row and "roc_auc" in row


def test_predict_sends_a_csv_and_writes_predictions(run, workdir):
    from sklearn.datasets import load_breast_cancer

    out, port = run
    rows = load_breast_cancer(as_frame=True).frame.drop(columns="target").head(5)
    rows.to_csv(workdir / "rows.csv", index=False)  # raw column names, spaces and all
    done = rayship(
        "predict",
        "breast_cancer",
        "--input",
        "rows.csv",
        "--url",
        f"http://127.0.0.1:{port}",
        "--output",
        "out.csv",
        cwd=workdir,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert pd.read_csv(workdir / "out.csv")["prediction"].isin([0, 1]).all()


def test_a_second_run_that_does_not_beat_production_keeps_serving_it(run, workdir):
    out, port = run
    spec = ROOT / "examples" / "breast_cancer.yaml"
    done = rayship("run", str(spec), "--port", str(port), "--num-samples", "1", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "serving the current production version 1" in done.stdout
    reply = httpx.get(f"http://127.0.0.1:{port}/v1/models/breast_cancer", timeout=10).json()
    assert reply["version"] == "1"


def test_down_stops_the_cluster_and_the_endpoint(run, workdir):
    out, port = run
    done = rayship("down", cwd=workdir, timeout=120)
    assert done.returncode == 0 and "stopped" in done.stdout
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models/breast_cancer", timeout=5)
    assert rayship("status", cwd=workdir).returncode == 1
