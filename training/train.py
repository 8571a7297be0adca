"""Training: one Tune trial, for either family.

A trial's config holds ``family`` (the index into ``spec.models``) and that
family's parameters under ``f{index}``. Trials run in reused Tune actors, so a
trial function leaves nothing behind that the next trial could trip on.

- A scikit-learn estimator that can grow (:mod:`training.grow`) is grown in
  ``ctx.reports`` steps and reports after each, with a checkpoint, so schedulers
  stop the weak ones early; any other estimator fits once and reports once. The
  checkpoint of the last report is the model the search picks, exported as it was
  reported. A retried trial continues from its checkpoint.
- A torch MLP with ``workers: 1`` trains in the trial's own process; with
  ``workers >= 2`` the trial drives a Ray Train ``TorchTrainer`` (DDP), whose workers
  report every epoch, forwarded to Tune (:mod:`training.torch_train`). The Train run
  is named after the trial, so a retried or resumed trial continues from its last
  epoch checkpoint. A Train worker process that dies is Ray Train's to handle: its
  ``FailureConfig`` (``search.max_failures``) restarts the worker group from the run's
  last checkpoint within the same trial; only a run that fails more often than that
  fails the trial, which Tune then retries (up to ``search.max_failures`` again).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.evaluate import better, score
from training.grow import Growth, growth_of, partial_fit_epoch, warm_start_to
from training.models import TORCH_DEFAULTS, make_estimator

CHECKPOINT_PATH_KEY = "checkpoint_path"  # set by Ray's TuneReportCallback
ESTIMATOR_FILE = "estimator.joblib"
GROWTH_FILE = "growth.json"  # a growing estimator's progress, for a retried trial
# Ray Train settings for a DDP trial (unless the cluster's environment sets them). The
# controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# and an epoch's report reaches Tune only at a poll: on 2 cores 0.2 s cut a 2-worker
# run's end from 7 s to 0.8 s. The preemption watcher (an actor per run, for nodes being
# drained) started beside the workers and slowed their start by 1.5 s; a trial whose node
# goes away is retried from its checkpoint by Tune anyway.
TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its config; put in the object store once per search."""

    task: str
    metric: str
    n_classes: int  # 0 for regression
    seed: int
    models: list[dict[str, Any]]  # spec.models as plain dicts
    cpus_per_trial: float
    storage_path: str
    data_refs: dict[str, Any]  # X_train, y_train, X_valid, y_valid: ObjectRefs to arrays
    reports: int = 10  # steps of a growing estimator; run_search sets the search's max_t
    max_failures: int = 0  # search.max_failures: Ray Train's retries of a DDP run, too


GRID_KEY = "trial"  # grid search: one grid_search over whole per-family configs


def family_params(config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The family index of a trial config and that family's own parameters."""
    config = config.get(GRID_KEY, config)
    family = int(config["family"])
    return family, dict(config.get(f"f{family}", {}))


def _where() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id()}


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune trainable: dispatch to the family's training."""
    from training.torch_train import train_in_trial

    family, params = family_params(config)
    model = ctx.models[family]
    if model["type"] == "sklearn":
        _sklearn_trial(model, params, ctx)
    elif int(model.get("workers", 1)) == 1:
        train_in_trial(params, ctx, gpus=float(model.get("gpus_per_worker") or 0))
    else:
        _torch_ddp_trial(model, params, ctx)


def _arrays(ctx: TrialContext) -> list[np.ndarray]:
    import ray

    return [ray.get(ctx.data_refs[k]) for k in ("X_train", "y_train", "X_valid", "y_valid")]


def _sklearn_trial(model: dict[str, Any], params: dict[str, Any], ctx: TrialContext) -> None:
    X_train, y_train, X_valid, y_valid = _arrays(ctx)
    est = make_estimator(model["estimator"], params, ctx.seed)
    growth = growth_of(est)
    if growth is None:
        est.fit(X_train, y_train)
        _report_estimator(est, {ctx.metric: evaluate_native(est, X_valid, y_valid, ctx)})
        return
    progress = {"iterations": 0}
    restored = _restore_estimator()
    if restored is not None:
        est, progress = restored
    if growth.kind == "warm_start":
        _grow_warm(est, growth, progress, ctx, X_train, y_train, X_valid, y_valid)
    else:
        _grow_epochs(est, growth, progress, ctx, X_train, y_train, X_valid, y_valid)


