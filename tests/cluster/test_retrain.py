"""`rayship retrain` through the real CLI: the data it searches on, the gate against
production on the new holdout, promotion and the hot swap of a live endpoint under
steady load, a losing candidate, `--if-drifted` on undrifted traffic, and the cooldown.

The first tests need no Ray. The others share one `rayship run` (a real local cluster
that outlives each command, a real MLflow store, the endpoint over HTTP) of a churn
model, version 1; a retrain on data whose labels flipped (the old model got worse)
then promotes version 2. Logistic regressions and two trials a search keep the module
to a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from cli_runner import rayship

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from specs import make_churn  # noqa: E402


def spec_dict(source: Path, **overrides) -> dict:
    raw = {
        "name": "churn",
        "task": "classification",
        "data": {"source": str(source), "target": "churn", "categorical": ["plan", "region"]},
        "metric": "accuracy",
        "models": [
            {
                "type": "sklearn",
                "estimator": "sklearn.linear_model.LogisticRegression",
                "space": {"C": {"loguniform": [0.1, 10.0]}, "max_iter": 500},
            }
        ],
        "search": {"algorithm": "random", "scheduler": "none", "num_samples": 2},
        "serve": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": 0.5},
        "monitor": {"window": 300, "calibration_quantile": 0.999, "cooldown_s": 0},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def write_spec(folder: Path, filename: str, source: Path, **overrides) -> Path:
    path = folder / filename
    path.write_text(yaml.safe_dump(spec_dict(source, **overrides), sort_keys=False))
    return path


def flipped(rows: int, seed: int) -> pd.DataFrame:
    """Churn rows from a changed world: charges 40 higher (the traffic drifts) and the
    labels swapped (what made a customer churn now keeps them), so the model trained on
    the original rows is mostly wrong on these."""
    frame = make_churn(rows, seed)
    frame["monthly_charges"] += 40.0
    frame["churn"] = frame["churn"].map({"churned": "stayed", "stayed": "churned"})
    return frame


def feature_rows(path: Path) -> list[dict]:
    """A data file's feature rows as a client sends them (missing values as null)."""
    rows = pd.read_csv(path).drop(columns="churn")
    return rows.astype(object).where(rows.notna(), None).to_dict(orient="records")


# --------------------------------------------------------------------------- data, no Ray


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("retrain-data")
    paths = {"base": folder / "base.csv", "shifted": folder / "shifted.csv"}
    make_churn(1200, 0).to_csv(paths["base"], index=False)
    flipped(1000, 1).to_csv(paths["shifted"], index=False)
    return paths


def test_new_data_with_other_columns_is_refused_naming_them(data, tmp_path):
    from training.data import DataError
    from training.retrain import retrain_data
    from training.spec import parse_spec

    spec = parse_spec(spec_dict(data["base"]))
    odd = pd.read_csv(data["shifted"]).drop(columns=["region"]).assign(score=1.0)
    odd.to_csv(tmp_path / "odd.csv", index=False)
    for mode in ("append", "replace"):
        with pytest.raises(DataError) as info:
            retrain_data(spec, tmp_path / "odd.csv", mode, tmp_path / "state")
        message = str(info.value)
        assert "missing column(s) ['region']" in message, message
        assert "extra column(s) ['score']" in message, message


def test_append_keeps_the_old_rows_for_training_and_draws_the_holdout_from_the_new(data, tmp_path):
    from training.retrain import retrain_data
    from training.spec import parse_spec

    spec = parse_spec(spec_dict(data["base"]))
    got = retrain_data(spec, data["shifted"], "append", tmp_path / "state")
    assert (got.old_rows, got.new_rows) == (1200, 1000)
    s = got.splits
    assert len(s.X_test) == 200 and (s.X_test.index >= 1200).all()  # 20% of the new rows
    assert (s.X_train.index < 1200).sum() > 700  # the old rows train (and validate)
    assert len(s.X_train) + len(s.X_valid) + len(s.X_test) == 2200
    # What the search saw is a file, named in the spec that the version will carry.
    assert got.spec.data.source == str(got.path) and got.path.suffix == ".parquet"
    assert len(pd.read_parquet(got.path)) == 2200

    replaced = retrain_data(spec, data["shifted"], "replace", tmp_path / "state")
    assert replaced.old_rows == 0 and len(pd.read_parquet(replaced.path)) == 1000


def test_min_improvement_asks_more_than_beating_production(data):
    from training.pipeline import gate_reasons
    from training.spec import parse_spec

    spec = parse_spec(spec_dict(data["base"], gate={"min_improvement": 0.05}))
    assert gate_reasons(spec, 0.80, "1", 0.70) == []
    (reason,) = gate_reasons(spec, 0.73, "1", 0.70)
    assert "by 0.0300, less than gate.min_improvement 0.05" in reason
    (reason,) = gate_reasons(spec, 0.69, "1", 0.70)
    assert "does not beat production v1 (0.7000)" in reason
    assert gate_reasons(spec, 0.69, None, None) == []  # nothing in production yet
    loss = parse_spec(spec_dict(data["base"], metric="log_loss", gate={"min_improvement": 0.1}))
    assert gate_reasons(loss, 0.35, "1", 0.5) == []  # lower is better: 0.15 better
    assert gate_reasons(loss, 0.45, "1", 0.5)  # 0.05 better: not enough


