"""Scores for the spec's metrics, from labels, class probabilities or values."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})


def score(
    metric: str, y_true: np.ndarray, pred: np.ndarray, proba: np.ndarray | None = None
) -> float:
    """The spec's metric. Classification: ``pred`` labels, ``proba`` [n, K] in class order."""
    if metric == "accuracy":
        return float(skm.accuracy_score(y_true, pred))
    if metric == "f1_macro":
        return float(skm.f1_score(y_true, pred, average="macro"))
    if metric in ("roc_auc", "log_loss"):
        if proba is None:
            raise ValueError(f"metric {metric} needs class probabilities")
        labels = np.arange(proba.shape[1])
        if metric == "log_loss":
            return float(skm.log_loss(y_true, proba, labels=labels))
        if proba.shape[1] == 2:
            return float(skm.roc_auc_score(y_true, proba[:, 1]))
        return float(skm.roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    if metric == "rmse":
        return float(np.sqrt(skm.mean_squared_error(y_true, pred)))
    if metric == "mae":
        return float(skm.mean_absolute_error(y_true, pred))
    if metric == "r2":
        return float(skm.r2_score(y_true, pred))
    raise ValueError(f"unknown metric {metric}")


def better(metric: str, a: float, b: float) -> bool:
    """True when score ``a`` is strictly better than ``b`` for this metric."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def reaches(metric: str, value: float, threshold: float) -> bool:
    """True when ``value`` meets the gate's ``min_metric`` (≤ for losses, ≥ otherwise)."""
    return value <= threshold if metric in LOWER_IS_BETTER else value >= threshold
