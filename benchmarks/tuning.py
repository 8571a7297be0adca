"""Search speed: rayship against scikit-learn's searches and Optuna, to a target holdout score.

Cases (``--quick`` is smaller; the numbers below are the full mode):

- ``digits-hgb``: ``sklearn:digits`` (1,797 rows, 64 features, 10 classes),
  HistGradientBoostingClassifier, 16 configurations;
- ``digits-mlp``: the same data, rayship's torch MLP (1 worker), 12 configurations of
  12 epochs;
- ``table-hgb``: a generated 200,000 x 40 table (``benchlib.generated_table``:
  ``make_classification``, seed 0; nothing is downloaded), HistGradientBoosting, 16
  configurations.

Tools (``benchmarks/tuning_tools.py`` says exactly how each is set up): ``rayship``
(its default search: Optuna TPE + ASHA), ``rayship-up`` (the same, on a cluster that
``rayship up --workers 0`` started before the timer: what a team that keeps a cluster up
waits for),
``rayship-random`` (random + ASHA, full mode only), ``randomized``
(RandomizedSearchCV), ``halving`` (HalvingRandomSearchCV), ``optuna`` (Optuna TPE +
SuccessiveHalvingPruner). Every tool gets the spec's split (train / valid / holdout,
from ``training.pipeline.prepare``), its search space and the same number of
configurations; ``n_jobs`` / workers = cores; one thread per trial.

Each run is a fresh process (rayship's includes starting Ray, as ``rayship tune`` does,
and exporting and registering the winner). Every model a tool reports is kept with
its valid score and the time it was reported; afterwards, outside the timed run, each
model that was the best so far (by valid score, the only score a search may look at)
is scored on the holdout, which no search sees. From that:

- **time to target**: seconds from the tool's process start until the holdout score of
  its best-so-far model first reaches the case's target;
- **best at budget**: the holdout score of the best-so-far model at a fixed wall time;
- **time to the common score**: the same as time to target, for the lowest final score
  any run of the case reached (so a ratio exists even if a fixed target is missed);
- **CPU utilisation**: busy CPU seconds of the whole machine during the run
  (``/proc/stat``; the runs hold the machine alone) / (wall x cores).

Tools run one at a time, in a rotating order across repeats (``--repeats``, 3 in full
mode); medians are reported.

    .venv/bin/python benchmarks/tuning.py [--quick | --full] [--out-dir DIR]
        [--cases digits-hgb,digits-mlp,table-hgb] [--tools rayship,randomized,halving,optuna]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import benchlib  # noqa: E402

HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
HGB_SPACE = {
    "learning_rate": {"loguniform": [0.01, 0.3]},
    "max_depth": {"randint": [2, 12]},
    "max_leaf_nodes": {"randint": [8, 64]},
    "min_samples_leaf": {"randint": [5, 60]},
    "l2_regularization": {"loguniform": [1.0e-4, 1.0]},
    "early_stopping": False,  # every configuration grows to max_iter: the same work for all
}
MLP_SPACE = {
    "hidden_layers": {"choice": [[64], [128, 64]]},
    "lr": {"loguniform": [1.0e-4, 1.0e-1]},
    "dropout": {"uniform": [0.0, 0.5]},
    "batch_size": {"choice": [32, 64, 128]},
    "epochs": 12,
}
PEERS = ("randomized", "halving", "optuna")
UP_TOOL = "rayship-up"  # rayship on a cluster `rayship up` started before the timer
RAYSHIP = str(Path(sys.executable).with_name("rayship"))
# The issue's targets: rayship's time to target against the best peer's.
RATIO_TARGET = {"digits": 1.0, "table": 0.5}


def cases(quick: bool) -> list[dict[str, Any]]:
    """The benchmark cases; ``target`` is a holdout accuracy every tool reached in trial runs
    on this machine, ``wall_budget_s`` the time at which "best at budget" is read."""
    return [
        {
            "name": "digits-hgb",
            "data": "sklearn:digits",
            "model": {
                "type": "sklearn",
                "estimator": HGB,
                "space": {**HGB_SPACE, "max_iter": 100},
            },
            "budget": 8 if quick else 16,
            "target": 0.95,
            "wall_budget_s": 30,
        },
        {
            "name": "digits-mlp",
            "data": "sklearn:digits",
            "model": {"type": "torch_mlp", "workers": 1, "space": MLP_SPACE},
            "budget": 6 if quick else 12,
            "target": 0.95,
            "wall_budget_s": 30,
        },
        {
            "name": "table-hgb",
            "data": "table",
            "model": {
                "type": "sklearn",
                "estimator": HGB,
                "space": {**HGB_SPACE, "max_iter": 100 if quick else 200},
            },
            "budget": 8 if quick else 16,
            "target": 0.93,
            "wall_budget_s": 60 if quick else 120,
        },
    ]


def case_spec(case: dict[str, Any], tool: str, source: str) -> dict[str, Any]:
    """The rayship spec of a case; the peers read their data, split, space and budget from it."""
    return {
        "name": f"bench-{case['name']}",
        "task": "classification",
        "data": {"source": source, "target": "target", "seed": 0},
        "metric": "accuracy",
        "models": [case["model"]],
        "search": {
            "algorithm": "random" if tool == "rayship-random" else "optuna",
            "scheduler": "asha",
            "num_samples": case["budget"],
        },
        "gate": {"min_metric": None, "must_beat_production": False},
    }


# --- one tool in its own process -------------------------------------------------------


def child(tool: str, spec_path: Path, workdir: Path) -> None:
    from benchmarks import tuning_tools

    spec = json.loads(spec_path.read_text())
    result = tuning_tools.run(tool, spec, workdir, benchlib.cores())
    benchlib.write_json(workdir / "result.json", result)


def run_tool(tool: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    spec_path = workdir / "spec.json"
    benchlib.write_json(spec_path, spec)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run",
        tool,
        "--spec",
        str(spec_path),
        "--workdir",
        str(workdir),
    ]
    env = benchlib.child_env()
    keep: frozenset[int] = frozenset()
    if tool == UP_TOOL:  # the cluster starts before the timer, as `rayship up` does once
        benchlib.become_subreaper()
        subprocess.run(
            [RAYSHIP, "up", "--workers", "0"],
            cwd=workdir,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        keep = benchlib.orphans()
    try:
        m = benchlib.run_measured(cmd, workdir / "output.log", cwd=workdir, env=env, keep=keep)
    finally:
        if tool == UP_TOOL:
            subprocess.run(
                [RAYSHIP, "down"],
                cwd=workdir,
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            benchlib.end_orphans()
    if m.returncode != 0 or not (workdir / "result.json").exists():
        raise RuntimeError(
            f"{tool} failed (exit {m.returncode}); last output:\n{benchlib.tail(m.log_path)}"
        )
    result = json.loads((workdir / "result.json").read_text())
    n = benchlib.cores()
    if "phases" in result:  # rayship: seconds from process start to each phase
        result["phases"] = {k: round(v - m.started, 2) for k, v in result["phases"].items()}
    result.update(
        wall_s=round(m.wall_s, 2),
        done_s=round(result.pop("done") - m.started, 2),
        cpu_s=round(m.cpu_s, 2),
        cpu_utilisation=round(m.utilisation(n), 3),
        stragglers_ended=m.stragglers,
        started=m.started,
    )
    return result


# --- scoring the reported models on the holdout -----------------------------------------


class Holdout:
    """Scores a reported model on the case's holdout, as rayship's gate does."""

    def __init__(self, spec_dict: dict[str, Any]):
        from training.pipeline import prepare
        from training.spec import parse_spec

        self.spec = parse_spec(spec_dict)
        self.prep = prepare(self.spec)
        self.schema = self.prep.splits.schema
        self.n_features = self.prep.arrays["X_train"].shape[1]

    def score_native(self, native) -> float:
        from training import export
        from training.pipeline import holdout_score

        s = self.prep.splits
        pred, proba = export.native_outputs(
            self.prep.pre, native, self.spec.task, self.schema.classes, s.X_test
        )
        return holdout_score(self.spec.metric, self.schema, s.y_test, pred, proba)

    def rayship_model(self, path: Path, config: dict[str, Any]) -> float:
        from training.pipeline import load_winner, native_predictor

        found = SimpleNamespace(best_config=config, best_checkpoint=str(path))
        winner, _, scaling = load_winner(found, self.spec, self.schema, self.n_features)
        return self.score_native(native_predictor(winner, self.schema, scaling))

    def peer_model(self, path: Path) -> float:
        import joblib

        from benchmarks import tuning_tools  # noqa: F401  (the MLP peer's class)

        return self.score_native(joblib.load(path))


def trajectory(workdir: Path, tool: str, started: float, holdout: Holdout) -> list[dict]:
    """Best-so-far models in time order: each point is a model that beat every earlier one
    on the valid split, with its holdout score."""
    from training.evaluate import better

    metric = holdout.spec.metric
    events = []
    for line in (workdir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("model") and e.get("valid") is not None:
            events.append(e)
    events.sort(key=lambda e: e["t"])
    points, best = [], None
    for e in events:
        if best is not None and not better(metric, e["valid"], best):
            continue
        best = e["valid"]
        path = workdir / "models" / e["model"]
        if tool.startswith("rayship"):
            value = holdout.rayship_model(path, e["config"])
        else:
            value = holdout.peer_model(path)
        points.append(
            {
                "t": round(e["t"] - started, 3),
                "valid": round(float(e["valid"]), 5),
                "holdout": round(float(value), 5),
                "trial": e.get("trial"),
                "step": e.get("step"),
            }
        )
    return points


def reports_per_trial(workdir: Path) -> dict[str, Any]:
    """How many reports each trial made (its last step): shows pruning and rung layout."""
    steps: dict[str, int] = {}
    for line in (workdir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("trial") is not None and e.get("step") is not None:
            steps[str(e["trial"])] = max(steps.get(str(e["trial"]), 0), int(e["step"]))
    counts = sorted(steps.values())
    return {"trials": len(counts), "last_step_of_each": counts}


def first_reaching(points: list[dict], target: float, metric: str) -> float | None:
    from training.evaluate import reaches

    for p in points:
        if reaches(metric, p["holdout"], target):
            return p["t"]
    return None


def at_time(points: list[dict], t: float) -> float | None:
    before = [p for p in points if p["t"] <= t]
    return before[-1]["holdout"] if before else None


def median(values: list[float | None]) -> float | None:
    """Median of the runs; None when any run never got there (a missed target is no time)."""
    if not values or any(v is None for v in values):
        return None
    return round(statistics.median(values), 3)


def analyse(case: dict[str, Any], runs: dict[str, list[dict]], metric: str) -> dict[str, Any]:
    """Per-tool medians, the common score and rayship's ratios against the best peer."""
    finals = [r["final_holdout"] for rs in runs.values() for r in rs if r["final_holdout"]]
    common = min(finals) if finals else None
    for rs in runs.values():
        for r in rs:
            r["time_to_common_s"] = (
                first_reaching(r["trajectory"], common, metric) if common is not None else None
            )
    summary = {}
    for tool, rs in runs.items():
        summary[tool] = {
            "time_to_target_s": median([r["time_to_target_s"] for r in rs]),
            "reached_target": sum(r["time_to_target_s"] is not None for r in rs),
            "runs": len(rs),
            "time_to_common_s": median([r["time_to_common_s"] for r in rs]),
            "best_at_budget": median([r["best_at_budget"] for r in rs]),
            "final_holdout": median([r["final_holdout"] for r in rs]),
            "wall_s": median([r["wall_s"] for r in rs]),
            "done_s": median([r["done_s"] for r in rs]),
            "cpu_utilisation": median([r["cpu_utilisation"] for r in rs]),
            "fits": median([r.get("fits") for r in rs]),
        }
    peers = {t: s for t, s in summary.items() if t in PEERS}
    ratios = {}
    for key in ("time_to_target_s", "time_to_common_s"):
        times = {t: s[key] for t, s in peers.items() if s[key] is not None}
        best_peer = min(times, key=times.get) if times else None
        for tool in (t for t in summary if t.startswith("rayship")):
            mine = summary[tool][key]
            ratios.setdefault(tool, {})[key] = {
                "best_peer": best_peer,
                "ratio": round(mine / times[best_peer], 3) if best_peer and mine else None,
            }
    limit = RATIO_TARGET[case["name"].split("-")[0]]
    check = ratios.get("rayship", {}).get("time_to_target_s", {}).get("ratio")
    return {
        "common_score": common,
        "summary": summary,
        "ratios": ratios,
        "issue_target": {
            "what": f"rayship time to target <= {limit}x the best peer",
            "limit": limit,
            "ratio": check,
            "met": None if check is None else check <= limit,
        },
    }


