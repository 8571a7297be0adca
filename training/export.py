"""Export: the fitted preprocessing and the winning model as one ONNX graph, checked.

Graph contract (what serving relies on):

- inputs: one per feature, named by its ONNX-safe name (``Feature.name``: "mean_radius"
  for the column "mean radius"), shape ``[N, 1]``; ``float`` for numeric columns
  (NaN = missing), ``string`` for categorical ones ('' = missing);
- outputs: ``prediction`` ``[N]`` (class labels, int64 or string, or float values for
  regression) and, for classification, ``probabilities`` ``[N, K]`` float32 in the
  schema's class order.

The preprocessing graph (skl2onnx) and the model graph (skl2onnx or
``torch.onnx.export``) are built separately and joined with ``onnx.compose``; a
Gather maps class indices back to labels. :func:`check_parity` compares the graph
with the native model on the holdout; a model that fails it is never registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper

from training.data import FeatureSchema

OPSET = 17
ML_OPSET = 3
IR_VERSION = 8
# Stated tolerance: probabilities and regression values within this (absolute, plus
# the same relative); labels identical except where the native top two classes are tied within it.
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The ONNX graph could not be built or does not match the native model."""


@dataclass
class Parity:
    rows: int
    label_mismatches: int
    max_abs_diff: float
    preprocess_diff: float = 0.0
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return (
            self.label_mismatches == 0
            and self.max_abs_diff <= self.tolerance
            and self.preprocess_diff <= self.tolerance
        )


def _input_types(schema: FeatureSchema):
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    return [
        (f.name, FloatTensorType([None, 1]) if f.dtype == "float" else StringTensorType([None, 1]))
        for f in schema.features
    ]


def _normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """One IR version and one opset per domain, so the two graphs can be merged.

    skl2onnx picks the lowest opset each graph needs; every op used here keeps its
    semantics up to opset 17 / ai.onnx.ml 3, so raising the import is safe.
    """
    model.ir_version = IR_VERSION
    domains = {o.domain for o in model.opset_import}
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", OPSET))
    if "ai.onnx.ml" in domains:
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    return model


def preprocessor_graph(pre, schema: FeatureSchema) -> onnx.ModelProto:
    """The ColumnTransformer as ONNX: raw feature inputs → ``features`` float [N, F]."""
    from skl2onnx import convert_sklearn

    from training.preprocess import register_onnx_converters

    register_onnx_converters()
    graph = convert_sklearn(
        pre, initial_types=_input_types(schema), target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET}
    )
    out = graph.graph.output[0].name
    return _normalise(
        onnx.compose.add_prefix(graph, "pre_", rename_inputs=False, rename_outputs=True)
    ), f"pre_{out}"


