"""The tools that benchmarks/tuning.py races, each run in its own fresh process.

Every tool gets the spec's data, split and preprocessing (``training.pipeline.prepare``:
the same train/valid arrays rayship's trials get; the holdout stays out of the search),
the spec's search space and the same number of configurations. Each time a tool has a
model, it is written to ``WORKDIR/models`` and one line goes to ``WORKDIR/events.jsonl``:
``{"t": time.monotonic(), "valid": score, "model": file, "trial": id, "step": n}``
(CLOCK_MONOTONIC is one clock for every process of the machine). tuning.py scores
those models on the holdout afterwards, outside the timed run.

- ``rayship`` / ``rayship-random``: ``training.pipeline.search_and_register`` as
  ``rayship tune`` calls it (Ray from ``cluster.local.connect``, the search with its
  searcher and ASHA, then export, gate and registration), plus a Tune callback that
  hard-links each reported checkpoint (the trial's own; rayship keeps one a trial).
- ``randomized``: ``RandomizedSearchCV(n_iter=budget, n_jobs=cores, refit=False)``.
- ``halving``: ``HalvingRandomSearchCV(n_candidates=budget, factor=3, n_jobs=cores,
  refit=False)`` with the growing parameter as its resource (``max_iter`` of
  HistGradientBoosting, ``epochs`` of the MLP), ``min_resources="exhaust"``.
- ``optuna``: one study in a journal file shared by ``cores`` worker processes (Optuna's
  way to use several cores for CPU-bound objectives), TPE (seeded, 10 random start-up
  trials, as rayship's OptunaSearch), ``SuccessiveHalvingPruner(min_resource=2,
  reduction_factor=3)``: asynchronous successive halving, the same rule and rungs as
  rayship's ASHA (grace 2 reports, factor 3). The objective grows its model the way
  rayship's trial does: HistGradientBoosting in ``training.tune.sklearn_steps`` warm-start
  steps, the MLP one epoch at a time, reporting after each.

The scikit-learn tools use a ``PredefinedSplit`` over train+valid, so they fit on the
train split and score on the valid split, as rayship does; their scorer writes the
model (a fitted estimator is not kept by the search itself). The torch MLP peer is
:class:`TorchMLPClassifier`, a scikit-learn estimator around the same network
(``training.models.build_mlp``) and the same epoch loop as rayship's 1-worker trial
(Adam, cross-entropy, seeded shuffling per epoch). Every trial uses one thread.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

ASHA_GRACE = 2  # rayship's ASHA: grace_period=min(2, max_t), reduction_factor=3
REDUCTION = 3
DEFAULT_STEPS = 10  # training.tune.SKLEARN_STEPS when the function is not there


class Events:
    """Appends event lines; each line is one write, so processes can share the file."""

    def __init__(self, workdir: Path):
        self.path = workdir / "events.jsonl"
        self.models = workdir / "models"
        self.models.mkdir(parents=True, exist_ok=True)

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=_plain) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# --- the torch MLP as a scikit-learn estimator ----------------------------------------


class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """rayship's MLP and epoch loop (``training.torch_train``), as a scikit-learn classifier.

    ``fit`` trains ``epochs`` epochs from scratch; ``partial_fit`` trains one more epoch
    (an Optuna objective reports after each). Epoch ``e`` seeds dropout and shuffling
    with ``seed + e``, as rayship does. One thread.
    """

    def __init__(
        self,
        hidden_layers=(64,),
        lr: float = 1e-3,
        dropout: float = 0.0,
        batch_size: int = 64,
        epochs: int = 10,
        weight_decay: float = 0.0,
        n_classes: int = 2,
        seed: int = 0,
    ):
        self.hidden_layers = hidden_layers
        self.lr = lr
        self.dropout = dropout
        self.batch_size = batch_size
        self.epochs = epochs
        self.weight_decay = weight_decay
        self.n_classes = n_classes
        self.seed = seed

    def _start(self, X: np.ndarray) -> None:
        import torch

        from training.models import build_mlp

        torch.set_num_threads(1)
        torch.manual_seed(self.seed)
        self.net_ = build_mlp(
            X.shape[1], int(self.n_classes), list(self.hidden_layers), float(self.dropout)
        )
        self.opt_ = torch.optim.Adam(
            self.net_.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay)
        )
        self.classes_ = np.arange(int(self.n_classes))
        self.epochs_done_ = 0

    def _epoch(self, X: np.ndarray, y: np.ndarray) -> None:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        epoch = self.epochs_done_
        torch.manual_seed(self.seed + epoch)
        shuffle = torch.Generator().manual_seed(self.seed + epoch)
        loader = DataLoader(
            TensorDataset(torch.as_tensor(X), torch.as_tensor(y).long()),
            batch_size=int(self.batch_size),
            shuffle=True,
            generator=shuffle,
        )
        loss_fn = torch.nn.CrossEntropyLoss()
        self.net_.train()
        for xb, yb in loader:
            self.opt_.zero_grad()
            loss_fn(self.net_(xb), yb).backward()
            self.opt_.step()
        self.epochs_done_ += 1

    def fit(self, X: np.ndarray, y: np.ndarray) -> TorchMLPClassifier:
        self._start(X)
        for _ in range(int(self.epochs)):
            self._epoch(X, y)
        return self

    def partial_fit(self, X: np.ndarray, y: np.ndarray) -> TorchMLPClassifier:
        if not hasattr(self, "net_"):
            self._start(X)
        self._epoch(X, y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        torch.set_num_threads(1)
        self.net_.eval()
        with torch.no_grad():
            return torch.softmax(self.net_(torch.as_tensor(np.asarray(X))), dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


# --- the spec's space for each tool ----------------------------------------------------


def split_space(model) -> tuple[dict[str, Any], dict[str, Any]]:
    """(distributions, constants) of a spec model's space."""
    from training.spec import Distribution

    dists = {k: v for k, v in model.space.items() if isinstance(v, Distribution)}
    consts = {k: v for k, v in model.space.items() if not isinstance(v, Distribution)}
    return dists, consts


