"""What a search costs besides training, on an in-process Ray with this machine's cores.

- **Tune bookkeeping**: N trials that each sleep 1 s and report once with a checkpoint,
  run by Tune with rayship's settings (``reuse_actors``, ``max_concurrent_trials`` =
  cores, its MLflow callback and JSON/CSV loggers, a checkpoint a report), against the
  minimum N x 1 s / cores; once more with ``reuse_actors=False`` (Ray's default) for
  contrast. A plain function trainable, not ``training.train.run_trial``: a trial of
  known length is what separates bookkeeping from work.
- **Fixed cost of a trial**, by family, through ``training.tune.run_search``: three
  trials one at a time of a ``DummyClassifier`` (no learning), a 1-worker torch MLP of
  one epoch and a 2-worker ``TorchTrainer`` trial of one epoch, on breast_cancer. For
  each trial, Tune's ``time_total_s`` at its first report (from the trial function's
  start: imports, data, the Train run's start for DDP, one epoch, the report) — the
  first trial of a family is cold (a new actor: imports), the others warm (a reused
  actor) — and the search's wall time per trial, which adds actor starts and Tune's
  scheduling.

    .venv/bin/python benchmarks/overhead.py [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import benchlib  # noqa: E402

DUMMY = {"type": "sklearn", "estimator": "sklearn.dummy.DummyClassifier"}
TORCH = {"type": "torch_mlp", "space": {"epochs": 1, "hidden_layers": [16]}}
FAMILIES = {
    "sklearn": DUMMY,
    "torch_1_worker": {**TORCH, "workers": 1},
    "torch_ddp_2_workers": {**TORCH, "workers": 2},
}


def _sleep_trial(config: dict[str, Any]) -> None:
    import os
    import tempfile as tf

    from ray import tune

    time.sleep(1.0)
    with tf.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(config, f)
        tune.report({"score": config["x"]}, checkpoint=tune.Checkpoint.from_directory(tmp))


def bookkeeping(n: int, reuse: bool, state: Path) -> dict[str, Any]:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from training.tracking import MLflowTrials

    cores = benchlib.cores()
    tuner = tune.Tuner(
        tune.with_resources(_sleep_trial, {"CPU": 1}),
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=cores, reuse_actors=reuse),
        run_config=tune.RunConfig(
            name=f"sleep-{reuse}",
            storage_path=str(state / "searches"),
            callbacks=[
                MLflowTrials(f"sqlite:///{state}/mlflow.db", "overhead"),
                JsonLoggerCallback(),
                CSVLoggerCallback(),
            ],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    t0 = time.monotonic()
    grid = tuner.fit()
    wall = time.monotonic() - t0
    assert not grid.errors, grid.errors
    minimum = n * 1.0 / cores
    pids = {r.metrics["pid"] for r in grid}
    return {
        "trials": n,
        "reuse_actors": reuse,
        "wall_s": round(wall, 2),
        "minimum_s": round(minimum, 2),
        "overhead_pct": round(100 * (wall / minimum - 1), 1),
        "per_trial_overhead_s": round((wall - minimum) * cores / n, 3),
        "trial_processes": len(pids),
    }


def family_cost(name: str, model: dict[str, Any], trials: int, state: Path) -> dict[str, Any]:
    import ray

    from training.pipeline import prepare
    from training.spec import parse_spec
    from training.train import TrialContext
    from training.tune import run_search

    spec = parse_spec(
        {
            "name": f"overhead-{name.replace('_', '-')}",
            "task": "classification",
            "data": {"source": "sklearn:breast_cancer", "target": "target"},
            "metric": "accuracy",
            "models": [model],
            "search": {
                "algorithm": "grid",
                "scheduler": "none",
                "num_samples": trials,
                "max_concurrent_trials": 1,
            },
        }
    )
    prep = prepare(spec)
    ctx = TrialContext(
        task=spec.task,
        metric=spec.metric,
        n_classes=2,
        seed=0,
        models=[m.model_dump() for m in spec.models],
        cpus_per_trial=1,
        storage_path=str(state / "train"),
        data_refs={k: ray.put(v) for k, v in prep.arrays.items()},
    )
    result = run_search(spec, ctx, state_dir=state, mlflow_uri=f"sqlite:///{state}/m.db")
    firsts = []  # in trial order (grid trial ids count up; one trial at a time)
    for trial in sorted(Path(result.experiment_path).glob("trial-*")):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        firsts.append((rows[0]["trial_id"], rows[0]["time_total_s"], rows[0]["pid"]))
    return {
        "trials": trials,
        "start_to_first_report_s": [round(f[1], 2) for f in firsts],
        "cold_s": round(firsts[0][1], 2),
        "warm_s": round(statistics.median(f[1] for f in firsts[1:]), 2),
        "search_wall_s": round(result.wall_s, 2),
        "search_wall_per_trial_s": round(result.wall_s / trials, 2),
        "trial_processes": len({f[2] for f in firsts}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 one-second trials, not 16")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    import ray

    out = benchlib.out_dir(args.out_dir, args.quick)
    report: dict[str, Any] = {"benchmark": "overhead", "machine": benchlib.machine()}
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=benchlib.cores(), log_to_driver=False)
    report["ray_init_s"] = round(time.monotonic() - t0, 2)
    n = 8 if args.quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        report["bookkeeping"] = [
            bookkeeping(n, reuse, Path(tmp) / f"sleep-{reuse}") for reuse in (True, False)
        ]
        benchlib.log(json.dumps(report["bookkeeping"]))
        report["fixed_cost"] = {}
        for name, model in FAMILIES.items():
            report["fixed_cost"][name] = family_cost(name, model, 3, Path(tmp) / name)
            benchlib.log(f"{name}: {json.dumps(report['fixed_cost'][name])}")
    ray.shutdown()
    report["targets"] = {
        "bookkeeping_overhead_pct <= 10": report["bookkeeping"][0]["overhead_pct"],
        "warm torch 1-worker first report < 1 s": report["fixed_cost"]["torch_1_worker"]["warm_s"],
        "warm 2-worker TorchTrainer first report < 5 s": report["fixed_cost"][
            "torch_ddp_2_workers"
        ]["warm_s"],
    }
    benchlib.write_json(out / "overhead.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
