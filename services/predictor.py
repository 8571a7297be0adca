"""Predictor: one registered ONNX graph in onnxruntime, fed from KServe V1 ``instances``.

The graph contract is the one in ``training/export.py``: one input per feature,
named after the column's ONNX-safe name, shape ``[N, 1]``, float32 for numeric
columns (NaN = missing) and string for categorical ones ('' = missing); outputs
``prediction`` ``[N]`` and, for classification, ``probabilities`` ``[N, K]`` in the
schema's class order.

Clients name a feature by the training data's own column name (``"mean radius"``,
:attr:`OnnxPredictor.columns`: what metadata shows and errors name) or by its ONNX
input name (``"mean_radius"``, :attr:`OnnxPredictor.names`) as an alias; a row that
gives one feature under both names is refused. The graph is always fed by ONNX name.

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
        self.names: list[str] = [f["name"] for f in self.features]  # ONNX input names
        # The data's own column names; a schema.json written before they were recorded
        # has none, and then the ONNX names are the columns clients know.
        self.columns: list[str] = [f.get("column") or f["name"] for f in self.features]
        self.numeric = [f["dtype"] == "float" for f in self.features]
        self.all_numeric = all(self.numeric)
        # Every name a feature is known by (column name, ONNX name) → its position.
        self.position: dict[str, int] = {}
        owners: dict[str, set[int]] = {}
        for i, keys in enumerate(zip(self.columns, self.names, strict=True)):
            for key in keys:
                self.position[key] = i
                owners.setdefault(key, set()).add(i)
        self._ambiguous = sorted(k for k, i in owners.items() if len(i) > 1)
        # Row readers for the two keyings; a request's first row picks one by whether it
        # has the first column name that differs from its ONNX name (None: one keying).
        self._by_column = operator.itemgetter(*self.columns)
        self._by_name = operator.itemgetter(*self.names)
        pairs = zip(self.columns, self.names, strict=True)
        self._probe = next((c for c, n in pairs if c != n), None)
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
        problems = [f"name {k!r} belongs to two features" for k in self._ambiguous]
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
        get = self._getter_for(instances[0])
        for r, row in enumerate(instances):
            if len(problems) >= MAX_DETAILS:
                break
            if isinstance(row, dict):
                values = self._row_values(row, get, r, problems)
                if values is None:
                    continue
            elif isinstance(row, list):
                if len(row) != width:
                    problems.append(
                        problem(
                            f"instances[{r}]",
                            f"a list of {width} values in feature order {self.columns}",
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
                        "an object {column: value} or a list of values in feature order",
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
                    problems.append(problem(self.columns[j], expected, describe(value), r))
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

    def _getter_for(self, first: Any) -> operator.itemgetter:
        """The row reader for a request: by column names when its first row has a column
        name that is not also an ONNX name, else by ONNX names. Rows keyed otherwise (mixed
        names, or unlike the first row) miss it and are read key by key (:meth:`_row_values`)."""
        if self._probe is not None and isinstance(first, dict) and self._probe in first:
            return self._by_column
        return self._by_name

    def _row_values(
        self, row: dict[str, Any], get: operator.itemgetter, r: int, problems: list[dict]
    ) -> list[Any] | tuple[Any, ...] | None:
        """One object row's values in feature order, or None after adding its problems:
        unknown keys, a feature given under both its names, missing features."""
        width = len(self.names)
        if len(row) == width:
            try:
                values = get(row)
            except KeyError:
                pass
            else:
                return (values,) if width == 1 else values
        values: list[Any] = [None] * width
        given: list[str | None] = [None] * width
        found: list[dict[str, Any]] = []
        for key, value in row.items():
            j = self.position.get(key)
            if j is None:
                expected = f"one of the model's features {self.columns}"
                found.append(problem(key, expected, "unknown column", r))
            elif given[j] is not None:
                expected = (
                    f"one value for {self.columns[j]!r}, under that name or its ONNX name "
                    f"{self.names[j]!r}"
                )
                found.append(
                    problem(self.columns[j], expected, f"both {given[j]!r} and {key!r}", r)
                )
            else:
                given[j], values[j] = key, value
        found += [
            problem(self.columns[j], "a value (null for missing)", "no such key", r)
            for j in range(width)
            if given[j] is None
        ]
        problems += found
        return None if found else values

    def _numeric_feeds(self, instances: list[Any]) -> dict[str, np.ndarray] | None:
        """The feeds of an all-numeric model's rows in one numpy conversion, or None
        when the rows need the cell-by-cell check (nulls, strings, wrong widths, objects
        with other keys): that path then finds and names any problem. Lists in feature
        order go straight to numpy; objects are read in feature order first, by the
        reader of the first row's keying."""
        width = len(self.names)
        first = instances[0]
        if isinstance(first, dict):
            get = self._getter_for(first)
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
        """``GET /v1/models/{name}``: name, version, readiness, the feature schema and outputs.

        Each input is named by the data's own column name (what clients send), with
        the ONNX input name beside it (``onnx_name``, accepted as an alias)."""
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
                {
                    "name": column,
                    "onnx_name": f["name"],
                    "dtype": f["dtype"],
                    "categories": f.get("categories"),
                }
                for column, f in zip(self.columns, self.features, strict=True)
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
