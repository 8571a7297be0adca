"""Preprocessing: impute, clip outliers, scale and one-hot encode, fitted on the train split.

The preprocessor is a scikit-learn ``ColumnTransformer`` so it converts to ONNX with
skl2onnx and ends up inside the served graph. Outlier clipping (median ± k·IQR)
has no scikit-learn transformer, so :class:`IQRClipper` is ours, with its own
small skl2onnx converter (a Max and a Min against per-column bounds).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, RobustScaler, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from training.data import FeatureSchema
from training.spec import PreprocessSpec

_F32_MAX = float(np.finfo(np.float32).max)
SCALERS = {"standard": StandardScaler, "minmax": MinMaxScaler, "robust": RobustScaler}


class IQRClipper(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Clip each column to ``median ± k·IQR`` of the data it was fitted on.

    A column whose IQR is zero (mostly one value, such as a border pixel) is left
    unclipped: clipping it would erase every value but the median.
    """

    def __init__(self, k: float = 4.0):
        self.k = k

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=np.float64, ensure_all_finite="allow-nan")
        q1, med, q3 = np.nanquantile(X, [0.25, 0.5, 0.75], axis=0)
        iqr = q3 - q1
        self.lower_ = np.where(iqr > 0, med - self.k * iqr, -_F32_MAX)
        self.upper_ = np.where(iqr > 0, med + self.k * iqr, _F32_MAX)
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, ensure_all_finite="allow-nan", reset=False)
        return np.clip(X, self.lower_, self.upper_)


def _clipper_shape(operator) -> None:
    from skl2onnx.common.data_types import FloatTensorType

    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = FloatTensorType([n, operator.raw_operator.n_features_in_])


def _clipper_convert(scope, operator, container) -> None:
    from onnx import TensorProto

    op = operator.raw_operator
    lo = scope.get_unique_variable_name("clip_lower")
    hi = scope.get_unique_variable_name("clip_upper")
    n = len(op.lower_)
    container.add_initializer(lo, TensorProto.FLOAT, [n], op.lower_.astype(np.float32).tolist())
    container.add_initializer(hi, TensorProto.FLOAT, [n], op.upper_.astype(np.float32).tolist())
    raised = scope.get_unique_variable_name("clip_raised")
    container.add_node(
        "Max",
        [operator.inputs[0].full_name, lo],
        raised,
        name=scope.get_unique_operator_name("Max"),
    )
    container.add_node(
        "Min",
        [raised, hi],
        operator.outputs[0].full_name,
        name=scope.get_unique_operator_name("Min"),
    )


def register_onnx_converters() -> None:
    """Teach skl2onnx to convert :class:`IQRClipper` (idempotent)."""
    from skl2onnx import update_registered_converter

    update_registered_converter(IQRClipper, "RayshipIQRClipper", _clipper_shape, _clipper_convert)


def build_preprocessor(spec: PreprocessSpec, schema: FeatureSchema) -> ColumnTransformer:
    """An unfitted ColumnTransformer for the schema's numeric and categorical columns."""
    numeric_steps = []
    if spec.impute != "none":
        numeric_steps.append(("impute", SimpleImputer(strategy=spec.impute)))
    if spec.clip_outliers is not None:
        numeric_steps.append(("clip", IQRClipper(k=spec.clip_outliers)))
    if spec.scale != "none":
        numeric_steps.append(("scale", SCALERS[spec.scale]()))
    transformers = []
    if schema.numeric:
        numeric = Pipeline(numeric_steps) if numeric_steps else "passthrough"
        transformers.append(("numeric", numeric, schema.numeric))
    if schema.categorical:
        # Categories come from the schema (the train split), so fitting adds nothing new.
        categories = [
            next(f.categories for f in schema.features if f.name == c) for c in schema.categorical
        ]
        onehot = OneHotEncoder(
            categories=categories, handle_unknown="ignore", sparse_output=False, dtype=np.float32
        )
        transformers.append(("categorical", onehot, schema.categorical))
    return ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)


class Preprocessor:
    """A fitted ColumnTransformer and its ONNX graph; features always come from the graph.

    Models are trained, validated and checked on the features the ONNX graph
    computes (float32), not scikit-learn's float64 ones: a tree threshold that sits
    exactly on a data value would otherwise send a row one way in training and the
    other way in serving. :meth:`check` bounds the graph against scikit-learn.
    """

    def __init__(self, columns: ColumnTransformer, schema: FeatureSchema):
        from training.export import preprocessor_graph

        self.columns = columns
        self.schema = schema
        self.graph, self.output = preprocessor_graph(columns, schema)
        self._session = None

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        """Model-ready float32 features of a typed frame, computed by the ONNX graph."""
        import onnxruntime as ort

        from training.export import onnx_feeds

        if self._session is None:
            self._session = ort.InferenceSession(
                self.graph.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        (out,) = self._session.run([self.output], onnx_feeds(X, self.schema))
        return np.ascontiguousarray(out, dtype=np.float32)

    def check(self, X: pd.DataFrame) -> float:
        """Largest difference between the graph's and scikit-learn's features on ``X``."""
        ref = self.columns.transform(X).astype(np.float64)
        diff = np.abs(self.transform(X) - ref) / (1.0 + np.abs(ref))
        return float(diff.max()) if diff.size else 0.0

    def __getstate__(self):
        return {**self.__dict__, "_session": None}


def fit_preprocessor(
    spec: PreprocessSpec, schema: FeatureSchema, X_train: pd.DataFrame
) -> Preprocessor:
    """Fit on the train split only; refuses missing numerics when imputation is off."""
    if spec.impute == "none" and schema.numeric and X_train[schema.numeric].isna().any().any():
        cols = X_train[schema.numeric].columns[X_train[schema.numeric].isna().any()].tolist()
        raise ValueError(f"preprocess.impute: is none, but column(s) {cols} have missing values")
    return Preprocessor(build_preprocessor(spec, schema).fit(X_train), schema)
