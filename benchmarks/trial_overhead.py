"""Fixed cost of one trial of each family: from the trial's start to its first report.

Runs one real search on an in-process Ray (2 CPUs here) with three trials, one at a
time: a scikit-learn DummyClassifier (no learning, so its time is all overhead), a
one-epoch torch MLP with 1 Train worker and one with 2 Train workers, on the
breast_cancer set. Tune's ``time_total_s`` at a trial's first report is the time from
the trial's start to that report; the search's wall time and Ray's start are printed too.

    .venv/bin/python benchmarks/trial_overhead.py [--out benchmarks/results/trial_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from training.pipeline import prepare
from training.spec import parse_spec
from training.train import TrialContext
from training.tune import run_search

SPEC = {
    "name": "overhead",
    "task": "classification",
    "data": {"source": "sklearn:breast_cancer", "target": "target"},
    "metric": "accuracy",
    "models": [
        {"type": "sklearn", "estimator": "sklearn.dummy.DummyClassifier"},
        {"type": "torch_mlp", "workers": 1, "space": {"epochs": 1, "hidden_layers": [16]}},
        {"type": "torch_mlp", "workers": 2, "space": {"epochs": 1, "hidden_layers": [16]}},
    ],
    "search": {
        "algorithm": "grid",
        "scheduler": "none",
        "num_samples": 1,
        "max_concurrent_trials": 1,
    },
}
LABELS = {0: "sklearn (DummyClassifier)", 1: "torch_mlp, 1 worker", 2: "torch_mlp, 2 workers"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = parse_spec(SPEC)
    prep = prepare(spec)
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    ray_start = time.monotonic() - t0
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
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
        rows = {}
        for trial in Path(result.experiment_path).glob("trial-*"):
            first = json.loads((trial / "result.json").read_text().splitlines()[0])
            rows[LABELS[first["config"]["family"]]] = round(first["time_total_s"], 2)
    ray.shutdown()
    report = {
        "ray_init_s": round(ray_start, 2),
        "search_wall_s": round(result.wall_s, 2),
        "trial_start_to_first_report_s": dict(sorted(rows.items())),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