def test_the_cooldown_clock_is_a_tag_of_the_registered_model(tmp_path):
    """What both a local run and a CronJob read: the last retrain's time on the model."""
    from training import registry
    from training.retrain import LAST_RETRAIN, cooldown_left, last_retrain, record_retrain

    uri = registry.tracking_uri(tmp_path / "state")
    assert last_retrain(uri, "churn") is None and cooldown_left(uri, "churn", 3600) == 0
    record_retrain(uri, "churn", when=1_000_000.0)  # creates the registered model
    assert registry.client(uri).get_registered_model("churn").tags[LAST_RETRAIN] == "1000000.000"
    assert cooldown_left(uri, "churn", 3600, now=1_000_100.0) == 3500
    assert cooldown_left(uri, "churn", 3600, now=1_004_000.0) == 0
    assert cooldown_left(uri, "churn", 0, now=1_000_100.0) == 0  # cooldown_s 0: no cooldown


def test_on_kubernetes_the_drift_check_goes_to_the_rayservices_serve_service():
    """KubeRay names the Service in front of a RayService's endpoint ``<name>-serve-svc``."""
    from cluster.retrain import Where, endpoint_url

    where = Where(Path(".rayship"), kubernetes=True, namespace="ml")
    url = endpoint_url("breast_cancer", where)
    assert url == "http://breast-cancer-serve-serve-svc.ml.svc:8000"
    where.url = "http://10.0.0.7:8000/"  # --url wins
    assert endpoint_url("breast_cancer", where) == "http://10.0.0.7:8000"


# --------------------------------------------------------------------------- live loop


@pytest.fixture(scope="module")
def live(data, tmp_path_factory, free_port):
    """`rayship run` of the churn spec: version 1 in production, served at `url`."""
    cwd = tmp_path_factory.mktemp("retrain")
    port = free_port()
    spec = write_spec(cwd, "churn.yaml", data["base"])
    done = rayship("run", str(spec), "--port", str(port), cwd=cwd)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "promoted churn version 1 to production" in done.stdout
        yield {"cwd": cwd, "spec": spec, "url": f"http://127.0.0.1:{port}"}
    finally:
        rayship("down", cwd=cwd, timeout=120)


def production(cwd: Path) -> str:
    from training import registry

    uri = registry.tracking_uri(cwd / ".rayship")
    return str(registry.resolve_version(uri, "churn", registry.PRODUCTION).version)


def versions(cwd: Path) -> list[str]:
    from training import registry

    uri = registry.tracking_uri(cwd / ".rayship")
    return [r["version"] for r in registry.list_versions(uri, "churn")]


def served_version(url: str) -> str:
    return httpx.get(f"{url}/v1/models/churn", timeout=10).json()["version"]


