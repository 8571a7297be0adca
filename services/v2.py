"""Open Inference Protocol (KServe V2) for one ONNX model: metadata, infer request
parsing and the infer response, including the binary tensor data extension that
tritonclient's HTTP client uses by default.

The model's tensors are the ONNX graph's, as Triton would expose them, but named by the
training data's own column names: one input per feature (``FP32`` for numeric columns,
``BYTES`` for categorical ones, shape ``[-1, 1]``; a request may also send shape ``[N]``;
in JSON data a ``null`` number is a missing value, as NaN is in binary data, and a
``null`` string the missing category ``''``), outputs
``prediction`` and, for classification, ``probabilities`` ``[-1, K]`` in the
``classes`` order. An infer request may name an input by the graph's ONNX input name
instead (``mean_radius`` for ``mean radius``), as V1 rows may.

Written here rather than taken from KServe's ``kserve`` package: that package brings
its own server stack (its model server, FastAPI app and dependency pins), while all
this endpoint needs is the request/response mapping below, inside Serve's FastAPI
ingress.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from services.predictor import BadInput, OnnxPredictor, describe, json_object, problem

HEADER_LENGTH = "inference-header-content-length"
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
NUMERIC_DATATYPES = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_OUT_DATATYPES = {"int64": "INT64", "float32": "FP32", "string": "BYTES", "float": "FP32"}


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in NUMERIC_DATATYPES.items():
        if array.dtype == dtype:
            return name
    return "BYTES"


def metadata(predictor: OnnxPredictor, route: str, versions: list[str]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's tensors as the protocol describes them, the
    inputs named by the data's own column names."""
    inputs = [
        {
            "name": column,
            "datatype": "FP32" if numeric else "BYTES",
            "shape": [-1, 1],
        }
        for column, numeric in zip(predictor.columns, predictor.numeric, strict=True)
    ]
    outputs = [
        {
            "name": "prediction",
            "datatype": _OUT_DATATYPES.get(predictor.prediction_dtype, "BYTES"),
            "shape": [-1],
        }
    ]
    if predictor.task == "classification":
        outputs.append(
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [-1, len(predictor.classes or [])],
            }
        )
    return {
        "name": route,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
    }


