"""`rayship tune --resume` continues a search interrupted with Ctrl-C.

Real processes: `rayship tune` is started, interrupted with SIGINT once its first
trial has reported, then resumed by a second `rayship tune --resume`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from specs import churn_spec

from training import registry

TRIALS = 4


def rayship(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(result_json: str) -> bool:
    """Whether a trial's last report was its last: the logistic regression reports once,
    the forest when it holds all its trees."""
    last = json.loads(result_json.splitlines()[-1])
    return last.get("iterations") in (None, last.get("budget"))


def terminated_trials(state: Path) -> set[str]:
    """The trial folders Tune's newest saved experiment state has as TERMINATED: what a
    resume must not run again."""
    (newest,) = sorted(state.glob("searches/churn-*/experiment_state-*.json"))[-1:]
    return {
        trial["relative_logdir"]
        for trial in (json.loads(t) for t, _ in json.loads(newest.read_text())["trial_data"])
        if trial["status"] == "TERMINATED"
    }


def reported_trials(state: Path) -> list[Path]:
    return [p for p in state.glob("searches/churn-*/trial-*/result.json") if p.stat().st_size]


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, churn_csv):
    raw = churn_spec(churn_csv)
    raw["models"][0]["space"] = {"C": 1.0}  # grid: constants and choices only
    raw["models"].append(
        {
            "type": "sklearn",
            "estimator": "sklearn.ensemble.RandomForestClassifier",
            "space": {"n_estimators": 100},
        }
    )
    raw["search"] = {
        "algorithm": "grid",
        "scheduler": "none",
        "num_samples": 2,
        "max_concurrent_trials": 1,
    }
    spec = tmp_path / "churn.yaml"
    spec.write_text(yaml.safe_dump(raw))
    state = tmp_path / ".rayship"

    first = rayship("tune", str(spec), cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not reported_trials(state) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    assert reported_trials(state), "no trial reported within 240 s"
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 1, out
    assert "interrupted" in out and "--resume" in out
    assert registry.list_versions(registry.tracking_uri(state)) == []  # nothing registered
    done_before = {p.parent.name: p.read_text() for p in reported_trials(state)}
    assert 0 < len(done_before) < TRIALS
    terminated = terminated_trials(state)

    second = rayship("tune", str(spec), "--resume", cwd=tmp_path)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert f"search: {TRIALS} trials (0 errored)" in out
    searches = list(state.glob("searches/churn-*"))
    assert len(searches) == 1  # the same search continued, not a new one
    after = {p.parent.name: p.read_text() for p in reported_trials(state)}
    assert len(after) == TRIALS
    for trial in terminated:
        # A trial Tune had recorded as finished keeps its reports and is not run again.
        # One cut off mid-way continues from the last checkpoint Tune recorded, or
        # starts again when it had recorded none (a report can reach result.json before
        # its checkpoint reaches the experiment state); tests/training/test_trials.py
        # checks the resume from a checkpoint itself.
        assert finished(done_before[trial]) and after[trial] == done_before[trial]
    assert [v["aliases"] for v in registry.list_versions(registry.tracking_uri(state))] == [
        ["candidate"]
    ]
    assert json.loads(next(iter(after.values())).splitlines()[-1])["node_id"]