def replica_ids(cwd: Path) -> list[str]:
    """The endpoint's running replicas, asked from a driver of the cluster's own."""
    code = (
        "import json; from pathlib import Path; from cluster import local\n"
        "local.connect(Path('.rayship'), log_to_driver=False)\n"
        "from ray.serve.context import _get_global_client\n"
        "d = _get_global_client().get_serve_details()\n"
        "reps = d['applications']['rayship']['deployments']['ModelServer']['replicas']\n"
        "print(json.dumps(sorted(r['replica_id'] for r in reps if r['state'] == 'RUNNING')))\n"
    )
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_if_drifted_does_nothing_on_undrifted_traffic(live, data):
    url = live["url"]
    rows = feature_rows(data["base"])[:600]
    for start in range(0, len(rows), 100):
        resp = httpx.post(
            f"{url}/v1/models/churn:predict",
            json={"instances": rows[start : start + 100]},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
    wait_for_window(url, rows=300)  # the merged window of monitor.window rows is full
    done = rayship(
        "retrain", str(live["spec"]), "--data", str(data["shifted"]), "--if-drifted",
        cwd=live["cwd"],
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no drift: no feature of churn (version 1) drifted in the last 300 rows" in done.stdout
    assert "retrain data" not in done.stdout  # no search ran
    assert production(live["cwd"]) == "1" and served_version(url) == "1"
    assert versions(live["cwd"]) == ["1"]


def wait_for_window(url: str, rows: int, timeout: float = 60) -> None:
    """Until the endpoint's drift report covers ``rows`` rows (replicas hand their counts
    to the model's merger in the background)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = httpx.get(f"{url}/v1/models/churn/drift", timeout=10).json().get("window_rows")
        if seen == rows:
            return
        time.sleep(0.5)
    raise AssertionError(f"the drift window holds {seen} rows, not {rows}, after {timeout} s")


def wait_for_drift(url: str, timeout: float = 60) -> None:
    """Until the endpoint's drift report flags a feature (the shifted rows fill the window)."""
    deadline = time.monotonic() + timeout
    report: dict = {}
    while time.monotonic() < deadline:
        report = httpx.get(f"{url}/v1/models/churn/drift", timeout=10).json()
        if report.get("drifted"):
            return
        time.sleep(0.5)
    raise AssertionError(f"no feature drifted after {timeout} s: {report}")


def test_if_drifted_without_an_endpoint_is_a_clear_error(live, data, free_port):
    done = rayship(
        "retrain", str(live["spec"]), "--data", str(data["shifted"]), "--if-drifted",
        "--url", f"http://127.0.0.1:{free_port()}", cwd=live["cwd"],
    )  # fmt: skip
    assert done.returncode == 1
    assert "--if-drifted: no endpoint answers at http://127.0.0.1:" in done.stdout


def test_retrain_on_shifted_data_promotes_and_swaps_the_live_endpoint_under_load(live, data):
    """The traffic drifts (charges 40 higher), so `--if-drifted` retrains; on the new
    data (labels flipped) production scores far worse than when it was registered, the
    candidate beats it, becomes production, and the running replica serves it without a
    restart and without one failed request meanwhile."""
    url, cwd = live["url"], live["cwd"]
    before = replica_ids(cwd)
    shifted = feature_rows(data["shifted"])
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client(offset: int):
        with httpx.Client(timeout=30) as http:
            for i in range(offset, 10**6, 2):
                if stop.is_set():
                    break
                body = {"instances": [shifted[i % len(shifted)]]}
                resp = http.post(f"{url}/v1/models/churn:predict", json=body)
                version = resp.json().get("model_version") if resp.status_code == 200 else None
                answers.append((resp.status_code, version))
                stop.wait(0.02)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for_drift(url)
        done = rayship(
            "retrain", str(live["spec"]), "--data", str(data["shifted"]), "--mode", "replace",
            "--if-drifted", cwd=cwd,
        )  # fmt: skip
        after_swap = len(answers)
        stop.wait(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    drifted = next(ln for ln in out.splitlines() if ln.startswith("drifted in the last 300"))
    assert "monthly_charges" in drifted
    line = next(ln for ln in out.splitlines() if ln.startswith("production version 1:"))
    then, now, candidate = (float(x) for x in _scores(line))
    assert now < then - 0.2 and candidate > now  # the old model got worse; the new one wins
    assert "promoted churn version 2 to production" in out
    assert f"live at {url}/v1/models/churn: version 2 (swapped in place)" in out
    statuses = Counter(status for status, _ in answers)
    assert statuses == {200: len(answers)}, statuses
    assert len(answers) > 20  # requests kept coming throughout the search and the swap
    late = answers[after_swap + len(threads) :]  # sent after the command returned
    assert answers[0][1] == "1" and late and {v for _, v in late} == {"2"}
    assert production(cwd) == "2" and served_version(url) == "2"
    assert replica_ids(cwd) == before  # reconfigured in place, not restarted


def _scores(line: str) -> list[str]:
    """'production version 1: accuracy A when registered, B on the new holdout;
    candidate C' → [A, B, C]."""
    import re

    return re.findall(r"(\d+\.\d+)", line)


def test_a_losing_candidate_leaves_production_and_the_endpoint(live, data):
    """Back on the original data the candidate is far better than production (trained on
    the flipped labels), but not by the spec's gate.min_improvement: nothing changes."""
    url, cwd = live["url"], live["cwd"]
    spec = write_spec(cwd, "strict.yaml", data["base"], gate={"min_improvement": 0.9})
    done = rayship("retrain", str(spec), "--data", str(data["base"]), "--mode", "replace", cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr  # a correct refusal, not a failure
    out = done.stdout
    refusal = next(ln for ln in out.splitlines() if ln.startswith("not promoted:"))
    assert "improves on production v2" in refusal
    assert "less than gate.min_improvement 0.9" in refusal
    assert "production stays version 2 and the endpoint is unchanged" in refusal
    assert production(cwd) == "2" and served_version(url) == "2"
    assert versions(cwd) == ["1", "2"]  # a refused candidate is not registered


def test_cooldown_refuses_a_second_retrain(live, data):
    """The retrains above ran moments ago: with a cooldown of an hour the next one is
    refused before any search (exit 0, so a CronJob does not fail on it)."""
    from training import registry
    from training.retrain import LAST_RETRAIN

    cwd = live["cwd"]
    spec = write_spec(cwd, "cool.yaml", data["base"], monitor={"cooldown_s": 3600})
    done = rayship("retrain", str(spec), "--data", str(data["shifted"]), cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cooldown: churn was last retrained at" in done.stdout
    assert "(--force retrains now); nothing done" in done.stdout
    assert "retrain data" not in done.stdout
    uri = registry.tracking_uri(cwd / ".rayship")
    assert LAST_RETRAIN in registry.client(uri).get_registered_model("churn").tags
    assert production(cwd) == "2"