def scipy_space(dists: dict[str, Any]) -> dict[str, Any]:
    """The spec's distributions as scikit-learn's searches take them (bounds inclusive as
    in rayship: randint [lo, hi] includes hi)."""
    from scipy import stats

    from training.spec import Choice, LogUniform, RandInt, Uniform

    out: dict[str, Any] = {}
    for key, d in dists.items():
        if isinstance(d, Choice):
            out[key] = list(d.choice)
        elif isinstance(d, LogUniform):
            out[key] = stats.loguniform(*d.loguniform)
        elif isinstance(d, Uniform):
            out[key] = stats.uniform(d.uniform[0], d.uniform[1] - d.uniform[0])
        elif isinstance(d, RandInt):
            out[key] = stats.randint(d.randint[0], d.randint[1] + 1)
    return out


def optuna_params(trial, dists: dict[str, Any]) -> dict[str, Any]:
    """Sample the spec's distributions with an Optuna trial (list choices travel as JSON)."""
    from training.spec import Choice, LogUniform, RandInt, Uniform

    params: dict[str, Any] = {}
    for key, d in dists.items():
        if isinstance(d, Choice):
            picked = trial.suggest_categorical(key, [json.dumps(c) for c in d.choice])
            params[key] = json.loads(picked)
        elif isinstance(d, LogUniform):
            params[key] = trial.suggest_float(key, *d.loguniform, log=True)
        elif isinstance(d, Uniform):
            params[key] = trial.suggest_float(key, *d.uniform)
        elif isinstance(d, RandInt):
            params[key] = trial.suggest_int(key, *d.randint)
    return params


def peer_estimator(spec, n_classes: int, params: dict[str, Any] | None = None):
    """The spec's (single) model family as a scikit-learn estimator with its constants."""
    from training.models import TORCH_DEFAULTS, make_estimator

    model = spec.models[0]
    _, consts = split_space(model)
    params = {**consts, **(params or {})}
    if model.type == "sklearn":
        return make_estimator(model.estimator, params, spec.data.seed)
    config = {**TORCH_DEFAULTS, **params}
    return TorchMLPClassifier(
        hidden_layers=tuple(config["hidden_layers"]),
        lr=config["lr"],
        dropout=config["dropout"],
        batch_size=config["batch_size"],
        epochs=config["epochs"],
        weight_decay=config["weight_decay"],
        n_classes=n_classes,
        seed=spec.data.seed,
    )


def growth(spec, est) -> tuple[str, int]:
    """(parameter that grows the model, its full size): epochs of the MLP, else
    ``training.grow``'s rule (``max_iter`` of HistGradientBoosting)."""
    if isinstance(est, TorchMLPClassifier):
        return "epochs", int(est.epochs)
    try:
        from training.grow import growth_of
    except ImportError:  # before the growing trials landed
        growth_of = None
    g = growth_of(est) if growth_of else None
    if g is not None:
        return g.param, int(g.budget)
    return "max_iter", int(est.get_params()["max_iter"])