class InferRequest:
    """A parsed ``infer`` request: its id, input tensors by name, the outputs asked for
    and whether each is wanted as binary data."""

    def __init__(
        self,
        request_id: str | None,
        tensors: dict[str, np.ndarray],
        outputs: list[str] | None,
        binary: dict[str, bool],
        binary_default: bool,
    ):
        self.id = request_id
        self.tensors = tensors
        self.outputs = outputs
        self.binary = binary
        self.binary_default = binary_default


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer body (JSON, or JSON + binary tensors when ``header_length`` is set)."""
    binary_part = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadInput(
                f"{HEADER_LENGTH}: expected an integer, got {header_length!r}",
                [problem(HEADER_LENGTH, "an integer byte count", repr(header_length)[:40])],
            ) from None
        if not 0 <= n <= len(body):
            raise BadInput(
                f"{HEADER_LENGTH}: {n} is outside the body's {len(body)} bytes",
                [problem(HEADER_LENGTH, f"0 to {len(body)}", str(n))],
            )
        body, binary_part = body[:n], body[n:]
    payload = json_object(
        body, 'a JSON object {"inputs": [{"name", "shape", "datatype", "data"}, ...]}'
    )
    unknown = [k for k in payload if k not in REQUEST_KEYS]
    if unknown:
        raise BadInput(
            f"request body: unknown key(s) {unknown}; allowed: {list(REQUEST_KEYS)}",
            [problem(k, f"one of {list(REQUEST_KEYS)}", "unknown key") for k in unknown],
        )
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput(
            "inputs: expected a non-empty list of tensors",
            [problem("inputs", "a non-empty list of tensors", describe(inputs))],
        )
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        name, array, offset = _tensor(i, spec, binary_part, offset)
        if name in tensors:
            raise BadInput(
                f"inputs[{i}].name: {name!r} given twice",
                [problem(f"inputs[{i}].name", "each input once", repr(name))],
            )
        tensors[name] = array
    if offset != len(binary_part):
        raise BadInput(
            f"binary data: {len(binary_part) - offset} byte(s) not claimed by any input",
            [problem("binary data", f"{offset} bytes", f"{len(binary_part)} bytes")],
        )
    params = payload.get("parameters") or {}
    binary_default = bool(isinstance(params, dict) and params.get("binary_data_output"))
    outputs, binary = None, {}
    if payload.get("outputs") is not None:
        if not isinstance(payload["outputs"], list):
            raise BadInput(
                "outputs: expected a list of {name}",
                [problem("outputs", "a list of {name}", describe(payload["outputs"]))],
            )
        outputs = []
        for j, out in enumerate(payload["outputs"]):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadInput(
                    f"outputs[{j}]: expected an object with a name",
                    [problem(f"outputs[{j}]", "an object {name}", describe(out))],
                )
            outputs.append(out["name"])
            out_params = out.get("parameters") or {}
            if not isinstance(out_params, dict):
                raise BadInput(
                    f"outputs[{j}].parameters: expected an object",
                    [problem(f"outputs[{j}].parameters", "an object", describe(out_params))],
                )
            binary[out["name"]] = bool(out_params.get("binary_data", binary_default))
    request_id = payload.get("id")
    return InferRequest(
        None if request_id is None else str(request_id), tensors, outputs, binary, binary_default
    )


def _tensor(i: int, spec: Any, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One input tensor as a numpy array (numeric, or object array of str for BYTES)."""
    where = f"inputs[{i}]"
    if not isinstance(spec, dict):
        raise BadInput(
            f"{where}: expected a tensor object",
            [problem(where, "an object {name, shape, datatype, data}", describe(spec))],
        )
    unknown = [k for k in spec if k not in INPUT_KEYS]
    if unknown:
        raise BadInput(
            f"{where}: unknown key(s) {unknown}; allowed: {list(INPUT_KEYS)}",
            [problem(f"{where}.{k}", f"one of {list(INPUT_KEYS)}", "unknown key") for k in unknown],
        )
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str):
        raise BadInput(
            f"{where}.name: expected a string",
            [problem(f"{where}.name", "a string", describe(name))],
        )
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadInput(
            f"{where}.shape: expected a list of non-negative integers, got {describe(shape)}",
            [problem(f"{where}.shape", "a list of non-negative integers", describe(shape))],
        )
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in NUMERIC_DATATYPES):
        allowed = ["BYTES", *NUMERIC_DATATYPES]
        raise BadInput(
            f"{where}.datatype: expected one of {allowed}, got {describe(datatype)}",
            [problem(f"{where}.datatype", f"one of {allowed}", describe(datatype))],
        )
    count = math.prod(shape)  # exact: numpy's product wraps around past int64
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not 0 <= offset + size <= len(binary)
        ):
            raise BadInput(
                f"{where}.parameters.binary_data_size: {size!r} does not fit the binary data",
                [
                    problem(
                        f"{where}.parameters.binary_data_size",
                        f"at most {len(binary) - offset} bytes",
                        repr(size),
                    )
                ],
            )
        chunk = binary[offset : offset + size]
        array = _from_binary(where, chunk, datatype, count)
        offset += size
    else:
        if "data" not in spec:
            raise BadInput(
                f"{where}.data: missing",
                [problem(f"{where}.data", "a list of values (or binary data)", "no such key")],
            )
        array = _from_json(where, spec["data"], datatype, count)
    try:
        shaped = array.reshape(shape)
    except ValueError as exc:  # over 64 dimensions, or a zero-size shape too big to hold
        raise BadInput(
            f"{where}.shape: {shape} is not a shape numpy can hold ({exc})",
            [problem(f"{where}.shape", "at most 64 dimensions of sizes within int64", str(exc))],
        ) from None
    return name, shaped, offset