def _grow_warm(est, growth: Growth, progress: dict, ctx: TrialContext, X, y, Xv, yv) -> None:
    """Add stages or trees up to each step's size; stop where boosting stopped itself."""
    for size in growth.sizes(ctx.reports):
        if size <= progress["iterations"]:
            continue  # done before a retry
        held = warm_start_to(est, growth, size, X, y)
        progress = {"iterations": held}
        value = evaluate_native(est, Xv, yv, ctx)
        _report_estimator(est, {ctx.metric: value, **progress, "budget": growth.budget}, progress)
        if held < size:
            return


def _grow_epochs(est, growth: Growth, progress: dict, ctx: TrialContext, X, y, Xv, yv) -> None:
    """``partial_fit`` epochs; report at each step's size, and stop when the validation
    score has not improved for ``growth.patience`` epochs."""
    from sklearn.base import is_classifier

    classes = np.arange(ctx.n_classes) if is_classifier(est) else None
    steps = set(growth.sizes(ctx.reports))
    epochs, best, stale = progress["iterations"], progress.get("best"), progress.get("stale", 0)
    while epochs < growth.budget:
        partial_fit_epoch(est, X, y, classes)
        epochs += 1
        value = evaluate_native(est, Xv, yv, ctx)
        if best is None or better(ctx.metric, value, best):
            best, stale = value, 0
        else:
            stale += 1
        done = stale >= growth.patience or epochs >= growth.budget
        if done or epochs in steps:
            progress = {"iterations": epochs, "best": best, "stale": stale}
            metrics = {ctx.metric: value, "iterations": epochs, "budget": growth.budget}
            _report_estimator(est, metrics, progress)
        if done:
            return


def _restore_estimator() -> tuple[Any, dict] | None:
    """The estimator and its progress from the trial's checkpoint (a retried trial)."""
    import joblib
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        progress_file = os.path.join(d, GROWTH_FILE)
        if not os.path.exists(progress_file):
            return None
        with open(progress_file) as f:
            progress = json.load(f)
        return joblib.load(os.path.join(d, ESTIMATOR_FILE)), progress


def _report_estimator(est, metrics: dict[str, Any], progress: dict | None = None) -> None:
    """Report with a checkpoint of the estimator as it is now: the model exported if
    this report turns out to be the winner's last."""
    import joblib
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        joblib.dump(est, os.path.join(tmp, ESTIMATOR_FILE))
        if progress is not None:
            with open(os.path.join(tmp, GROWTH_FILE), "w") as f:
                json.dump(progress, f)
        tune.report({**metrics, **_where()}, checkpoint=tune.Checkpoint.from_directory(tmp))


def evaluate_native(est, X: np.ndarray, y: np.ndarray, ctx: TrialContext) -> float:
    if ctx.task == "classification":
        proba = est.predict_proba(X) if hasattr(est, "predict_proba") else None
        return score(ctx.metric, y, est.predict(X), proba)
    return score(ctx.metric, y, est.predict(X))


def _torch_ddp_trial(model: dict[str, Any], params: dict[str, Any], ctx: TrialContext) -> None:
    """Drive a Ray Train DDP run of ``workers`` workers from this trial."""
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.torch_train import ddp_worker_loop

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # read here, passed to the Train run's processes
    trial = tune.get_context()
    gpus = float(model.get("gpus_per_worker") or 0)
    resources = {"CPU": ctx.cpus_per_trial}
    if gpus:
        resources["GPU"] = gpus
    trainer = _lean_trainer_class()(
        ddp_worker_loop,
        train_loop_config={**TORCH_DEFAULTS, **params, "_ctx": ctx},
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(model["workers"]),
            use_gpu=gpus > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial.get_trial_id()}",
            storage_path=ctx.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # A dead worker process fails the whole worker group; Ray Train restarts the
            # group from the run's last checkpoint, inside this trial (no Tune retry).
            failure_config=ray.train.FailureConfig(max_failures=ctx.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _lean_trainer_class():
    """``TorchTrainer`` without Ray Data's dataset manager.

    Ray Train 2.60 starts a ``DatasetManager`` actor for every run, datasets or not.
    rayship's trials take their arrays from the object store and pass no datasets, so
    that actor is one more process to start per trial for nothing (2 s of a 2-worker
    trial's start on 2 cores, measured). This leans on ``_create_default_callbacks``,
    a private method of Ray 2.60's trainer; if it is gone, the stock trainer is used.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return LeanTorchTrainer
