"""`rayship tune --resume` continues a search whose driver was killed (SIGKILL) or
interrupted (Ctrl-C), without running its finished trials again.

Real processes: `rayship tune` is started and SIGKILLed once Tune's saved state holds a
finished trial; `rayship tune --resume` is interrupted with SIGINT once one more trial
has finished; a second `--resume` finishes the search and registers the winner. (One
test for both signals: each `rayship tune` costs a Ray start, so the Ctrl-C case rides
on the killed search's resume instead of a search of its own.)
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
from specs import ROOT, churn_spec

sys.path.insert(0, str(ROOT / "tests" / "cluster"))
from cli_runner import start as start_rayship  # noqa: E402

from training import registry

TRIALS = 6  # 2 families x 3 samples, one at a time


def finished(result_json: str) -> bool:
    """Whether a trial's last report was its last: the logistic regression reports once,
    the forest when it holds all its trees."""
    last = json.loads(result_json.splitlines()[-1])
    return last.get("iterations") in (None, last.get("budget"))


def terminated_trials(state: Path) -> set[str]:
    """The trial folders Tune's newest saved experiment state has as TERMINATED: what a
    resume must not run again."""
    saved = sorted(state.glob("searches/churn-*/experiment_state-*.json"))
    if not saved:
        return set()
    try:
        data = json.loads(saved[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return set()
    return {
        trial["relative_logdir"]
        for trial in (json.loads(t) for t, _ in data["trial_data"])
        if trial["status"] == "TERMINATED"
    }


def reported_trials(state: Path) -> dict[str, str]:
    """Every trial folder with reports, and its result.json."""
    paths = state.glob("searches/churn-*/trial-*/result.json")
    return {p.parent.name: p.read_text() for p in paths if p.stat().st_size}


def wait_until_terminated(proc: subprocess.Popen, state: Path, more_than: int) -> set[str]:
    """Wait (at most 240 s) until Tune's saved state holds more than ``more_than``
    finished trials; returns them."""
    deadline = time.monotonic() + 240
    while len(done := terminated_trials(state)) <= more_than:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"no trial beyond {more_than} finished in 240 s"
        time.sleep(0.1)
    return done


AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # each raylet's two agents


def session_processes(sid: int) -> dict[int, str]:
    """The live processes of session ``sid`` (zombies excluded), with their commands."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if os.getsid(int(entry.name)) == sid and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ")
        except (OSError, IndexError):
            continue
    return found


def wait_for_exit(sid: int, deadline: float, but: tuple[str, ...] = ()) -> None:
    """Wait until session ``sid`` has no process left (but those whose command starts
    with one of ``but``); fail at ``deadline`` (time.monotonic)."""
    while left := {
        pid: cmd for pid, cmd in session_processes(sid).items() if not cmd.startswith(but)
    }:
        assert time.monotonic() < deadline, f"processes of the killed search left: {left}"
        time.sleep(0.5)


def test_a_killed_then_interrupted_search_resumes_without_rerunning_finished_trials(
    tmp_path, churn_csv
):
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
        "num_samples": 3,
        "max_concurrent_trials": 1,
    }
    spec = tmp_path / "churn.yaml"
    spec.write_text(yaml.safe_dump(raw))
    state = tmp_path / ".rayship"
    uri = registry.tracking_uri(state)

    # 1. SIGKILL: no handler runs, Tune saves nothing more, Ray is not shut down.
    # (Started in a session of its own, so the Ray processes it starts can be told apart.)
    first = start_rayship("tune", str(spec), cwd=tmp_path)
    wait_until_terminated(first, state, more_than=0)
    first.kill()
    first.communicate(timeout=60)
    # The local Ray that driver started dies with it: Ray ties its GCS and raylet to the
    # driver, and the raylet's workers to the raylet. Only the raylet's two agents stay
    # a while: they tell the (dead) GCS that the raylet died, with a 60 s timeout.
    killed_at = time.monotonic()
    wait_for_exit(first.pid, killed_at + 30, but=AGENTS)
    ray_gone_s = time.monotonic() - killed_at
    killed = terminated_trials(state)  # what Tune had saved when the driver died
    reports_then = reported_trials(state)
    assert 0 < len(killed) < TRIALS and all(finished(reports_then[t]) for t in killed)
    assert registry.list_versions(uri) == []  # nothing registered

    # 2. Ctrl-C during the resume: Tune saves its state and the command says how to go on.
    second = start_rayship("tune", str(spec), "--resume", cwd=tmp_path)
    wait_until_terminated(second, state, more_than=len(killed))
    second.send_signal(signal.SIGINT)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 1, out
    assert "interrupted" in out and "--resume" in out
    assert registry.list_versions(uri) == []
    interrupted = terminated_trials(state)
    assert killed < interrupted and len(interrupted) < TRIALS
    reports_then = reported_trials(state)

    # 3. The second resume finishes the same search and registers its winner.
    third = start_rayship("tune", str(spec), "--resume", cwd=tmp_path)
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out
    assert f"search: {TRIALS} trials (0 errored)" in out
    assert len(list(state.glob("searches/churn-*"))) == 1  # continued, not a new search
    after = reported_trials(state)
    assert len(after) == TRIALS
    for trial in interrupted:
        # A trial Tune had recorded as finished keeps its reports: it did not run again.
        # One cut off mid-way continues from the last checkpoint Tune recorded, or
        # starts again when it had recorded none; tests/training/test_trials.py checks
        # the resume from a checkpoint itself.
        assert after[trial] == reports_then[trial]
    assert [v["aliases"] for v in registry.list_versions(uri)] == [["candidate"]]
    assert json.loads(next(iter(after.values())).splitlines()[-1])["node_id"]
    # The killed search's agents did not stop the resumes, and have gone by themselves.
    wait_for_exit(first.pid, killed_at + 90)
    agents_gone_s = time.monotonic() - killed_at
    print(
        f"SIGKILLed tune: {len(killed)} of {TRIALS} trials saved as finished; its Ray gone "
        f"{ray_gone_s:.1f} s after the kill, Ray's agents gone by {agents_gone_s:.0f} s"
    )
