"""Predictor: one registered ONNX graph in onnxruntime, fed from KServe V1 ``instances``.

The graph contract is the one in ``training/export.py``: one input per feature,
named after the column, shape ``[N, 1]``, float32 for numeric columns (NaN =
missing) and string for categorical ones ('' = missing); outputs ``prediction``
``[N]`` and, for classification, ``probabilities`` ``[N, K]`` in the schema's
class order.

The feeds are built here with numpy alone, not with ``training.export.onnx_feeds``:
serving replicas carry neither pandas-based training code nor scikit-learn, and the
request has to be checked value by value anyway so that a bad one is refused with
the field it is about (:class:`BadInput`) instead of failing inside the graph. The
typing matches ``training.data.type_features``: numbers (and booleans) become
float32, ``null``/NaN a missing number; categorical values become strings
(``str(value)``), ``null`` the missing category ''; an unseen category is passed
through and the graph's one-hot encoder ignores it.

Work is split in three steps — :meth:`OnnxPredictor.feeds` (validate one request),
:meth:`OnnxPredictor.run_many` (one graph run over several requests' feeds) and
:meth:`OnnxPredictor.respond` (JSON for one request) — so the Serve deployment can
refuse bad input per request and still batch the good ones into one run.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from services.http import loads
from training.categories import category_text

MAX_DETAILS = 20  # problems listed in one BadInput; the rest are counted
_F32_MAX = float(np.finfo(np.float32).max)
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(string)": "string"}


class BadInput(ValueError):
    """A request the model cannot take. ``details`` holds one dict per problem:
    ``{"field", "row", "expected", "got"}`` (``row`` is None for request-level fields)."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []


def problem(field: str, expected: str, got: str, row: int | None = None) -> dict[str, Any]:
    return {"field": field, "row": row, "expected": expected, "got": got}


def json_object(body: bytes, expected: str) -> dict[str, Any]:
    """A request body parsed as a JSON object, or BadInput on field ``body`` saying
    ``expected``."""
    try:
        payload = loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInput(
            f"request body is not valid JSON: {exc}",
            [problem("body", expected, f"invalid JSON ({exc})")],
        ) from None
    if not isinstance(payload, dict):
        raise BadInput(
            f"request body: expected {expected}",
            [problem("body", expected, type(payload).__name__)],
        )
    return payload


def describe(value: Any) -> str:
    """A short, safe description of a JSON value for an error message."""
    kind = {
        type(None): "null",
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)
    if isinstance(value, dict | list):
        return f"{kind} of {len(value)}"
    text = repr(value)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


def _numeric(value: Any) -> float | None:
    """The float32-representable number for a numeric cell (NaN for missing), or None if bad."""
    if value is None:
        return math.nan
    if isinstance(value, bool | int | float):
        try:
            x = float(value)
        except OverflowError:
            return None
        if math.isnan(x) or abs(x) <= _F32_MAX:
            return x
    return None


