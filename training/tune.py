"""Search: one Ray Tune search across every model family of a spec.

The search space is flat: ``family`` picks the model (``tune.choice`` over the
spec's families, a grid for the grid algorithm) and ``f{i}`` holds family i's
space. A searcher samples every family's keys; the trial uses only its own.
Each trial's params and metrics land in MLflow through Ray's MLflow logger
callback. A search lives under ``<state>/searches/<name>-<stamp>`` (the stamp to the
microsecond, so two searches of one model started in the same second get folders of
their own); ``resume`` restores the newest one with :meth:`ray.tune.Tuner.restore`.

A resume can only skip what Tune's saved experiment state records as finished. Tune
saves that state after each trial checkpoint when ``num_to_keep`` is set (rayship
keeps one per trial, except under PBT) and otherwise every ``TUNE_GLOBAL_CHECKPOINT_S``
(by default 10 s or more apart). A trial's finish is a status change, not a checkpoint,
so a driver killed outright (SIGKILL, the OOM killer, its node lost) up to 10 s after a
trial finished would run that trial again on resume. rayship sets the period to
``SNAPSHOT_PERIOD_S`` unless the environment sets it; that costs no more than the
snapshot per checkpoint Tune already takes.

Trials are cheap to start: Tune reuses trial actors (``reuse_actors``; Ray's default
has been off since 2.10, and a new actor cost 3 s a trial here), and every trial
that trains in its own process (scikit-learn, a 1-worker torch MLP) asks for the same
resources, so any finished trial's actor can take the next trial. Schedulers count
reports (``training_iteration``): a torch trial reports every epoch, a growing
scikit-learn trial at ``reports`` equal shares of its budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from training.models import TORCH_DEFAULTS
from training.spec import (
    PBT_MUTABLE,
    Choice,
    Distribution,
    LogUniform,
    RandInt,
    Range,
    Spec,
    Uniform,
)
from training.train import GRID_KEY, TrialContext, family_params, run_trial


class SearchError(RuntimeError):
    """The search produced no usable winner, or was interrupted (message says what to do)."""


@dataclass
class SearchResult:
    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    best_checkpoint: str  # a directory holding estimator.joblib or model.pt
    trial_id: str
    trials: int
    errored: int
    wall_s: float
    experiment_path: str
    trial_nodes: set[str]


def _to_tune(value: Any):
    from ray import tune

    if isinstance(value, Choice):
        return tune.choice(value.choice)
    if isinstance(value, Uniform):
        return tune.uniform(*value.uniform)
    if isinstance(value, LogUniform):
        return tune.loguniform(*value.loguniform)
    if isinstance(value, RandInt):
        return tune.randint(value.randint[0], value.randint[1] + 1)  # inclusive upper bound
    return value


def param_space(spec: Spec) -> dict[str, Any]:
    """The Tune search space for every family of the spec.

    ``family`` picks the model; ``f{i}`` holds family i's parameters. A grid search
    is one ``grid_search`` over whole configs (every family with every combination
    of its own choices), so it never crosses one family's choices with another's.
    """
    from ray import tune

    if spec.search.algorithm == "grid":
        return {GRID_KEY: tune.grid_search(_grid_configs(spec))}
    families = list(range(len(spec.models)))
    space: dict[str, Any] = {"family": tune.choice(families) if len(families) > 1 else 0}
    for i, model in enumerate(spec.models):
        space[f"f{i}"] = {k: _to_tune(v) for k, v in model.space.items()}
    return space


def _grid_configs(spec: Spec) -> list[dict[str, Any]]:
    configs = []
    for i, model in enumerate(spec.models):
        keys = list(model.space)
        values = [v.choice if isinstance(v, Choice) else [v] for v in model.space.values()]
        for combo in itertools.product(*values):
            configs.append({"family": i, f"f{i}": dict(zip(keys, combo, strict=True))})
    return configs


def planned_trials(spec: Spec, num_samples: int | None = None) -> int:
    """How many trials the search runs: grid search runs every config per sample."""
    samples = num_samples or spec.search.num_samples
    if spec.search.algorithm != "grid":
        return samples
    return samples * len(_grid_configs(spec))


def _searcher(spec: Spec):
    """The spec's search algorithm. Tune wraps it in a ``ConcurrencyLimiter`` of the
    search's ``max_concurrent_trials`` (always set), which also lets Tune keep that many
    trials pending (without one, a searcher gets one pending trial at a time)."""
    alg = spec.search.algorithm
    if alg in ("random", "grid"):
        return None  # Tune's BasicVariantGenerator
    if alg == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(sampler=TPESampler(seed=spec.data.seed))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=spec.data.seed)
    return searcher


SKLEARN_STEPS = 10  # reports of a growing estimator in a search without torch families
MAX_SKLEARN_STEPS = 30  # each report writes a checkpoint of the whole estimator


def _epochs(model) -> list[int]:
    """The epoch counts a torch family's space allows (its largest for a range)."""
    value = model.space.get("epochs", TORCH_DEFAULTS["epochs"])
    if isinstance(value, Choice):
        values = value.choice
    elif isinstance(value, Range):
        values = [value.bounds[1]]
    else:
        values = [value]
    return [int(v) for v in values if isinstance(v, int | float)]


