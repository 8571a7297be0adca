"""A rich progress bar for a running search, fed by Ray Tune's callback hooks."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SearchProgress(Callback):
    """Counts finished trials and shows the best validation score so far."""

    def __init__(self, console: Console, metric: str, mode: str, total: int | None):
        self.metric, self.mode, self.best = metric, mode, None
        self.progress = Progress(
            TextColumn("[bold]search[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("", total=total)

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment state (for --resume); a live
        # terminal display cannot be pickled and means nothing in a later process.
        return (Callback, ())

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def on_trial_result(
        self, iteration: int, trials: list, trial, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        if value is None:
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
        self._describe(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.progress.advance(self.task)
        self._describe(trials, leaving=trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.progress.advance(self.task)
        self._describe(trials, leaving=trial)

    def _describe(self, trials: list, leaving=None) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not leaving)
        best = f"best {self.metric} {self.best:.4f} · " if self.best is not None else ""
        self.progress.update(self.task, description=f"{best}{running} running")
