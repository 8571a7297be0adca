"""Search results to MLflow: one run per Tune trial, its config as params, its reports
as metrics, in the experiment ``<name>-search``.

Ray ships ``MLflowLoggerCallback``, which does the same but writes every parameter and
every metric of every report as a request of its own: against the SQLite store that is
one transaction per value, ~10 values a report, in the loop that also schedules the
trials. This callback writes a trial's params in one batch and each report in one
batch. A resumed search (``resume=True``) finds its trials' runs again by their
``trial_id`` tag instead of starting new ones.
"""

from __future__ import annotations

import time
from numbers import Number
from typing import Any

from ray.tune import Callback

SKIPPED = {"config", "pid", "timestamp", "done", "should_checkpoint"}
MAX_PARAMS = 100  # MLflow's limit per batch


class MLflowTrials(Callback):
    """A Tune callback logging each trial as an MLflow run (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment_name: str, resume: bool = False):
        self.tracking_uri, self.experiment_name, self.resume = tracking_uri, experiment_name, resume
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment state; a client holds connections.
        return {**self.__dict__, "_client": None}

    def setup(self, **info: Any) -> None:
        from training import registry

        self._client = registry.client(self.tracking_uri)
        self._experiment_id = registry.ensure_experiment(self.tracking_uri, self.experiment_name)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if trial.trial_id in self._runs:
            return
        run_id = self._existing_run(trial.trial_id) if self.resume else None
        if run_id is None:
            run_id = self._client.create_run(
                self._experiment_id,
                tags={"trial_id": trial.trial_id, "mlflow.runName": str(trial)},
                run_name=str(trial),
            ).info.run_id
            params = [(k, v) for k, v in _flatten(trial.config).items()]
            from mlflow.entities import Param

            for i in range(0, len(params), MAX_PARAMS):
                batch = [Param(k, str(v)[:6000]) for k, v in params[i : i + MAX_PARAMS]]
                self._client.log_batch(run_id, params=batch)
        self._runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        from mlflow.entities import Metric

        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("training_iteration") or 0)
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in result.items()
            if key not in SKIPPED and isinstance(value, Number) and not isinstance(value, bool)
        ]
        self._client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        run_id = self._runs.pop(trial.trial_id, None)
        if run_id is not None:
            self._client.set_terminated(run_id, status)

    def _existing_run(self, trial_id: str) -> str | None:
        runs = self._client.search_runs(
            [self._experiment_id], filter_string=f"tags.trial_id = '{trial_id}'", max_results=1
        )
        return runs[0].info.run_id if runs else None


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"f0": {"lr": 0.1}}`` → ``{"f0/lr": 0.1}`` (Tune's own separator)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out