def _grows(model) -> bool:
    """Whether a scikit-learn family reports in steps (see training.grow)."""
    from training.grow import growth_of
    from training.spec import instantiate

    constants = {k: v for k, v in model.space.items() if not isinstance(v, Distribution)}
    return growth_of(instantiate(model.estimator, constants)) is not None


def sklearn_steps(spec: Spec) -> int:
    """How many times a growing scikit-learn trial reports: as many as the longest torch
    family has epochs (so a rung is the same share of every trial's budget), else
    ``SKLEARN_STEPS``; at most ``MAX_SKLEARN_STEPS``."""
    epochs = [e for m in spec.models if m.type == "torch_mlp" for e in _epochs(m)]
    return max(1, min(max(epochs) if epochs else SKLEARN_STEPS, MAX_SKLEARN_STEPS))


def max_reports(spec: Spec) -> int:
    """The most reports any trial makes: the schedulers' ``max_t``."""
    reports = [1]
    for m in spec.models:
        if m.type == "torch_mlp":
            reports += _epochs(m)
        elif _grows(m):
            reports.append(sklearn_steps(spec))
    return max(reports)


def _scheduler(spec: Spec):
    from ray.tune import schedulers

    max_t = max_reports(spec)
    name = spec.search.scheduler
    if name == "asha":
        return schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=min(2, max_t),
            reduction_factor=3,
        )
    if name == "hyperband":
        # The asynchronous HyperBand of the ASHA paper: brackets of different grace
        # periods. Ray's synchronous HyperBandScheduler pauses trials at each rung, and
        # neither a one-report sklearn trial nor a nested Train run resumes from a pause.
        return schedulers.AsyncHyperBandScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=1,
            reduction_factor=3,
            brackets=3,
        )
    if name == "median":
        # min_time_slice beyond max_t: never pause a trial to "yield time" while too few
        # trials have reported (a paused function trial restarts from its start; a sklearn
        # trial would be paused and rerun forever).
        return schedulers.MedianStoppingRule(
            time_attr="training_iteration",
            grace_period=min(2, max_t),
            min_samples_required=3,
            min_time_slice=max_t + 1,
        )
    if name == "pbt":
        # The spec refuses PBT unless every family is torch_mlp.
        mutations = {}
        for i, m in enumerate(spec.models):
            for key in PBT_MUTABLE:
                if isinstance(m.space.get(key), Distribution):
                    mutations[f"f{i}"] = {
                        **mutations.get(f"f{i}", {}),
                        key: _to_tune(m.space[key]),
                    }
        return schedulers.PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=max(1, max_t // 4),
            hyperparam_mutations=mutations,
        )
    return schedulers.FIFOScheduler()