def _from_binary(where: str, chunk: bytes, datatype: str, count: int) -> np.ndarray:
    if datatype == "BYTES":
        values, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                break
            (n,) = struct.unpack_from("<I", chunk, pos)
            values.append(chunk[pos + 4 : pos + 4 + n].decode("utf-8", errors="replace"))
            pos += 4 + n
        if pos != len(chunk) or len(values) != count:
            raise BadInput(
                f"{where}: binary BYTES data holds {len(values)} element(s), shape needs {count}",
                [problem(f"{where}.data", f"{count} elements", f"{len(values)}")],
            )
        return np.asarray(values, dtype=object)
    dtype = np.dtype(NUMERIC_DATATYPES[datatype])
    if len(chunk) != count * dtype.itemsize:
        raise BadInput(
            f"{where}: {len(chunk)} bytes of {datatype}, shape needs {count * dtype.itemsize}",
            [problem(f"{where}.data", f"{count * dtype.itemsize} bytes", f"{len(chunk)}")],
        )
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))


def _from_json(where: str, data: Any, datatype: str, count: int) -> np.ndarray:
    flat = _flatten(data)
    if flat is None or len(flat) != count:
        got = "nested non-list values" if flat is None else f"{len(flat)} values"
        raise BadInput(
            f"{where}.data: expected {count} values for its shape, got {got}",
            [problem(f"{where}.data", f"{count} values (the shape's product)", got)],
        )
    if datatype == "BYTES":  # null: the missing category, '' (as in V1 rows)
        flat = ["" if v is None else v for v in flat]
        bad = [v for v in flat if not isinstance(v, str)][:1]
        if bad:
            raise BadInput(
                f"{where}.data: BYTES values must be strings, got {describe(bad[0])}",
                [problem(f"{where}.data", "strings (null: missing)", describe(bad[0]))],
            )
        return np.asarray(flat, dtype=object)
    if datatype.startswith("FP"):  # null: a missing number (JSON has no NaN)
        flat = [math.nan if v is None else v for v in flat]
    want_bool = datatype == "BOOL"
    bad = [
        v for v in flat if not isinstance(v, bool | int | float) or isinstance(v, bool) != want_bool
    ][:1]  # a list: the bad value may be None itself (null in an INT tensor was a 500)
    if bad:
        bad = bad[0]
        raise BadInput(
            f"{where}.data: {datatype} values must be numbers, got {describe(bad)}",
            [problem(f"{where}.data", f"{datatype} numbers", describe(bad))],
        )
    try:
        return np.asarray(flat, dtype=NUMERIC_DATATYPES[datatype])
    except (OverflowError, ValueError) as exc:
        raise BadInput(
            f"{where}.data: a value does not fit {datatype} ({exc})",
            [problem(f"{where}.data", f"values within {datatype}", str(exc))],
        ) from None


def _flatten(data: Any) -> list[Any] | None:
    """Row-major values of a flat or nested list (the protocol allows both); None when
    ``data`` is not a list or one of its lists mixes lists and values. Iterative: a
    nesting as deep as the JSON parser allows (1,024 levels) must not reach Python's
    recursion limit (it did: a 500)."""
    if not isinstance(data, list):
        return None
    out: list[Any] = []
    stack = [data]
    while stack:
        items = stack.pop()
        lists = sum(isinstance(v, list) for v in items)
        if not lists:
            out += items
        elif lists == len(items):
            stack.extend(reversed(items))
        else:
            return None
    return out


