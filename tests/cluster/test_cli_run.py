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
from cli_runner import rayship

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_sample_request_uses_the_datas_column_names(run, workdir):
    """The sample `rayship run` sends and the curl line's body: the user's own columns."""
    sample = json.loads((workdir / ".rayship" / "breast_cancer-sample.json").read_text())
    (row,) = sample["instances"]
    assert len(row) == 30 and "mean radius" in row and "mean_radius" not in row


def predict_csv(port: int, csv: str, out: str, cwd: Path) -> pd.DataFrame:
    done = rayship(
        "predict",
        "breast_cancer",
        "--input",
        csv,
        "--url",
        f"http://127.0.0.1:{port}",
        "--output",
        out,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return pd.read_csv(cwd / out)


def test_predict_sends_a_csv_and_writes_predictions(run, workdir):
    """A CSV with the table's own header (spaces and all) and one with the ONNX names get
    the same predictions; the output keeps the input's header."""
    from sklearn.datasets import load_breast_cancer

    from training.data import safe_name

    out, port = run
    rows = load_breast_cancer(as_frame=True).frame.drop(columns="target").head(20)
    rows.to_csv(workdir / "rows.csv", index=False)  # raw column names, spaces and all
    written = predict_csv(port, "rows.csv", "out.csv", workdir)
    assert list(written.columns) == [*rows.columns, "prediction"]
    assert written["prediction"].isin([0, 1]).all() and len(written) == 20
    rows.rename(columns=safe_name).to_csv(workdir / "safe.csv", index=False)
    again = predict_csv(port, "safe.csv", "safe-out.csv", workdir)
    assert "mean_radius" in again.columns
    assert again["prediction"].tolist() == written["prediction"].tolist()


def test_a_second_run_that_does_not_beat_production_keeps_serving_it(run, workdir):
    out, port = run
    spec = ROOT / "examples" / "breast_cancer.yaml"
    done = rayship("run", str(spec), "--port", str(port), "--num-samples", "1", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "serving the current production version 1" in done.stdout
    reply = httpx.get(f"http://127.0.0.1:{port}/v1/models/breast_cancer", timeout=10).json()
    assert reply["version"] == "1"


def test_write_config_is_the_config_serve_deploy_runs(run, workdir):
    """`rayship serve --write-config` writes the generator's bytes, and Ray's own
    `serve deploy FILE` runs them: here a 50% canary of version 1 on itself."""
    import yaml

    from cluster import local
    from services.serve_config import ServedModel, dump, serve_config
    from training.registry import tracking_uri
    from training.spec import load_spec

    out, port = run
    done = rayship(
        "serve", "breast_cancer/1", "--port", str(port), "--canary", "1",
        "--canary-weight", "0.5", "--write-config", "endpoint.yaml", cwd=workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    text = (workdir / "endpoint.yaml").read_text()
    spec = load_spec(ROOT / "examples" / "breast_cancer.yaml")
    model = ServedModel(
        name="breast_cancer", ref="1", serve=spec.serve, canary_ref="1", canary_weight=0.5
    )
    uri = tracking_uri(workdir / ".rayship")
    assert text == dump(serve_config([model], tracking_uri=uri, port=port))
    assert "enable_access_log: false" in text  # replicas log no line per request by default

    info = local.info(workdir / ".rayship")
    deployed = subprocess.run(
        [
            str(Path(sys.executable).parent / "serve"),
            "deploy",
            "endpoint.yaml",
            "-a",
            info.dashboard,
        ],
        cwd=workdir,
        env={**os.environ, **info.driver_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    from services.deploy import wait_ready

    meta = wait_ready(f"http://127.0.0.1:{port}", "breast_cancer", ("1", "1"), timeout=60)
    assert meta["canary"] == {"version": "1", "weight": 0.5}
    assert yaml.safe_load(text)["applications"][0]["deployments"][0]["user_config"]["models"][0][
        "canary"
    ] == {"ref": "1", "weight": 0.5}


def test_canary_then_promote_moves_the_live_endpoint(run, workdir, tmp_path):
    out, port = run
    url = f"http://127.0.0.1:{port}"
    spec = yaml_spec_without_production_gate(tmp_path)
    done = rayship("tune", str(spec), "--num-samples", "1", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "registered breast_cancer version 2 as candidate" in done.stdout

    done = rayship(
        "serve", "breast_cancer", "--port", str(port), "--canary", "2",
        "--canary-weight", "0.5", cwd=workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    body = {"instances": [[0.0] * 30]}
    versions = [
        httpx.post(f"{url}/v1/models/breast_cancer:predict", json=body, timeout=10).json()[
            "model_version"
        ]
        for _ in range(20)
    ]
    assert set(versions) == {"1", "2"} and 5 <= versions.count("2") <= 15, versions

    done = rayship("models", "promote", "breast_cancer", "2", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "live at" in done.stdout and "version 2" in done.stdout
    meta = httpx.get(f"{url}/v1/models/breast_cancer", timeout=10).json()
    assert meta["version"] == "2" and meta["canary"] is None


def yaml_spec_without_production_gate(folder: Path) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "examples" / "breast_cancer.yaml").read_text())
    raw["gate"]["must_beat_production"] = False
    path = folder / "breast_cancer.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_access_log_is_one_switch_away(run, workdir):
    """`rayship serve --access-log` turns on the replicas' request log that is off by default."""
    import yaml

    out, port = run
    done = rayship(
        "serve", "breast_cancer/1", "--port", str(port), "--access-log",
        "--write-config", "logged.yaml", cwd=workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (app,) = yaml.safe_load((workdir / "logged.yaml").read_text())["applications"]
    (deployment,) = app["deployments"]
    assert deployment["logging_config"] == {"enable_access_log": True}


def test_status_shows_the_native_ingress_and_its_stats_page_lists_the_replicas(run, workdir):
    """`rayship status` names the ingress and HAProxy's stats port; HAProxy's stats page
    there lists the endpoint's replicas as UP servers."""
    info = json.loads((workdir / ".rayship" / "cluster.json").read_text())
    stats = info["haproxy_ports"][0]
    done = rayship("status", cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ingress: HAProxy -> replica (stats :{stats}/stats" in done.stdout
    csv = httpx.get(f"http://127.0.0.1:{stats}/stats;csv", timeout=10).text
    up = [ln for ln in csv.splitlines() if ",UP," in ln and not ln.startswith(("#", "stats"))]
    assert any(not ln.split(",")[1].startswith(("FRONTEND", "BACKEND")) for ln in up), csv


def test_down_stops_the_cluster_and_the_endpoint(run, workdir):
    out, port = run
    done = rayship("down", cwd=workdir, timeout=120)
    assert done.returncode == 0 and "stopped" in done.stdout
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models/breast_cancer", timeout=5)
    assert rayship("status", cwd=workdir).returncode == 1