def steps_of(spec) -> int:
    """How many reports rayship's growing scikit-learn trial makes (the Optuna peer matches)."""
    try:
        from training.tune import sklearn_steps
    except ImportError:
        return DEFAULT_STEPS
    return int(sklearn_steps(spec))


def sizes(budget: int, steps: int) -> list[int]:
    """Model size after each report: near-equal shares of the budget (training.grow)."""
    steps = max(1, min(steps, budget))
    return [math.ceil(budget * k / steps) for k in range(1, steps + 1)]


# --- scikit-learn searches -------------------------------------------------------------


class ScoreRecorder:
    """A scorer that writes the model and its valid score as an event, then returns the score
    (negated for a loss: scikit-learn maximises). Runs in joblib's worker processes."""

    def __init__(self, workdir: str, metric: str, keys: list[str], n_valid: int):
        self.workdir = workdir
        self.metric = metric
        self.keys = keys
        self.n_valid = n_valid

    def __call__(self, est, X, y) -> float:
        import joblib

        from training.evaluate import LOWER_IS_BETTER, score

        proba = est.predict_proba(X) if hasattr(est, "predict_proba") else None
        value = score(self.metric, y, est.predict(X), proba)
        if len(X) != self.n_valid:  # not the valid split (a train score): no model to keep
            return -value if self.metric in LOWER_IS_BETTER else value
        events = Events(Path(self.workdir))
        name = f"{uuid.uuid4().hex}.joblib"
        joblib.dump(est, events.models / name)
        params = est.get_params()
        events.write(
            {
                "t": time.monotonic(),
                "valid": value,
                "model": name,
                "params": {k: params.get(k) for k in self.keys},
                "pid": os.getpid(),
            }
        )
        return -value if self.metric in LOWER_IS_BETTER else value


def _train_valid(prep):
    from sklearn.model_selection import PredefinedSplit

    a = prep.arrays
    X = np.concatenate([a["X_train"], a["X_valid"]])
    y = np.concatenate([a["y_train"], a["y_valid"]])
    fold = np.r_[np.full(len(a["X_train"]), -1), np.zeros(len(a["X_valid"]))]
    return X, y, PredefinedSplit(fold)


def run_sklearn_search(kind: str, spec, prep, workdir: Path, n_jobs: int) -> dict[str, Any]:
    from sklearn.experimental import enable_halving_search_cv  # noqa: F401
    from sklearn.model_selection import HalvingRandomSearchCV, RandomizedSearchCV

    n_classes = len(prep.splits.schema.classes or [])
    est = peer_estimator(spec, n_classes)
    dists, consts = split_space(spec.models[0])
    resource, units = growth(spec, est)
    scorer = ScoreRecorder(
        str(workdir), spec.metric, [*dists, resource], len(prep.arrays["X_valid"])
    )
    X, y, cv = _train_valid(prep)
    common = {
        "scoring": scorer,
        "cv": cv,
        "n_jobs": n_jobs,
        "refit": False,
        "random_state": spec.data.seed,
        "error_score": "raise",
        "return_train_score": False,
    }
    budget = spec.search.num_samples
    if kind == "randomized":
        search = RandomizedSearchCV(est, scipy_space(dists), n_iter=budget, **common)
        settings = {"n_iter": budget}
    else:
        search = HalvingRandomSearchCV(
            est,
            scipy_space({k: v for k, v in dists.items() if k != resource}),
            n_candidates=budget,
            resource=resource,
            max_resources=units,
            min_resources="exhaust",
            factor=REDUCTION,
            **common,
        )
        settings = {
            "n_candidates": budget,
            "resource": resource,
            "max_resources": units,
            "min_resources": "exhaust",
            "factor": REDUCTION,
        }
    search.fit(X, y)
    done = time.monotonic()
    if kind == "halving":
        settings["resources_per_iteration"] = [int(r) for r in search.n_resources_]
        settings["candidates_per_iteration"] = [int(c) for c in search.n_candidates_]
    return {
        "done": done,
        "tool": type(search).__name__,
        "settings": {
            **settings,
            "n_jobs": n_jobs,
            "cv": "PredefinedSplit: fit on train, score on valid",
            "refit": False,
            "random_state": spec.data.seed,
            "estimator": type(est).__name__,
            "constants": consts,
            "threads_per_fit": 1,
        },
        "fits": len(search.cv_results_["params"]),
    }