def trial_resources(spec: Spec) -> Callable[[dict[str, Any]], dict[str, float]]:
    """Tune resources per trial.

    A trial that trains in its own process (scikit-learn, a 1-worker torch MLP) asks for
    ``cpus_per_trial`` CPUs (and its GPU): one shape, so a reused actor can take any
    such trial. A DDP trial is only a Ray Train driver (its workers hold the CPUs), so it
    asks for no CPU, only a little memory (Tune refuses an empty request; a CPU sliver
    would make 2 workers on 2 CPUs infeasible)."""
    models = spec.models
    cpus = spec.search.cpus_per_trial

    def resources(config: dict[str, Any]) -> dict[str, float]:
        family, _ = family_params(config)
        model = models[family]
        if model.type == "torch_mlp" and model.workers >= 2:
            return {"CPU": 0, "memory": 64 * 1024**2}
        if model.type == "torch_mlp" and model.gpus_per_worker:
            return {"CPU": cpus, "GPU": model.gpus_per_worker}
        return {"CPU": cpus}

    return resources


def default_concurrency(spec: Spec, cluster_cpus: float) -> int:
    """What the cluster's CPUs allow for the family with the largest footprint."""
    need = max(
        spec.search.cpus_per_trial * (m.workers if m.type == "torch_mlp" else 1)
        for m in spec.models
    )
    return max(1, math.floor(cluster_cpus / need))


def latest_search(state_dir: Path, name: str) -> Path | None:
    """The newest search folder of model ``name`` (``NAME-YYYYmmdd-HHMMSS-ffffff``, or
    without the microseconds: searches started before they were added)."""
    pattern = re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}(-\d{{6}})?")
    runs = sorted(
        p for p in (state_dir / "searches").glob(f"{name}-*") if pattern.fullmatch(p.name)
    )
    return runs[-1] if runs else None


def storage_root(state_dir: Path, kind: str = "searches") -> str:
    """Where a new search keeps its trials (``kind`` "searches") or Ray Train its
    checkpoints ("train"): under ``RAYSHIP_STORAGE_PATH`` when set (an ``s3://`` URI
    every node of a Kubernetes cluster reaches; the manifests set it), else under
    ``<state>``. ``resume`` looks only under ``<state>/searches``."""
    remote = os.environ.get("RAYSHIP_STORAGE_PATH", "").rstrip("/")
    if remote:
        return remote if kind == "searches" else f"{remote}/{kind}"
    return str((state_dir / kind).resolve())


def _checkpoints_kept(spec: Spec) -> int | None:
    """Checkpoints kept per trial: the newest only, except under PBT, where a trial
    exploits another's checkpoint some time after PBT picked it; by then the other
    trial has reported again, and with one kept the picked checkpoint is gone (the
    exploiting trial then fails with "does not exist on storage anymore")."""
    return None if spec.search.scheduler == "pbt" else 1


NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # run_search passes its own loggers
SNAPSHOT_PERIOD_S = "1"  # Tune's experiment-state snapshots at least this often (see above)


