"""The MLflow pyfunc wrapper for the torch MLP (scikit-learn models use mlflow.sklearn).

The class is importable (``benchmarks.peers.mlflow_model``), so cloudpickle stores
it by reference: ``mlflow models serve`` runs with PYTHONPATH at the repository root.
"""

from __future__ import annotations

import mlflow.pyfunc

from benchmarks.peers.native import NativeModel


class NativePyfunc(mlflow.pyfunc.PythonModel):
    """Rows (a float array) → class labels, through :class:`NativeModel`."""

    def load_context(self, context) -> None:
        self.model = NativeModel.load(context.artifacts["native"])

    def predict(self, context, model_input, params=None):
        return self.model.predict(model_input)
