"""Drift of new data against a version's training reference, with calibrated alert levels.

The reference (:func:`build_reference`) is a JSON-able dict stored with every registered
version as ``drift.json``. Per feature it holds the *slots* rows fall into and the
training share of each:

- numeric: ``k`` bins cut at the deduplicated quantiles of the training values (a bin
  is ``(e[i-1], e[i]]``, the edges are training values, so none is empty), then slot
  ``k`` for a missing value and ``k + 1`` for a value outside the training range
  ``[lo, hi]``;
- categorical: the ``k`` training categories (the missing category ``''`` excluded),
  slot ``k`` for missing (``''``) and ``k + 1`` for a category training never saw.

:func:`codes` turns a batch of model inputs into one slot per row and feature
(vectorised numpy: the serving monitor calls it on every batch it samples);
:func:`report` / :func:`counts_report` compare observed slot shares with the training
shares.

Statistics per feature
    PSI, ``sum((o - e) * ln(o / e))`` over slots, with both shares clipped below at
    ``EPS = 1e-4`` so that a slot empty on one side (the out-of-range slot is always
    empty in training) adds a finite amount; Jensen–Shannon *distance*
    (``scipy.spatial.distance.jensenshannon``, base 2, in [0, 1]); the shares of rows
    missing, outside the training range (numeric) and of unseen categories (categorical).

Calibration (what "drifted" means)
    A fixed PSI level (0.1, 0.25) means different things for a 10-bin feature at 200
    rows and a 3-category feature at 100,000 rows. Here each feature's alert level is
    what sampling noise alone reaches at ``window`` rows: random windows of ``window``
    rows are drawn from the holdout (rows the model never trained on) and their PSI
    against the training reference computed. A window's slot counts of one feature are
    drawn directly as ``multinomial(window, holdout slot shares)`` — the same
    distribution as counting a window of rows drawn with replacement from the holdout,
    at a cost independent of ``window``. With replacement always (not only when the
    holdout is smaller than a window): live rows are independent draws, and sampling
    without replacement from a finite holdout would understate their noise.

    Many features, one alarm: with 64 features each alerting at its own 99th
    percentile, an undrifted window would flag *some* feature about half the time
    (``1 - 0.99**64``). The level is therefore set per feature at the Bonferroni
    quantile ``1 - (1 - q) / n_features`` (``q`` = ``monitor.calibration_quantile``),
    so an undrifted window flags any feature with probability at most about ``1 - q``.
    That quantile (0.99984 for digits) is too far in the tail to read off a few hundred
    windows, so a gamma distribution is fitted to the windows' PSI by its mean and
    variance (PSI under no drift is close to a scaled chi-square, i.e. a gamma) and the
    level read from the fit; it is never below the windows' own highest value, nor
    below ``FLOOR_SHARE`` (1%) of the rows moving into a slot training never saw, so a
    handful of odd rows in a feature that is constant in training is not drift. The
    Jensen–Shannon level is calibrated the same way (on its square, the divergence).

    A feature is ``drifted`` when its PSI passes its level. The level holds for windows
    of ``window`` rows; a report over ``rows`` fewer than that (a sliding window still
    filling) uses the level times ``window / rows`` (the noise of PSI grows as
    ``1 / rows``), and over more rows keeps it (less noise: stricter than needed, never
    looser).

Model-level score
    ``sum_i importance_i * psi_i / threshold_i``: the importance-weighted mean of each
    feature's PSI in units of its own alert level. Above 1, the features the model
    leans on have, on average, moved past what noise reaches.

Importance
    Permutation importance on the holdout: the drop of the spec's metric when one
    column is shuffled, averaged over ``IMPORTANCE_REPEATS`` shuffles, clipped at 0 and
    normalised to sum 1 (equal weights when no column matters). scikit-learn's
    ``permutation_importance`` wants an estimator; the served thing is an ONNX graph
    behind a ``predict`` callable, and stacking every shuffled copy into a few large
    ``predict`` calls is far quicker than one call per column and repeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from training.categories import MISSING_CATEGORY

EPS = 1e-4  # shares are clipped below at this before the PSI's logarithm
FLOOR_SHARE = 0.01  # no alert level below PSI of this share moving into an empty slot
CALIBRATION_WINDOWS = 400
IMPORTANCE_REPEATS = 3
IMPORTANCE_ROWS = 1000  # holdout rows used for permutation importance at most
PREDICT_ROWS = 200_000  # rows per predict call while computing importance
MAX_SLOTS = np.iinfo(np.int16).max


# -- reference ------------------------------------------------------------------------


def _numeric_bins(values: np.ndarray, bins: int) -> tuple[list[float], float, float]:
    """(inner edges, lo, hi) of the non-missing training values: deduplicated quantiles
    that are training values themselves (``method="inverted_cdf"``), strictly below hi."""
    lo, hi = float(values.min()), float(values.max())
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.unique(np.quantile(values, qs, method="inverted_cdf"))
    return [float(e) for e in edges[edges < hi]], lo, hi


def _feature_reference(col: pd.Series, feature, bins: int) -> dict[str, Any]:
    """One feature's slots and training shares (without threshold and importance)."""
    ref: dict[str, Any] = {
        "name": feature.name,
        "column": feature.column,
        "kind": "numeric" if feature.dtype == "float" else "categorical",
    }
    if feature.dtype == "float":
        values = col.to_numpy(dtype=np.float64)
        present = values[~np.isnan(values)]
        if len(present) == 0:
            raise ValueError(f"feature {feature.column!r}: no value in the training data")
        ref["edges"], ref["lo"], ref["hi"] = _numeric_bins(present, bins)
    else:
        cats = np.unique(col.to_numpy(dtype=str))
        cats = cats[cats != MISSING_CATEGORY]
        if len(cats) + 2 > MAX_SLOTS:
            raise ValueError(f"feature {feature.column!r}: more than {MAX_SLOTS - 2} categories")
        ref["categories"] = [str(c) for c in cats]
    return ref