def search_name(spec: Spec) -> str:
    """A new search's folder name: the model's name and the time to the microsecond."""
    return f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def run_search(
    spec: Spec,
    ctx: TrialContext,
    *,
    state_dir: Path,
    mlflow_uri: str,
    num_samples: int | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    store_ready: Future | None = None,
) -> SearchResult:
    """Run (or resume) the search; Ray must already be initialised by the caller.
    ``store_ready``: the MLflow store's creation, if the caller started it in a thread."""
    # Tune warns on every checkpoint of short trials; the snapshots are cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_PERIOD_S)
    import ray
    from ray import tune
    from ray.tune.error import TuneError
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from training.tracking import MLflowTrials

    ctx = dataclasses.replace(ctx, reports=sklearn_steps(spec))
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(spec))
    searches = (state_dir / "searches").resolve()
    # result.json and progress.csv are what Tune's results and the tests read; Tune's
    # third default logger (TensorBoard) imports torch into this process (4 s here).
    own = [MLflowTrials(mlflow_uri, f"{spec.name}-search", resume, store_ready)]
    own += [JsonLoggerCallback(), CSVLoggerCallback(), *(callbacks or [])]
    start = time.monotonic()
    if resume:
        path = latest_search(state_dir, spec.name)
        if path is None or not tune.Tuner.can_restore(str(path.resolve())):
            raise FileNotFoundError(f"no search of {spec.name!r} to resume under {searches}")
        tuner = tune.Tuner.restore(
            str(path.resolve()), trainable, resume_unfinished=True, resume_errored=True
        )
        # The restored run config holds the callbacks as pickled; use this process's.
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = own
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
        concurrency = spec.search.max_concurrent_trials or default_concurrency(spec, cpus)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=_searcher(spec),
                scheduler=_scheduler(spec),
                num_samples=num_samples or spec.search.num_samples,
                max_concurrent_trials=concurrency,
                reuse_actors=True,
                time_budget_s=spec.search.time_budget_s,
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=search_name(spec),
                storage_path=storage_root(state_dir),
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=_checkpoints_kept(spec)),
                callbacks=own,
                verbose=0,
            ),
        )
    handler = signal.getsignal(signal.SIGINT)
    loggers = os.environ.get(NO_AUTO_LOGGERS)
    os.environ[NO_AUTO_LOGGERS] = "1"
    try:
        grid = tuner.fit()
    except TuneError:
        # Tune wraps an error raised in a callback's trial event in a TuneError holding
        # the whole traceback as text; the tracking failure itself is the one line to show.
        if own[0].failure is not None:
            raise own[0].failure from None
        raise
    finally:
        if loggers is None:
            os.environ.pop(NO_AUTO_LOGGERS, None)
        else:
            os.environ[NO_AUTO_LOGGERS] = loggers
        # Tune swaps in its own SIGINT handler for the run and, on Ctrl-C, stops the
        # run, saves its state, marks the running trials TERMINATED and puts the
        # previous handler back. That swap is the only trace an interruption leaves.
        in_main = threading.current_thread() is threading.main_thread() and not int(
            os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
        )
        interrupted = in_main and signal.getsignal(signal.SIGINT) is handler
        if in_main:
            signal.signal(signal.SIGINT, handler)
    wall = time.monotonic() - start
    if interrupted:
        raise SearchError(
            f"search interrupted; its state is in {grid.experiment_path}; "
            "continue it with `rayship tune SPEC --resume`"
        )
    return _summarise(grid, spec, wall)


def _summarise(grid, spec: Spec, wall: float) -> SearchResult:
    ok = [r for r in grid if r.error is None and r.metrics and spec.metric in r.metrics]
    if not ok:
        errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None][:3]
        raise SearchError(f"no trial of the search finished; errors: {errors}")
    best = grid.get_best_result(
        metric=spec.metric, mode=spec.mode, scope="last", filter_nan_and_inf=True
    )
    checkpoint = best.metrics.get("checkpoint_path") or (best.checkpoint and best.checkpoint.path)
    if not checkpoint:
        raise SearchError(f"best trial {best.metrics.get('trial_id')} left no checkpoint")
    nodes = set()
    for r in grid:
        df = r.metrics_dataframe
        if df is not None and "node_id" in df:
            nodes.update(df["node_id"].dropna().unique())
    return SearchResult(
        best_config=best.config,
        best_metrics=best.metrics,
        best_checkpoint=checkpoint,
        trial_id=best.metrics.get("trial_id", ""),
        trials=len(grid),
        errored=len(grid.errors),
        wall_s=wall,
        experiment_path=grid.experiment_path,
        trial_nodes=nodes,
    )