def run_case(
    case: dict[str, Any], tools: list[str], repeats: int, work: Path, data_dir: Path
) -> dict[str, Any]:
    source = case["data"]
    if source == "table":
        source = str(benchlib.generated_table(data_dir))
    holdout = Holdout(case_spec(case, "rayship", source))
    metric = holdout.spec.metric
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    settings: dict[str, Any] = {}
    for rep in range(repeats):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
        for tool in order:
            benchlib.log(f"{case['name']}: {tool} (run {rep + 1}/{repeats})")
            workdir = work / case["name"] / f"{tool}-{rep}"
            result = run_tool(tool, case_spec(case, tool, source), workdir)
            points = trajectory(workdir, tool, result.pop("started"), holdout)
            settings[tool] = result.pop("settings")
            result.update(
                trajectory=points,
                reports=reports_per_trial(workdir),
                time_to_target_s=first_reaching(points, case["target"], metric),
                best_at_budget=at_time(points, case["wall_budget_s"]),
                final_holdout=points[-1]["holdout"] if points else None,
                load_average=[round(x, 2) for x in os.getloadavg()],
            )
            runs[tool].append(result)
            benchlib.log(
                f"  wall {result['wall_s']} s, to target {result['time_to_target_s']} s, "
                f"final holdout {result['final_holdout']}, cpu {result['cpu_utilisation']}"
            )
    splits = holdout.prep.splits
    return {
        "case": case,
        "data": {
            "source": case["data"] if case["data"] != "table" else {**benchlib.TABLE},
            "rows": {"train": len(splits.X_train), "valid": len(splits.X_valid)}
            | {"holdout": len(splits.X_test)},
            "features": holdout.n_features,
            "content_sha256": splits.content_hash,
        },
        "metric": metric,
        "settings": settings,
        "runs": runs,
        **analyse(case, runs, metric),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller cases, one run each")
    mode.add_argument("--full", action="store_true", help="full cases, --repeats runs (default)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    parser.add_argument("--tools", default=None, help="comma-separated tools")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=int, default=None, help="override every case's budget")
    parser.add_argument("--work-dir", default=None, help="scratch (default: a temp folder)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args.run, args.spec, args.workdir)
        return
    quick = args.quick
    out = benchlib.out_dir(args.out_dir, quick)
    tools = (
        args.tools.split(",")
        if args.tools
        else ["rayship", UP_TOOL, "randomized", "halving", "optuna"]
        + ([] if quick else ["rayship-random"])
    )
    repeats = args.repeats or (1 if quick else 3)
    chosen = [c for c in cases(quick) if not args.cases or c["name"] in args.cases.split(",")]
    for c in chosen:
        if args.budget:
            c["budget"] = args.budget
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rayship-bench-tuning-"))
    data_dir = Path(tempfile.gettempdir()) / "rayship-bench-data"
    report: dict[str, Any] = {
        "benchmark": "tuning",
        "mode": "quick" if quick else "full",
        "machine": benchlib.machine(),
        "repeats": repeats,
        "tools": tools,
        "definitions": {
            "time_to_target_s": "seconds from the tool's process start until the holdout "
            "score of its best-so-far model (best valid score so far) first reaches the target",
            "best_at_budget": "holdout score of the best-so-far model at wall_budget_s",
            "common_score": "the lowest final holdout score of any run of the case",
            "cpu_utilisation": "busy CPU seconds of the machine during the run / (wall x cores)",
            "wall_s": "process start to exit (rayship: including Ray start, export, registration)",
            "done_s": "process start to the search's result (rayship: after registration)",
        },
        "cases": [],
    }
    started = time.monotonic()
    try:
        for case in chosen:
            report["cases"].append(run_case(case, tools, repeats, work, data_dir))
            benchlib.write_json(out / "tuning.json", report)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = round(time.monotonic() - started, 1)
    benchlib.write_json(out / "tuning.json", report)
    for c in report["cases"]:
        print(c["case"]["name"], json.dumps(c["summary"], indent=1), c["issue_target"])


if __name__ == "__main__":
    main()