# --- Optuna ----------------------------------------------------------------------------


def _optuna_worker(spec_json: str, prep, workdir: str, storage_path: str, rank: int, n: int):
    import joblib
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from threadpoolctl import threadpool_limits

    from training.evaluate import score
    from training.spec import parse_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threadpool_limits(1)
    spec = parse_spec(json.loads(spec_json))
    events = Events(Path(workdir))
    a = prep.arrays
    n_classes = len(prep.splits.schema.classes or [])
    dists, _ = split_space(spec.models[0])
    steps = steps_of(spec)

    def objective(trial) -> float:
        params = optuna_params(trial, dists)
        est = peer_estimator(spec, n_classes, params)
        param, units = growth(spec, est)
        torch_mlp = isinstance(est, TorchMLPClassifier)
        plan = list(range(1, units + 1)) if torch_mlp else sizes(units, steps)
        value = float("nan")
        for step, size in enumerate(plan, start=1):
            if torch_mlp:
                est.partial_fit(a["X_train"], a["y_train"])
            else:
                est.set_params(warm_start=True, **{param: size})
                est.fit(a["X_train"], a["y_train"])
            proba = est.predict_proba(a["X_valid"])
            value = score(spec.metric, a["y_valid"], est.predict(a["X_valid"]), proba)
            name = f"{uuid.uuid4().hex}.joblib"
            joblib.dump(est, events.models / name)
            events.write(
                {
                    "t": time.monotonic(),
                    "valid": value,
                    "model": name,
                    "trial": f"{rank}-{trial.number}",
                    "step": step,
                    "params": params,
                }
            )
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    storage = JournalStorage(JournalFileBackend(storage_path))
    study = optuna.load_study(
        study_name="bench",
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=spec.data.seed + rank),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=ASHA_GRACE, reduction_factor=REDUCTION
        ),
    )
    study.optimize(objective, n_trials=n)


def run_optuna(spec, spec_json: str, prep, workdir: Path, workers: int) -> dict[str, Any]:
    import multiprocessing

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from training.evaluate import LOWER_IS_BETTER

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_path = str(workdir / "optuna-journal.log")
    optuna.create_study(
        study_name="bench",
        storage=JournalStorage(JournalFileBackend(storage_path)),
        direction="minimize" if spec.metric in LOWER_IS_BETTER else "maximize",
    )
    budget = spec.search.num_samples
    shares = [budget // workers + (r < budget % workers) for r in range(workers)]
    # fork: the workers share the prepared arrays; nothing here has started threads that
    # a forked child would miss (torch is imported only inside the workers).
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_optuna_worker,
            args=(spec_json, prep, str(workdir), storage_path, r, n),
        )
        for r, n in enumerate(shares)
        if n
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    done = time.monotonic()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"an Optuna worker failed: exit codes {[p.exitcode for p in procs]}")
    study = optuna.load_study(
        study_name="bench", storage=JournalStorage(JournalFileBackend(storage_path))
    )
    states = [t.state.name for t in study.trials]
    _, consts = split_space(spec.models[0])
    return {
        "done": done,
        "tool": "optuna",
        "settings": {
            "n_trials": budget,
            "worker_processes": len(procs),
            "storage": "JournalFileBackend (one study shared by the worker processes)",
            "sampler": f"TPESampler(seed={spec.data.seed}+rank, n_startup_trials=10)",
            "pruner": f"SuccessiveHalvingPruner(min_resource={ASHA_GRACE}, "
            f"reduction_factor={REDUCTION})",
            "reports": "MLP: every epoch; HistGradientBoosting: warm start in "
            f"{steps_of(spec)} equal steps of max_iter",
            "constants": consts,
            "threads_per_trial": 1,
        },
        "fits": len(states),
        "pruned": states.count("PRUNED"),
        "complete": states.count("COMPLETE"),
    }


# --- rayship ---------------------------------------------------------------------------


