"""What a search costs besides training, on an in-process Ray with this machine's cores.

- **Tune bookkeeping**: N trials that each sleep 1 s and report once with a checkpoint,
  run by Tune with rayship's settings (``reuse_actors``, ``max_concurrent_trials`` =
  cores, its MLflow callback and JSON/CSV loggers, a checkpoint a report), against the
  minimum N x 1 s / cores; once more with ``reuse_actors=False`` (Ray's default) for
  contrast. The overhead is split in two: the search's start (``Tuner.fit()`` to the
  first trial's start: Tune's set-up and new trial processes, which import Ray Tune), and
  the steady state (the median gap between one trial's end and the next trial's start on
  the same actor, over the 1 s a trial). A 2-trial search runs first, unmeasured, so the
  driver's one-time imports count in neither. A plain function trainable, not
  ``training.train.run_trial``: a trial of known length is what separates bookkeeping
  from work.
- **Fixed cost of a trial**, by family, through ``training.tune.run_search``: three
  trials one at a time of a ``DummyClassifier`` (no learning), a 1-worker torch MLP of
  one epoch and a 2-worker ``TorchTrainer`` trial of one epoch, on breast_cancer. For
  each trial, Tune's ``time_total_s`` at its first report (from the trial function's
  start: imports, data, the Train run's start for DDP, one epoch, the report) — the
  first trial of a family is cold (a new actor: imports), the others warm (a reused
  actor) — and the search's wall time per trial, which adds actor starts and Tune's
  scheduling.
- **TorchTrainer against plain DDP** on one job of about a minute: the same 2-process
  data-parallel loop (an MLP on a generated 100,000 x 40 table, gloo, one thread a
  process, each rank generating the data itself and taking its shard) started once with
  ``torch.multiprocessing.spawn`` + ``init_process_group`` and once as a 2-worker Ray
  Train ``TorchTrainer`` on the running Ray (the way rayship's ``workers: 2`` trials run,
  with rayship's Train settings), each timed from the call to its end; the ratio
  TorchTrainer / plain is what Ray Train costs on a job of that length.

    .venv/bin/python benchmarks/overhead.py [--quick] [--out-dir DIR] [--ddp-epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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


def sleep_trial(config: dict[str, Any]) -> None:
    """A trial of known length: sleep ``length_s``, then report once with a checkpoint
    (and when it started and ended, and on which node)."""
    import ray
    from ray import tune

    started = time.time()
    time.sleep(config["length_s"])
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"x": config["x"]}, f)
        metrics = {
            "score": config["x"],
            "node": ray.get_runtime_context().get_node_id(),
            "started": started,
            "ended": time.time(),
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _driver_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class SleepSearch:
    grid: Any  # Tune's ResultGrid
    wall_s: float
    started: float  # time.time() at fit()
    driver_cpu_s: float  # CPU of this process (the Tune driver) during fit()


def sleep_search(
    n: int, length_s: float, concurrency: int, reuse: bool, state: Path, name: str
) -> SleepSearch:
    """``n`` sleeping trials run by Tune with rayship's settings: ``reuse_actors``, a CPU
    a trial, its MLflow callback and JSON/CSV loggers, a checkpoint a report."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from training.tracking import MLflowTrials

    tuner = tune.Tuner(
        tune.with_resources(sleep_trial, {"CPU": 1}),
        param_space={"x": tune.uniform(0, 1), "length_s": length_s},
        tune_config=tune.TuneConfig(
            num_samples=n, max_concurrent_trials=concurrency, reuse_actors=reuse
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(state / "searches"),
            callbacks=[
                MLflowTrials(f"sqlite:///{state}/mlflow.db", name),
                JsonLoggerCallback(),
                CSVLoggerCallback(),
            ],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    cpu0, t0, started = _driver_cpu_s(), time.monotonic(), time.time()
    grid = tuner.fit()
    wall, driver_cpu = time.monotonic() - t0, _driver_cpu_s() - cpu0
    assert not grid.errors, grid.errors
    return SleepSearch(grid, wall, started, driver_cpu)


def bookkeeping(n: int, reuse: bool, state: Path) -> dict[str, Any]:
    cores = benchlib.cores()
    run = sleep_search(n, 1.0, cores, reuse, state, f"sleep-{reuse}")
    grid, wall, epoch0 = run.grid, run.wall_s, run.started
    minimum = n * 1.0 / cores
    pids = {r.metrics["pid"] for r in grid}
    # Between trials on one actor: Tune's bookkeeping of a finished trial and the start
    # of the next, with the process already up (the steady state of a long search).
    by_actor: dict[int, list[tuple[float, float]]] = {}
    for r in grid:
        by_actor.setdefault(r.metrics["pid"], []).append((r.metrics["started"], r.metrics["ended"]))
    gaps = [
        b[0] - a[1]
        for runs in by_actor.values()
        for a, b in zip(sorted(runs), sorted(runs)[1:], strict=False)
    ]
    first = min(r.metrics["started"] for r in grid)
    return {
        "trials": n,
        "reuse_actors": reuse,
        "wall_s": round(wall, 2),
        "minimum_s": round(minimum, 2),
        "overhead_pct": round(100 * (wall / minimum - 1), 1),
        "per_trial_overhead_s": round((wall - minimum) * cores / n, 3),
        "trial_processes": len(pids),
        "start_to_first_trial_s": round(first - epoch0, 2),
        "between_trials_s": round(statistics.median(gaps), 3) if gaps else None,
        "steady_overhead_pct": round(100 * statistics.median(gaps), 1) if gaps else None,
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


DDP_ROWS, DDP_FEATURES, DDP_HIDDEN, DDP_BATCH = 100_000, 40, 256, 256
DDP_EPOCHS = 64  # about 60 s of plain DDP on this 2-core machine (48 took 46 s)


def _ddp_loop(rank: int, world: int, epochs: int) -> float:
    """The shared data-parallel loop; returns rank's last epoch loss."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((DDP_ROWS, DDP_FEATURES)).astype("float32")
    y = (X[:, :5].sum(axis=1) > 0).astype("int64")
    X, y = torch.from_numpy(X[rank::world]), torch.from_numpy(y[rank::world])
    model = nn.Sequential(
        nn.Linear(DDP_FEATURES, DDP_HIDDEN),
        nn.ReLU(),
        nn.Linear(DDP_HIDDEN, DDP_HIDDEN),
        nn.ReLU(),
        nn.Linear(DDP_HIDDEN, 2),
    )
    model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(X), DDP_BATCH):
            idx = order[i : i + DDP_BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
        dist.barrier()
    return float(loss.detach())


def _native_worker(rank: int, world: int, port: int, epochs: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    _ddp_loop(rank, world, epochs)
    dist.destroy_process_group()


def _train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    _ddp_loop(ctx.get_world_rank(), ctx.get_world_size(), config["epochs"])
    if not dist.is_initialized():
        raise RuntimeError("Ray Train started no process group")
    ray.train.report({"done": 1})


def ddp_comparison(epochs: int, state: Path) -> dict[str, Any]:
    """Plain torch DDP vs a 2-worker TorchTrainer on the same loop (see the docstring)."""
    import socket

    import ray.train
    import torch.multiprocessing as mp

    from training.train import TRAIN_ENV, _lean_trainer_class

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    mp.spawn(_native_worker, args=(2, port, epochs), nprocs=2, join=True)
    native = time.monotonic() - t0
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    trainer = _lean_trainer_class()(
        _train_worker,
        train_loop_config={"epochs": epochs},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp-compare", storage_path=str(state)),
    )
    t0 = time.monotonic()
    trainer.fit()
    trained = time.monotonic() - t0
    return {
        "job": f"{epochs} epochs of an MLP ({DDP_FEATURES}-{DDP_HIDDEN}-{DDP_HIDDEN}-2) on "
        f"{DDP_ROWS:,} generated rows, batch {DDP_BATCH}, 2 processes, gloo",
        "native_ddp_s": round(native, 2),
        "torch_trainer_s": round(trained, 2),
        "ratio": round(trained / native, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 one-second trials, not 16")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument(
        "--ddp-epochs",
        type=int,
        default=None,
        help="epochs of the DDP comparison job (default: about a minute here)",
    )
    args = parser.parse_args()
    import ray

    out = benchlib.out_dir(args.out_dir, args.quick)
    report: dict[str, Any] = {"benchmark": "overhead", "machine": benchlib.machine()}
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=benchlib.cores(), log_to_driver=False)
    report["ray_init_s"] = round(time.monotonic() - t0, 2)
    n = 8 if args.quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        bookkeeping(2, True, Path(tmp) / "warm-up")  # the driver's first Tune run imports
        report["bookkeeping"] = [
            bookkeeping(n, reuse, Path(tmp) / f"sleep-{reuse}") for reuse in (True, False)
        ]
        benchlib.log(json.dumps(report["bookkeeping"]))
        report["fixed_cost"] = {}
        for name, model in FAMILIES.items():
            report["fixed_cost"][name] = family_cost(name, model, 3, Path(tmp) / name)
            benchlib.log(f"{name}: {json.dumps(report['fixed_cost'][name])}")
        report["ddp"] = ddp_comparison(args.ddp_epochs or DDP_EPOCHS, Path(tmp) / "ddp")
        benchlib.log(f"ddp: {json.dumps(report['ddp'])}")
    ray.shutdown()
    report["targets"] = {
        "bookkeeping_overhead_pct <= 10": report["bookkeeping"][0]["overhead_pct"],
        "warm torch 1-worker first report < 1 s": report["fixed_cost"]["torch_1_worker"]["warm_s"],
        "warm 2-worker TorchTrainer first report < 5 s": report["fixed_cost"][
            "torch_ddp_2_workers"
        ]["warm_s"],
        "TorchTrainer / plain DDP on a job of >= 60 s <= 1.05": report["ddp"]["ratio"],
    }
    benchlib.write_json(out / "overhead.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