def feeds(predictor: OnnxPredictor, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's feeds (keyed by ONNX input name) from V2 input tensors named by column
    or ONNX name: every feature once, one batch size, numeric features from numeric tensors
    (as float32; NaN = missing), categorical ones from BYTES. Errors name the columns."""
    columns = predictor.columns
    given: dict[int, str] = {}  # feature position → the tensor name it came under
    problems = []
    for n in tensors:
        j = predictor.position.get(n)
        if j is None:
            problems.append(problem(n, f"one of the model's inputs {columns}", "unknown input"))
        elif j in given:
            expected = (
                f"{columns[j]!r} once, under that name or its ONNX name {predictor.names[j]!r}"
            )
            problems.append(problem(columns[j], expected, f"both {given[j]!r} and {n!r}"))
        else:
            given[j] = n
    problems += [
        problem(c, "an input tensor", "missing") for j, c in enumerate(columns) if j not in given
    ]
    if problems:
        first = problems[0]
        raise BadInput(
            f"inputs: {first['field']}: expected {first['expected']}, got {first['got']}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            problems[:20],
        )
    sizes = {}
    out = {}
    for j, (name, numeric) in enumerate(zip(predictor.names, predictor.numeric, strict=True)):
        column, tensor = columns[j], tensors[given[j]]
        array = tensor
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise BadInput(
                f"{column}: expected shape [N] or [N, 1], got {list(tensor.shape)}",
                [problem(column, "shape [N] or [N, 1]", str(list(tensor.shape)))],
            )
        sizes[column] = len(array)
        if numeric:
            if array.dtype == object:
                raise BadInput(
                    f"{column}: expected a numeric tensor (FP32), got BYTES",
                    [problem(column, "datatype FP32 (or another numeric type)", "BYTES")],
                )
            with np.errstate(over="ignore"):
                values = array.astype(np.float32)
            if np.isinf(values).any():  # refused as V1 refuses it: no row means infinity
                got = "an infinity" if np.isinf(array).any() else "a value outside float32 range"
                raise BadInput(
                    f"{column}: expected finite numbers within float32 range, got {got}",
                    [problem(column, "finite numbers within float32 range (NaN: missing)", got)],
                )
            out[name] = values.reshape(-1, 1)
        else:
            if array.dtype != object:
                raise BadInput(
                    f"{column}: expected a BYTES tensor (categories), got a numeric one",
                    [problem(column, "datatype BYTES", datatype_of(array))],
                )
            out[name] = array.reshape(-1, 1)
    batch_sizes = sorted(set(sizes.values()))
    if len(batch_sizes) > 1:
        raise BadInput(
            f"inputs: every input needs the same batch size, got sizes {batch_sizes}",
            [problem("inputs", "one batch size N for every input", str(batch_sizes))],
        )
    if not next(iter(sizes.values())):
        raise BadInput("inputs: expected at least one row", [problem("inputs", "N >= 1 rows", "0")])
    return out


def response(
    request: InferRequest,
    predictor: OnnxPredictor,
    route: str,
    prediction: np.ndarray,
    probabilities: np.ndarray | None,
) -> tuple[bytes, dict[str, str]]:
    """The infer response body and headers (JSON, or JSON + binary tensors when asked)."""
    available = {"prediction": prediction}
    if probabilities is not None:
        available["probabilities"] = probabilities.astype(np.float32, copy=False)
    names = request.outputs if request.outputs is not None else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BadInput(
            f"outputs: unknown output(s) {unknown}; this model has {list(available)}",
            [problem("outputs", f"one of {list(available)}", repr(n)) for n in unknown],
        )
    outputs, blobs = [], []
    for name in names:
        array = available[name]
        if array.dtype.kind in "OUS":
            array = np.asarray([_text(v) for v in array.ravel()], dtype=object).reshape(array.shape)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if request.binary.get(name, request.binary_default):
            blob = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(array)
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": route,
        "model_version": predictor.version,
        "outputs": outputs,
    }
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_values(array: np.ndarray) -> list[Any]:
    flat = array.ravel()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return [v if np.isfinite(v) else None for v in flat.tolist()]
    return flat.tolist()


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype == object:
        parts = []
        for value in array.ravel():
            raw = value.encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