def _column_codes(ref: Mapping[str, Any], col: np.ndarray) -> np.ndarray:
    """Slots of one column (any shape with n elements) as int16 of shape (n,)."""
    col = np.asarray(col).reshape(-1)
    if ref["kind"] == "numeric":
        x = col.astype(np.float64)
        edges = np.asarray(ref["edges"], dtype=np.float64)
        k = len(edges) + 1
        out = np.searchsorted(edges, x, side="left")
        out[(x < ref["lo"]) | (x > ref["hi"])] = k + 1
        out[np.isnan(x)] = k
        return out.astype(np.int16)
    cats = np.asarray(ref["categories"], dtype=str)
    k = len(cats)
    x = col.astype(str)
    pos = np.searchsorted(cats, x)
    known = pos < k
    known[known] = cats[pos[known]] == x[known]
    out = np.where(known, pos, k + 1)
    out[x == MISSING_CATEGORY] = k
    return out.astype(np.int16)


def n_slots(reference: Mapping[str, Any]) -> list[int]:
    """Slots per feature (bins or categories, then missing, then out of range/unseen)."""
    return [len(f["expected"]) for f in reference["features"]]


def codes(reference: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Slot of every row for every feature: int16 array (n, n_features).

    ``inputs`` is keyed by ONNX input name (Feature.name), each column of shape (n,) or
    (n, 1) as serving builds them: float32 with NaN for a missing number, strings with
    ``''`` for a missing category.
    """
    features = reference["features"]
    if not features:
        return np.zeros((0, 0), dtype=np.int16)
    columns = [_column_codes(f, inputs[f["name"]]) for f in features]
    return np.stack(columns, axis=1)


def _shares(codes_1d: np.ndarray, slots: int) -> np.ndarray:
    return np.bincount(codes_1d, minlength=slots)[:slots] / max(len(codes_1d), 1)


def psi(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """PSI of observed shares (..., slots) against expected shares (slots,), shares
    clipped below at EPS (see the module docstring)."""
    o = np.maximum(observed, EPS)
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    return np.sum((o - e) * np.log(o / e), axis=-1)


def js(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Jensen–Shannon distance (base 2) of observed shares (..., slots) and expected ones;
    0 for a window without rows."""
    from scipy.spatial.distance import jensenshannon

    observed = np.atleast_2d(observed)
    expected = np.broadcast_to(np.asarray(expected, dtype=np.float64), observed.shape)
    empty = observed.sum(axis=-1) == 0
    safe = np.where(empty[:, None], expected, observed)
    out = np.nan_to_num(jensenshannon(safe, expected, axis=-1, base=2), nan=0.0)
    return np.where(empty, 0.0, out)


def _gamma_level(samples: np.ndarray, level: float) -> float:
    """The ``level`` quantile of a gamma fitted to ``samples`` by mean and variance,
    never below the samples' maximum."""
    from scipy.stats import gamma

    mean, var = float(samples.mean()), float(samples.var())
    top = float(samples.max())
    if mean <= 0 or var <= 0:
        return top
    return max(top, float(gamma.ppf(level, mean * mean / var, scale=var / mean)))


def calibrate(
    holdout_shares: np.ndarray,
    expected: np.ndarray,
    *,
    window: int,
    level: float,
    rng: np.random.Generator,
    windows: int = CALIBRATION_WINDOWS,
) -> tuple[float, float]:
    """(PSI level, JS-distance level) of one feature: the ``level`` quantile of the
    statistic on ``windows`` random windows of ``window`` rows from the holdout's slot
    shares (module docstring: multinomial draws, gamma tail, floor)."""
    p = np.clip(np.asarray(holdout_shares, dtype=np.float64), 0, None)
    p = p / p.sum()
    counts = rng.multinomial(window, p, size=windows)
    shares = counts / window
    floor_obs = np.array([1 - FLOOR_SHARE, FLOOR_SHARE])
    floor = float(psi(floor_obs, np.array([1.0, 0.0])))
    floor_js = float(js(floor_obs, np.array([1.0, 0.0]))[0])
    psi_level = max(floor, _gamma_level(psi(shares, expected), level))
    js_level = math.sqrt(max(floor_js**2, _gamma_level(js(shares, expected) ** 2, level)))
    return psi_level, js_level


def _score(metric: str, y: np.ndarray, out: np.ndarray) -> float:
    """The metric of ``predict``'s output: class probabilities (n, K) or values/labels."""
    from training.evaluate import score

    out = np.asarray(out)
    if out.ndim == 2 and out.shape[1] > 1:
        return score(metric, y, out.argmax(axis=1), out)
    return score(metric, y, out.reshape(-1))


def permutation_importance(
    X: pd.DataFrame,
    y: np.ndarray,
    predict: Callable[[pd.DataFrame], np.ndarray],
    *,
    metric: str,
    rng: np.random.Generator,
    repeats: int = IMPORTANCE_REPEATS,
) -> np.ndarray:
    """Per column of ``X``: mean drop of ``metric`` (in its better direction) when the
    column is shuffled, clipped at 0, normalised to sum 1 (uniform when all are 0).

    Every shuffled copy of the holdout is stacked into ``predict`` calls of at most
    ``PREDICT_ROWS`` rows (module docstring: why not scikit-learn's)."""
    from training.evaluate import LOWER_IS_BETTER

    n, n_cols = len(X), X.shape[1]
    if n == 0 or n_cols == 0:
        return np.full(n_cols, 1.0 / max(n_cols, 1))
    y = np.asarray(y)
    base = _score(metric, y, predict(X))
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    drops = np.zeros(n_cols)
    jobs = [(j, r) for j in range(n_cols) for r in range(repeats)]
    per_call = max(1, PREDICT_ROWS // n)
    arrays = {c: X[c].to_numpy() for c in X.columns}
    for start in range(0, len(jobs), per_call):
        chunk = jobs[start : start + per_call]
        stacked = {c: np.tile(a, len(chunk)) for c, a in arrays.items()}
        for i, (j, _) in enumerate(chunk):
            column = X.columns[j]
            stacked[column][i * n : (i + 1) * n] = arrays[column][rng.permutation(n)]
        out = np.asarray(predict(pd.DataFrame(stacked, columns=X.columns)))
        for i, (j, _) in enumerate(chunk):
            permuted = _score(metric, y, out[i * n : (i + 1) * n])
            drops[j] += sign * (base - permuted) / repeats
    drops = np.clip(np.nan_to_num(drops), 0.0, None)
    total = drops.sum()
    return drops / total if total > 0 else np.full(n_cols, 1.0 / n_cols)


def build_reference(
    X_train: pd.DataFrame,
    X_holdout: pd.DataFrame,
    y_holdout,
    schema,
    predict: Callable[[pd.DataFrame], np.ndarray],
    *,
    metric: str,
    window: int,
    quantile: float,
    seed: int = 0,
    bins: int = 10,
) -> dict[str, Any]:
    """The drift reference of a version (see the module docstring for every choice).

    ``X_train``/``X_holdout`` are typed frames keyed by Feature.name (training.data);
    ``schema`` a FeatureSchema; ``predict`` maps such a frame to class probabilities
    (n, K) in schema class order, or to values (regression); ``y_holdout`` is in the
    matching coding (class indices, or values) and only used for importance.
    """
    rng = np.random.default_rng(seed)
    features = [_feature_reference(X_train[f.name], f, bins) for f in schema.features]
    n_features = len(features)
    level = 1.0 - (1.0 - quantile) / max(n_features, 1)
    imp_rows = min(len(X_holdout), IMPORTANCE_ROWS)
    pick = np.sort(rng.choice(len(X_holdout), imp_rows, replace=False))
    importance = permutation_importance(
        X_holdout.iloc[pick][schema.names],
        np.asarray(y_holdout)[pick],
        predict,
        metric=metric,
        rng=rng,
    )
    for ref, imp in zip(features, importance, strict=True):
        k = len(ref["edges"]) + 1 if ref["kind"] == "numeric" else len(ref["categories"])
        slots_n = k + 2
        train_codes = _column_codes(ref, X_train[ref["name"]].to_numpy())
        expected = _shares(train_codes, slots_n)
        ref["expected"] = [float(v) for v in expected]
        ref["missing"] = float(expected[slots_n - 2])
        holdout = _shares(_column_codes(ref, X_holdout[ref["name"]].to_numpy()), slots_n)
        if len(X_holdout) == 0:
            holdout = expected
        ref["threshold"], ref["js_threshold"] = calibrate(
            holdout, expected, window=window, level=level, rng=rng
        )
        ref["importance"] = float(imp)
    return {
        "window": int(window),
        "quantile": float(quantile),
        "level": float(level),
        "features": features,
    }


# -- report ---------------------------------------------------------------------------


def counts_report(
    reference: Mapping[str, Any],
    counts: Sequence[np.ndarray],
    rows: int,
    *,
    model: str = "",
    version: str = "",
) -> dict[str, Any]:
    """The drift report from per-feature slot counts (``counts[i]`` of length
    ``n_slots(reference)[i]``) over ``rows`` rows; see :func:`report`."""
    window = int(reference["window"])
    scale = window / rows if 0 < rows < window else 1.0
    out, drifted, score = [], [], 0.0
    for ref, c in zip(reference["features"], counts, strict=True):
        expected = np.asarray(ref["expected"], dtype=np.float64)
        k = len(expected) - 2
        c = np.asarray(c, dtype=np.float64)
        total = c.sum()
        shares = c / total if total > 0 else np.zeros_like(expected)
        value = float(psi(shares, expected)) if total > 0 else 0.0
        distance = float(js(shares, expected)[0])
        threshold = float(ref["threshold"]) * scale
        is_drifted = bool(total > 0 and value > threshold)
        numeric = ref["kind"] == "numeric"
        out.append(
            {
                "name": ref["column"],
                "kind": ref["kind"],
                "psi": value,
                "js": distance,
                "missing": float(shares[k]),
                "out_of_range": float(shares[k + 1]) if numeric else 0.0,
                "unseen": 0.0 if numeric else float(shares[k + 1]),
                "threshold": threshold,
                "importance": float(ref["importance"]),
                "drifted": is_drifted,
            }
        )
        if is_drifted:
            drifted.append(ref["column"])
        score += float(ref["importance"]) * value / threshold if threshold > 0 else 0.0
    return {
        "model": model,
        "version": str(version),
        "window_rows": int(rows),
        "features": out,
        "drifted": drifted,
        "score": float(score),
    }


def report(
    reference: Mapping[str, Any], codes: np.ndarray, *, model: str = "", version: str = ""
) -> dict[str, Any]:
    """The drift report of the rows behind ``codes`` (from :func:`codes`): per feature
    (in reference order, ``name`` the data's column name) PSI, JS distance, shares
    missing / out of range / unseen, the alert level used and whether PSI passes it;
    the drifted columns; the model-level score. NaN-free."""
    codes = np.asarray(codes)
    slots = n_slots(reference)
    counts = [np.bincount(codes[:, i], minlength=s)[:s] for i, s in enumerate(slots)]
    return counts_report(reference, counts, codes.shape[0], model=model, version=version)


# -- offline (``rayship drift``) --------------------------------------------------------


def frame_inputs(reference: Mapping[str, Any], frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The model inputs of a table of new rows, typed as serving types them (float32
    with NaN; category strings, '' for missing), keyed by Feature.name. A feature's
    column is found by the data's own name or its ONNX name; other columns (the target)
    are ignored. ValueError naming every missing column, or a numeric column with text."""
    from training.categories import category_text

    columns = {str(c): c for c in frame.columns}
    found, missing = {}, []
    for f in reference["features"]:
        key = f["column"] if f["column"] in columns else f["name"]
        if key in columns:
            found[f["name"]] = frame[columns[key]]
        else:
            missing.append(f["column"])
    if missing:
        raise ValueError(f"the data lacks the model's column(s) {missing}")
    out = {}
    for f in reference["features"]:
        col = found[f["name"]]
        if f["kind"] == "numeric":
            try:
                values = pd.to_numeric(col, errors="raise")
            except (ValueError, TypeError):
                raise ValueError(f"column {f['column']!r}: expected numbers, found text") from None
            out[f["name"]] = values.to_numpy(dtype=np.float32, na_value=np.nan)
        else:
            out[f["name"]] = col.astype(object).map(category_text).to_numpy(dtype=object)
    return out


def slot_labels(feature: Mapping[str, Any]) -> list[str]:
    """Readable names of a reference feature's slots, in slot order."""
    if feature["kind"] == "categorical":
        return [*feature["categories"], "missing", "unseen"]
    edges = [f"{e:.4g}" for e in feature["edges"]]
    bounds = [f"{feature['lo']:.4g}", *edges, f"{feature['hi']:.4g}"]
    bins = [a if a == b else f"{a}–{b}" for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [*bins, "missing", "out of range"]
