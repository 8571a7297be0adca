"""Fixed cost of a trial of each family, on an in-process Ray with 2 CPUs.

- sklearn: 8 trials of a DummyClassifier (no learning: all overhead) on
  breast_cancer, one at a time and two at a time; the search's wall time per trial
  includes the trial actor's start, the fit, the report and its checkpoint.
- torch: one-epoch MLP trials with 1 and 2 Train workers, one at a time; Tune's
  ``time_total_s`` at the first report is the time from the trial's start to its
  first epoch's report (the Train worker group's start, DDP setup, one epoch).

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
from training.train import TrialContext, family_params
from training.tune import run_search


def spec(models: list[dict], num_samples: int, concurrency: int):
    return parse_spec(
        {
            "name": "overhead",
            "task": "classification",
            "data": {"source": "sklearn:breast_cancer", "target": "target"},
            "metric": "accuracy",
            "models": models,
            "search": {
                "algorithm": "grid",
                "scheduler": "none",
                "num_samples": num_samples,
                "max_concurrent_trials": concurrency,
            },
        }
    )


DUMMY = {"type": "sklearn", "estimator": "sklearn.dummy.DummyClassifier"}
TORCH = [
    {"type": "torch_mlp", "workers": w, "space": {"epochs": 1, "hidden_layers": [16]}}
    for w in (1, 2)
]


def search(s, state: Path):
    prep = prepare(s)
    ctx = TrialContext(
        task=s.task,
        metric=s.metric,
        n_classes=2,
        seed=0,
        models=[m.model_dump() for m in s.models],
        cpus_per_trial=1,
        storage_path=str(state / "train"),
        data_refs={k: ray.put(v) for k, v in prep.arrays.items()},
    )
    return run_search(s, ctx, state_dir=state, mlflow_uri=f"sqlite:///{state}/m.db")


def first_reports(result) -> dict[int, float]:
    """Tune's time_total_s at each trial's first report, by family index."""
    out = {}
    for trial in Path(result.experiment_path).glob("trial-*"):
        first = json.loads((trial / "result.json").read_text().splitlines()[0])
        out[family_params(first["config"])[0]] = round(first["time_total_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    report: dict = {"ray_init_s": round(time.monotonic() - t0, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency in (1, 2):
            r = search(spec([DUMMY], 8, concurrency), Path(tmp) / f"sk{concurrency}")
            report[f"sklearn_8_trials_concurrency_{concurrency}"] = {
                "search_wall_s": round(r.wall_s, 2),
                "per_trial_s": round(r.wall_s / 8, 2),
            }
        r = search(spec(TORCH, 1, 1), Path(tmp) / "torch")
        firsts = first_reports(r)
        report["torch_one_epoch_trials"] = {
            "search_wall_s": round(r.wall_s, 2),
            "start_to_first_report_s": {"1 worker": firsts[0], "2 workers": firsts[1]},
        }
    ray.shutdown()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