def _recorder_class():
    from ray.tune import Callback

    class Recorder(Callback):
        """Each reported checkpoint, hard-linked (rayship keeps one a trial and deletes
        the rest), as an event at the time the driver had both result and checkpoint."""

        def __init__(self, workdir: Path, metric: str):
            self.phases: dict[str, float] = {}
            self.events = Events(workdir)
            self.metric = metric
            self.pending: dict[tuple[str, int], dict[str, Any]] = {}
            self.early: dict[tuple[str, int], str] = {}

        def setup(self, **info):
            self.phases["search_start"] = time.monotonic()

        def on_experiment_end(self, trials, **info):
            self.phases["search_end"] = time.monotonic()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.phases.setdefault("first_report", time.monotonic())
            step = int(result.get("training_iteration", 0))
            event = {
                "t": time.monotonic(),
                "valid": result.get(self.metric),
                "trial": trial.trial_id,
                "step": step,
                "config": trial.config,
            }
            path = result.get("checkpoint_path")  # a Ray Train run's, via TuneReportCallback
            key = (trial.trial_id, step)
            if path:
                self._emit(event, path)
            elif key in self.early:
                self._emit(event, self.early.pop(key))
            else:
                self.pending[key] = event

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            step = int((trial.last_result or {}).get("training_iteration", 0))
            key = (trial.trial_id, step)
            event = self.pending.pop(key, None)
            if event is None:
                self.early[key] = checkpoint.path
                return
            self._emit(event, checkpoint.path)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            self.events.write(
                {
                    "kind": "complete",
                    "t": time.monotonic(),
                    "trial": trial.trial_id,
                    "step": last.get("training_iteration"),
                }
            )

        def _emit(self, event: dict[str, Any], path: str) -> None:
            name = f"{event['trial']}-{event['step']}"
            dest = self.events.models / name
            try:
                _link_tree(Path(path), dest)
                event["model"] = name
            except OSError as exc:
                event["model"] = None
                event["link_error"] = str(exc)
            event["t"] = time.monotonic()
            self.events.write(event)

    return Recorder


def _link_tree(src: Path, dest: Path) -> None:
    """Hard-link every file of a checkpoint folder (a copy where links are not possible)."""
    import shutil

    for root, _, files in os.walk(src):
        target = dest / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(os.path.join(root, f), target / f)
            except OSError:
                shutil.copy2(os.path.join(root, f), target / f)


def run_rayship(spec, workdir: Path) -> dict[str, Any]:
    import optuna
    import ray

    from cluster import local
    from training.pipeline import search_and_register

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as the CLI does
    state = workdir / ".rayship"
    recorder = _recorder_class()(workdir, spec.metric)
    phases = recorder.phases

    def connect() -> None:
        phases["ray_start"] = time.monotonic()
        local.connect(state, log_to_driver=False)
        phases["ray_ready"] = time.monotonic()

    outcome = search_and_register(spec, state_dir=state, callbacks=[recorder], connect=connect)
    done = time.monotonic()
    s = outcome.search
    result = {
        "done": done,
        "tool": "rayship",
        "settings": {
            "algorithm": spec.search.algorithm,
            "scheduler": spec.search.scheduler,
            "num_samples": spec.search.num_samples,
            "max_concurrent_trials": spec.search.max_concurrent_trials or "default (cores)",
            "cpus_per_trial": spec.search.cpus_per_trial,
            "asha": f"grace_period {ASHA_GRACE} reports, reduction_factor {REDUCTION}",
            "reports_per_sklearn_trial": steps_of(spec),
            "entry": "training.pipeline.search_and_register (as `rayship tune`), "
            "Ray from cluster.local.connect",
        },
        "search_wall_s": round(s.wall_s, 2),
        "fits": s.trials,
        "errored": s.errored,
        "rayship_holdout": outcome.holdout,
        "registered_version": outcome.version,
        "phases": {k: v for k, v in sorted(phases.items(), key=lambda kv: kv[1])},
    }
    ray.shutdown()
    return result


# --- entry -----------------------------------------------------------------------------


def run(tool: str, spec_dict: dict[str, Any], workdir: Path, n_cores: int) -> dict[str, Any]:
    """Run one tool on the spec; returns what the tool did (settings, counts, ``done``)."""
    from training.pipeline import prepare
    from training.spec import parse_spec

    spec = parse_spec(spec_dict)
    if tool.startswith("rayship"):
        return run_rayship(spec, workdir)
    prep = prepare(spec)
    if tool in ("randomized", "halving"):
        return run_sklearn_search(tool, spec, prep, workdir, n_cores)
    if tool == "optuna":
        return run_optuna(spec, json.dumps(spec_dict), prep, workdir, n_cores)
    raise ValueError(f"unknown tool {tool!r}")