def sklearn_model_graph(est, n_features: int, task: str) -> tuple[onnx.ModelProto, str, str | None]:
    """A fitted estimator as ONNX over ``features``.

    Returns (graph, label/value output name, probability output name or None).
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType

    # Double precision inside: tree thresholds stay float64 as in scikit-learn, so a
    # float32 feature lands on the same side of every split as it does natively.
    options = {id(est): {"zipmap": False}} if task == "classification" else None
    graph = convert_sklearn(
        est,
        initial_types=[("features", DoubleTensorType([None, n_features]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options=options,
    )
    _exact_hgb_thresholds(graph, est)
    g = graph.graph
    (inp,) = g.input
    inp.name = "features_f64"
    for node in g.node:
        node.input[:] = ["features_f64" if i == "features" else i for i in node.input]
    g.node.insert(
        0, helper.make_node("Cast", ["features"], ["features_f64"], to=TensorProto.DOUBLE)
    )
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features]))
    outs = [o.name for o in g.output]
    for name in outs[1:] if task == "classification" else outs:
        # Cast value/probability outputs back to float32, the graph contract.
        for node in g.node:
            node.output[:] = [f"{name}_f64" if o == name else o for o in node.output]
        g.node.append(helper.make_node("Cast", [f"{name}_f64"], [name], to=TensorProto.FLOAT))
    for out in g.output:
        if out.name in outs[1:] or task != "classification":
            out.type.tensor_type.elem_type = TensorProto.FLOAT
    return _normalise(graph), outs[0], (outs[1] if task == "classification" else None)


def _floor_f32(value: float) -> float:
    """The largest float32 not above ``value``: ``x <= it`` iff ``x <= value`` for float32 x."""
    f = np.float32(value)
    if float(f) > float(value):  # compare in float64: NumPy 2 would compare in float32
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return float(f)


def _exact_hgb_thresholds(graph: onnx.ModelProto, est) -> None:
    """Make HistGradientBoosting split thresholds exact for float32 features.

    ONNX stores tree thresholds as float32. skl2onnx rounds HistGradientBoosting's
    float64 thresholds to the nearest float32 (unlike its other tree converters, which
    round down), so a feature equal to that rounded value goes right natively and left
    in the graph: measured on diabetes, a 8.0 difference in one prediction. Rewrite
    each threshold as the largest float32 not above it, which sends every float32
    value the way scikit-learn does.
    """
    predictors = getattr(est, "_predictors", None)
    if predictors is None:
        return
    per_iteration = len(predictors[0])
    thresholds = {}
    for it, trees in enumerate(predictors):
        for k, tree in enumerate(trees):
            tree_id = it * per_iteration + k
            for node_id, node in enumerate(tree.nodes):
                if not node["is_leaf"]:
                    thresholds[(tree_id, node_id)] = float(node["num_threshold"])
    for node in graph.graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        values = list(attrs["nodes_values"].floats)
        pairs = zip(attrs["nodes_treeids"].ints, attrs["nodes_nodeids"].ints, strict=True)
        for i, (tree_id, node_id) in enumerate(pairs):
            if (tree_id, node_id) in thresholds:
                values[i] = _floor_f32(thresholds[(tree_id, node_id)])
        del attrs["nodes_values"].floats[:]
        attrs["nodes_values"].floats.extend(values)


class _TorchHead:
    """Wraps the MLP so the exported graph returns (class index, probabilities) or a value."""

    @staticmethod
    def build(net, task: str, y_mean: float, y_std: float):
        import torch

        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                out = self.net(x)
                if task == "classification":
                    proba = torch.softmax(out, dim=1)
                    return torch.argmax(proba, dim=1), proba
                return out[:, 0] * y_std + y_mean

        return Head().eval()


def torch_model_graph(net, n_features: int, task: str, y_mean: float = 0.0, y_std: float = 1.0):
    """The MLP as ONNX over ``features`` (legacy TorchScript exporter: 0.2 s, no onnxscript)."""
    import io

    import torch

    head = _TorchHead.build(net, task, y_mean, y_std)
    outputs = ["label", "probabilities"] if task == "classification" else ["value"]
    buf = io.BytesIO()
    torch.onnx.export(
        head,
        (torch.zeros(2, n_features),),
        buf,
        input_names=["features"],
        output_names=outputs,
        dynamic_axes={"features": {0: "N"}, **{o: {0: "N"} for o in outputs}},
        opset_version=OPSET,
        dynamo=False,
    )
    graph = onnx.load_from_string(buf.getvalue())
    return _normalise(graph), outputs[0], (outputs[1] if task == "classification" else None)


def _class_tensor(classes: list[Any]) -> onnx.TensorProto:
    if all(isinstance(c, int | np.integer) for c in classes):
        return helper.make_tensor(
            "classes", TensorProto.INT64, [len(classes)], [int(c) for c in classes]
        )
    return helper.make_tensor(
        "classes", TensorProto.STRING, [len(classes)], [str(c).encode() for c in classes]
    )


def assemble(
    pre, model_graph: tuple[onnx.ModelProto, str, str | None], schema: FeatureSchema
) -> bytes:
    """Join preprocessing and model graphs; add the label lookup; return serialized ONNX."""
    pre_graph, pre_out = pre.graph, pre.output
    model, value_out, proba_out = model_graph
    model = _normalise(onnx.compose.add_prefix(model, "m_"))
    merged = onnx.compose.merge_models(pre_graph, model, io_map=[(pre_out, "m_features")])
    g = merged.graph
    outputs = []
    if schema.task == "classification":
        g.initializer.append(_class_tensor(schema.classes))
        g.node.append(
            helper.make_node("Reshape", [f"m_{value_out}", "flat_shape"], ["class_index"])
        )
        g.initializer.append(helper.make_tensor("flat_shape", TensorProto.INT64, [1], [-1]))
        g.node.append(
            helper.make_node("Gather", ["classes", "class_index"], ["prediction"], axis=0)
        )
        g.node.append(helper.make_node("Identity", [f"m_{proba_out}"], ["probabilities"]))
        label_type = g.initializer[-2].data_type
        outputs = [
            helper.make_tensor_value_info("prediction", label_type, ["N"]),
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["N", len(schema.classes)]
            ),
        ]
    else:
        g.initializer.append(helper.make_tensor("flat_shape", TensorProto.INT64, [1], [-1]))
        g.node.append(helper.make_node("Reshape", [f"m_{value_out}", "flat_shape"], ["prediction"]))
        outputs = [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N"])]
    del g.output[:]
    g.output.extend(outputs)
    merged.producer_name = "rayship"
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def onnx_feeds(X: pd.DataFrame, schema: FeatureSchema) -> dict[str, np.ndarray]:
    """Typed frame → the graph's per-column inputs."""
    feeds = {}
    for f in schema.features:
        col = X[f.name].to_numpy()
        feeds[f.name] = (
            col.astype(np.float32) if f.dtype == "float" else col.astype(str).astype(object)
        ).reshape(-1, 1)
    return feeds