def _categorical(value: Any) -> str | None:
    """The category string for a categorical cell ('' for missing), or None if bad."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return category_text(value)  # exactly as training typed the column
    return None


class OnnxPredictor:
    """One registered version: its ONNX session and feature schema.

    ``schema`` is ``FeatureSchema.to_dict()`` (the artifact's schema.json). The graph
    is checked against it on construction (every feature an input of the right
    type, the outputs the task needs), so a mismatched artifact fails to load
    rather than failing requests.
    """

    def __init__(self, onnx_bytes: bytes, schema: dict[str, Any], name: str, version: str):
        import onnxruntime as ort

        self.name = name
        self.version = str(version)
        self.schema = schema
        self.task: str = schema["task"]
        self.features: list[dict[str, Any]] = list(schema["features"])
        self.names: list[str] = [f["name"] for f in self.features]
        self.numeric = [f["dtype"] == "float" for f in self.features]
        self.all_numeric = all(self.numeric)
        self._getter = operator.itemgetter(*self.names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.classes: list[Any] | None = schema.get("classes")

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._check_graph()
        self._outputs = ["prediction"] + (
            ["probabilities"] if self.task == "classification" else []
        )

    def _check_graph(self) -> None:
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.type for o in self.session.get_outputs()}
        problems = []
        for f in self.features:
            want = "tensor(float)" if f["dtype"] == "float" else "tensor(string)"
            if inputs.get(f["name"]) != want:
                problems.append(
                    f"input {f['name']!r}: graph has {inputs.get(f['name'])}, schema needs {want}"
                )
        needed = ["prediction"] + (["probabilities"] if self.task == "classification" else [])
        problems += [f"output {o!r} missing" for o in needed if o not in outputs]
        if problems:
            raise ValueError(
                f"{self.name} version {self.version}: graph does not fit its schema: {problems}"
            )
        self.prediction_dtype = _ORT_DTYPES.get(outputs["prediction"], outputs["prediction"])

    # -- one request ---------------------------------------------------------------

    def feeds(self, instances: Any) -> dict[str, np.ndarray]:
        """Validate V1 ``instances`` and build the graph's per-column inputs.

        Each instance is an object ``{column: value}`` with exactly the model's
        features, or a list of values in feature order (:attr:`names`). Raises
        :class:`BadInput` listing up to ``MAX_DETAILS`` problems.
        """
        if not isinstance(instances, list):
            raise BadInput(
                "instances: expected a list of objects or lists",
                [problem("instances", "a list of objects or lists", describe(instances))],
            )
        if not instances:
            raise BadInput(
                "instances: expected at least one instance",
                [problem("instances", "a non-empty list", "[]")],
            )
        fast = self._numeric_feeds(instances) if self.all_numeric else None
        if fast is not None:
            return fast
        n, width = len(instances), len(self.names)
        columns: list[list[Any]] = [[None] * n for _ in range(width)]
        problems: list[dict[str, Any]] = []
        for r, row in enumerate(instances):
            if len(problems) >= MAX_DETAILS:
                break
            if isinstance(row, dict):
                unknown = [k for k in row if k not in self._index]
                missing = [c for c in self.names if c not in row]
                problems += [
                    problem(k, f"one of the model's features {self.names}", "unknown column", r)
                    for k in unknown
                ]
                problems += [
                    problem(c, "a value (null for missing)", "no such key", r) for c in missing
                ]
                if unknown or missing:
                    continue
                values = [row[c] for c in self.names]
            elif isinstance(row, list):
                if len(row) != width:
                    problems.append(
                        problem(
                            f"instances[{r}]",
                            f"a list of {width} values in feature order {self.names}",
                            f"a list of {len(row)}",
                            r,
                        )
                    )
                    continue
                values = row
            else:
                problems.append(
                    problem(
                        f"instances[{r}]",
                        "an object {column: value} or a list of values",
                        describe(row),
                        r,
                    )
                )
                continue
            for j, value in enumerate(values):
                if self.numeric[j]:
                    cell = _numeric(value)
                    expected = "a number within float32 range, or null"
                else:
                    cell = _categorical(value)
                    expected = "a string (category), or null"
                if cell is None:
                    problems.append(problem(self.names[j], expected, describe(value), r))
                else:
                    columns[j][r] = cell
        if problems:
            shown = problems[:MAX_DETAILS]
            first = shown[0]
            where = f"instances[{first['row']}]." if first["row"] is not None else ""
            more = (
                f" (and {len(shown) - 1} more problem(s) listed in details)"
                if len(shown) > 1
                else ""
            )
            raise BadInput(
                f"{where}{first['field']}: expected {first['expected']}, got {first['got']}{more}",
                shown,
            )
        return {
            name: (
                np.asarray(col, dtype=np.float32) if numeric else np.asarray(col, dtype=object)
            ).reshape(-1, 1)
            for name, col, numeric in zip(self.names, columns, self.numeric, strict=True)
        }

    def _numeric_feeds(self, instances: list[Any]) -> dict[str, np.ndarray] | None:
        """The feeds of an all-numeric model's rows in one numpy conversion, or None
        when the rows need the cell-by-cell check (nulls, strings, wrong widths, objects
        with other keys): that path then finds and names any problem. Lists in feature
        order go straight to numpy; objects are read in feature order first."""
        width = len(self.names)
        first = instances[0]
        if isinstance(first, dict):
            get = self._getter
            try:
                rows = [get(row) for row in instances if len(row) == width]
            except (KeyError, TypeError):
                return None
            if len(rows) != len(instances):
                return None
            if width == 1:
                rows = [[v] for v in rows]
        elif isinstance(first, list):
            rows = instances
        else:
            return None
        try:
            array = np.asarray(rows)
        except (ValueError, TypeError):  # ragged rows
            return None
        if array.ndim != 2 or array.shape[1] != width or array.dtype.kind not in "fiub":
            return None
        if array.dtype.kind == "f" and not (np.abs(array[~np.isnan(array)]) <= _F32_MAX).all():
            return None  # out of float32 range: named by the checked path
        if array.dtype.kind in "iu" and not (np.abs(array) <= _F32_MAX).all():
            return None
        columns = array.astype(np.float32)
        return {name: columns[:, j : j + 1] for j, name in enumerate(self.names)}

    def check_options(self, return_probabilities: bool) -> None:
        """Refuse request options the model cannot honour (probabilities of a regression)."""
        if return_probabilities and self.task != "classification":
            raise BadInput(
                "return_probabilities: a regression model has no probabilities",
                [problem("return_probabilities", "false for a regression model", "true")],
            )

    def respond(
        self,
        prediction: np.ndarray,
        probabilities: np.ndarray | None,
        return_probabilities: bool = False,
    ) -> dict[str, Any]:
        """The V1 response for one request's slice of the outputs (JSON-native types).

        Probabilities are a list of lists in ``classes`` order (as KServe's
        scikit-learn server returns ``predict_proba``); ``classes`` comes with them
        so the response explains itself. Non-finite floats become ``null``.
        """
        out: dict[str, Any] = {"predictions": _jsonable(prediction), "model_version": self.version}
        if return_probabilities and probabilities is not None:
            out["probabilities"] = _jsonable(probabilities)
            out["classes"] = self.classes
        return out

    # -- graph runs ----------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """One graph run: (prediction [N], probabilities [N, K] or None)."""
        out = self.session.run(self._outputs, feeds)
        return out[0], (out[1] if len(out) > 1 else None)

    def run_many(
        self, batch: list[dict[str, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Several requests' feeds in one graph run, split back per request.

        Every op in the graph works row by row, so a row's outputs do not depend on
        the other rows in the batch.
        """
        if len(batch) == 1:
            return [self.run(batch[0])]
        joined = {name: np.concatenate([f[name] for f in batch]) for name in self.names}
        prediction, probabilities = self.run(joined)
        results, start = [], 0
        for feeds in batch:
            stop = start + len(feeds[self.names[0]])
            results.append(
                (
                    prediction[start:stop],
                    None if probabilities is None else probabilities[start:stop],
                )
            )
            start = stop
        return results

    def predict(self, instances: Any, return_probabilities: bool = False) -> dict[str, Any]:
        """Validate, run and answer one V1 request: ``{"predictions", "model_version"}``
        plus ``"probabilities"`` and ``"classes"`` when asked (classification only)."""
        self.check_options(return_probabilities)
        prediction, probabilities = self.run(self.feeds(instances))
        return self.respond(prediction, probabilities, return_probabilities)

    def metadata(self) -> dict[str, Any]:
        """``GET /v1/models/{name}``: name, version, readiness, the feature schema and outputs."""
        outputs = [{"name": "predictions", "dtype": self.prediction_dtype, "shape": [-1]}]
        if self.task == "classification":
            outputs.append(
                {
                    "name": "probabilities",
                    "dtype": "float32",
                    "shape": [-1, len(self.classes or [])],
                }
            )
        return {
            "name": self.name,
            "version": self.version,
            "ready": True,
            "task": self.task,
            "inputs": [
                {"name": f["name"], "dtype": f["dtype"], "categories": f.get("categories")}
                for f in self.features
            ],
            "outputs": outputs,
            "classes": self.classes,
        }


def _jsonable(array: np.ndarray) -> list[Any]:
    """ints, floats and strings only; NaN/inf (which JSON cannot carry) become None."""
    values = array.tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        values = _plain(values)
    elif array.dtype.kind == "O":
        values = _plain(values)
    return values


def _plain(values: list[Any]) -> list[Any]:
    out = []
    for v in values:
        if isinstance(v, list):
            out.append(_plain(v))
        elif isinstance(v, bytes):
            out.append(v.decode())
        elif isinstance(v, np.generic):
            out.append(_plain([v.item()])[0])
        elif isinstance(v, float) and not math.isfinite(v):
            out.append(None)
        else:
            out.append(v)
    return out
