"""Search results to MLflow: one run per Tune trial, its config as params, its reports
as metrics, in the experiment ``<name>-search``.

Ray ships ``MLflowLoggerCallback``, which does the same but writes every parameter and
every metric of every report as a request of its own: against the SQLite store that is
one transaction per value, ~10 values a report, in the loop that also schedules the
trials. This callback writes a trial's params in one batch and each report in one
batch, and does all of it in one writer thread of its own: Tune's loop only queues
what happened (a new store costs ~3 s of imports and migrations here, a report a
SQLite transaction), and the experiment's end waits for the queue to drain. The
writer's first error (an unreachable server, a store that cannot be created) is raised
to Tune, as a :class:`TrackingError`, at the next trial event or at the experiment's end,
which stops the search. A resumed search (``resume=True``) finds its trials' runs again
by their ``trial_id`` tag instead of starting new ones.

:func:`check_reachable` is the check before a search: a tracking server that does not
answer fails the command at once, before Ray starts and before anything is written.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from numbers import Number
from typing import Any

from ray.tune import Callback

SKIPPED = {"config", "pid", "timestamp", "done", "should_checkpoint"}
MAX_PARAMS = 100  # MLflow's limit per batch
REACH_TIMEOUT_S = 10.0


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or written (message names the store)."""


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` unless the tracking server at ``uri`` answers HTTP.

    Only ``http(s)://`` URIs are checked (a SQLite or file store is local and is created
    on first use). One ``GET {uri}/health`` (the MLflow server's liveness route), no
    retries: MLflow's own client retries an unreachable server with backoff for minutes
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), so a search would start Ray and its trials
    before failing. Any HTTP answer counts as reachable (a server behind auth may answer
    401); a refused connection, a DNS failure or ``timeout`` seconds without an answer
    do not.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable: {reason}; "
            "start it, or point MLFLOW_TRACKING_URI at one that runs"
        ) from None


class MLflowTrials(Callback):
    """A Tune callback logging each trial as an MLflow run (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        resume: bool = False,
        store_ready: Future | None = None,
    ):
        """``store_ready``: the caller's creation of the store, under way in a thread of
        its own (the writer waits for it instead of migrating the same new store)."""
        self.tracking_uri, self.experiment_name, self.resume = tracking_uri, experiment_name, resume
        self._store_ready = store_ready
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.failure: TrackingError | None = None  # the error raised to Tune, if any

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment state; the writer stays here.
        state = {**self.__dict__, "_queue": None, "_writer": None, "_error": None, "failure": None}
        return {**state, "_store_ready": None}

    def setup(self, **info: Any) -> None:
        self._queue = queue.Queue()
        self._writer = threading.Thread(target=self._write, name="mlflow-trials", daemon=True)
        self._writer.start()

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._put("start", trial.trial_id, str(trial), _flatten(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        step = int(result.get("training_iteration") or 0)
        values = {
            key: float(value)
            for key, value in result.items()
            if key not in SKIPPED and isinstance(value, Number) and not isinstance(value, bool)
        }
        self._put("result", trial.trial_id, step, int(time.time() * 1000), values)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._put("end", trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._put("end", trial.trial_id, "FAILED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._writer is None:
            return
        self._queue.put(None)
        self._writer.join()
        self._writer = None
        self._raise_if_failed()

    def _put(self, *event: Any) -> None:
        self._raise_if_failed()  # stop the search at the first event after a failure
        if self._queue is not None:
            self._queue.put(event)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if self._writer is not None:
                self._queue.put(None)
                self._writer = None
            message = f"MLflow tracking at {self.tracking_uri} failed: {error}"
            self.failure = TrackingError(message)
            raise self.failure from error

    def _write(self) -> None:
        """The writer thread: apply queued events in order until the ``None`` sentinel;
        after an error, keep draining (so nothing blocks) but write nothing more."""
        from mlflow.entities import Metric, Param

        from training import registry

        client, experiment_id, runs = None, None, {}  # trial id -> run id
        while (event := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                if client is None:
                    if self._store_ready is not None:
                        self._store_ready.result()
                    client = registry.client(self.tracking_uri)
                    experiment_id = registry.ensure_experiment(
                        self.tracking_uri, self.experiment_name
                    )
                kind, trial_id, *rest = event
                if kind == "start" and trial_id not in runs:
                    runs[trial_id] = self._start_run(client, experiment_id, trial_id, *rest, Param)
                elif kind == "result" and trial_id in runs:
                    step, now, values = rest
                    metrics = [Metric(k, v, now, step) for k, v in values.items()]
                    client.log_batch(runs[trial_id], metrics=metrics)
                elif kind == "end" and trial_id in runs:
                    client.set_terminated(runs.pop(trial_id), rest[0])
            except Exception as exc:  # raised to Tune at the experiment's end
                self._error = exc

    def _start_run(self, client, experiment_id: str, trial_id: str, name: str, params, Param):
        run_id = self._existing_run(client, experiment_id, trial_id) if self.resume else None
        if run_id is not None:
            return run_id
        run_id = client.create_run(
            experiment_id, tags={"trial_id": trial_id, "mlflow.runName": name}, run_name=name
        ).info.run_id
        items = list(params.items())
        for i in range(0, len(items), MAX_PARAMS):
            batch = [Param(k, str(v)[:6000]) for k, v in items[i : i + MAX_PARAMS]]
            client.log_batch(run_id, params=batch)
        return run_id

    @staticmethod
    def _existing_run(client, experiment_id: str, trial_id: str) -> str | None:
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.trial_id = '{trial_id}'", max_results=1
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