def run_onnx(
    onnx_bytes: bytes, X: pd.DataFrame, schema: FeatureSchema
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions (and probabilities for classification) of a graph on a typed frame."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = sess.run(None, onnx_feeds(X, schema))
    return out[0], (out[1] if len(out) > 1 else None)


def check_parity(
    pre,
    onnx_bytes: bytes,
    X: pd.DataFrame,
    schema: FeatureSchema,
    native_pred: np.ndarray,
    native_proba: np.ndarray | None,
) -> Parity:
    """Compare the graph with the native model on the holdout (labels already mapped to classes),
    and the graph's preprocessing with scikit-learn's."""
    pred, proba = run_onnx(onnx_bytes, X, schema)
    pre_diff = pre.check(X)
    if schema.task == "classification":
        diff = float(np.max(np.abs(proba - native_proba))) if len(X) else 0.0
        top2 = np.sort(native_proba, axis=1)[:, -2:]
        tied = (top2[:, 1] - top2[:, 0]) <= TOLERANCE
        mismatches = int(
            np.sum((np.asarray(pred).astype(str) != np.asarray(native_pred).astype(str)) & ~tied)
        )
        return Parity(len(X), mismatches, diff, pre_diff, TOLERANCE)
    ref = np.asarray(native_pred, dtype=np.float64)
    rel = np.abs(pred - ref) / (1.0 + np.abs(ref))
    return Parity(len(X), 0, float(rel.max()) if len(X) else 0.0, pre_diff, TOLERANCE)


def native_outputs(
    pre, model, task: str, classes: list[Any] | None, X: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray | None]:
    """The native model's holdout outputs: class labels (and probabilities) or values.

    ``model`` is a fitted estimator or a callable from float32 features to
    (class index, probabilities) / values, as :func:`torch_predictor` builds.
    """
    feats = pre.transform(X)
    if hasattr(model, "predict"):
        if task == "classification":
            return np.asarray(classes)[model.predict(feats)], model.predict_proba(feats)
        return model.predict(feats), None
    return model(feats)


def torch_predictor(net, task: str, classes: list[Any] | None, y_mean: float, y_std: float):
    """A numpy-in, numpy-out callable over the trained MLP, for parity and holdout scoring."""
    import torch

    head = _TorchHead.build(net, task, y_mean, y_std)

    def predict(feats: np.ndarray):
        with torch.no_grad():
            out = head(torch.as_tensor(feats))
        if task == "classification":
            return np.asarray(classes)[out[0].numpy()], out[1].numpy()
        return out.numpy(), None

    return predict
