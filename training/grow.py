"""Growing a scikit-learn estimator in steps, so a search can stop the weak ones early.

Some estimators get better by getting bigger: boosting stages
(HistGradientBoosting's ``max_iter``), trees (``n_estimators`` with ``warm_start``:
forests, classic gradient boosting, bagging) and epochs (``partial_fit`` up to
``max_iter``: SGD, perceptron, passive-aggressive, MLP with an SGD/Adam solver). A
trial of such an estimator grows it to ``budget * k / steps`` units at step ``k`` and
reports after each step, so ASHA, HyperBand and median stopping compare trials at the
same share of their budget and stop the weak ones early. Every other estimator is
fitted once and reports once.

scikit-learn's own warm start does the growing: a forest grown in steps gets the
trees one ``fit`` gives it (scikit-learn draws the same seeds), and boosting adds
stages to the fitted ones. ``partial_fit`` has no convergence test (``fit`` stops
when the training loss stalls), so an epoch-grown estimator stops when its
validation score has not improved for its own ``n_iter_no_change`` epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class Growth:
    """How an estimator grows: ``kind`` (warm start of the size parameter ``param``, or
    epochs of ``partial_fit``) and ``budget``, the size the trial's parameters ask for."""

    kind: Literal["warm_start", "partial_fit"]
    param: str  # n_estimators or max_iter
    budget: int
    patience: int = 0  # partial_fit: epochs without a better validation score before it stops

    def sizes(self, steps: int) -> list[int]:
        """The size after each step: ``steps`` near-equal shares of the budget, at least
        one unit each (fewer steps when the budget is smaller than ``steps``)."""
        steps = max(1, min(steps, self.budget))
        return [math.ceil(self.budget * k / steps) for k in range(1, steps + 1)]


def growth_of(est) -> Growth | None:
    """The estimator's way to grow, or None when it is fitted in one go."""
    params = est.get_params()
    if "warm_start" in params and _positive_int(params.get("n_estimators")):
        return Growth("warm_start", "n_estimators", int(params["n_estimators"]))
    if hasattr(est, "partial_fit") and _positive_int(params.get("max_iter")):
        patience = params.get("n_iter_no_change")
        return Growth("partial_fit", "max_iter", int(params["max_iter"]), int(patience or 5))
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    hgb = (HistGradientBoostingClassifier, HistGradientBoostingRegressor)
    if isinstance(est, hgb) and _positive_int(params.get("max_iter")):
        return Growth("warm_start", "max_iter", int(params["max_iter"]))
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def warm_start_to(est, growth: Growth, size: int, X: np.ndarray, y: np.ndarray) -> int:
    """Grow a warm-start estimator to ``size`` units; returns the units it holds, fewer
    than ``size`` when it stopped by its own rule (boosting's early stopping)."""
    est.set_params(warm_start=True, **{growth.param: size})
    est.fit(X, y)
    if growth.param == "max_iter":  # HistGradientBoosting
        return int(est.n_iter_)
    fitted = getattr(est, "n_estimators_", None)  # GradientBoosting's n_iter_no_change
    return int(fitted) if fitted is not None else len(est.estimators_)


def partial_fit_epoch(est, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None) -> None:
    """One epoch of ``partial_fit``; a classifier's first call names every class."""
    if classes is not None and not hasattr(est, "classes_"):
        est.partial_fit(X, y, classes=classes)
    else:
        est.partial_fit(X, y)
