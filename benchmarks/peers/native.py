"""The native model the peers serve: stock scikit-learn preprocessing, then the estimator or MLP.

Kept free of rayship imports (numpy, joblib, scikit-learn and torch only), so the
BentoML venv can load it. A model folder holds ``preprocess.joblib`` (a fitted
Pipeline of SimpleImputer, a clip to the rayship IQRClipper's bounds and the
scaler, fed a float array of the features in schema order), ``native.json``
(kind, classes, MLP layout) and ``model.joblib`` (scikit-learn) or ``mlp.pt``
(the MLP's state dict). Features are cast to float32 before the model, as rayship
trains on float32 features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def build_mlp(n_in: int, n_out: int, hidden_layers: list[int]):
    """The same ReLU stack as training.models.build_mlp (dropout 0), so state dicts load."""
    from torch import nn

    layers: list[Any] = []
    width = n_in
    for h in hidden_layers:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class NativeModel:
    """``predict(rows)`` → class labels, from the native preprocessing and model."""

    def __init__(self, pre, kind: str, model, classes: list[Any]):
        self.pre, self.kind, self.model = pre, kind, model
        self.classes = np.asarray(classes)

    @classmethod
    def load(cls, folder: str | Path) -> NativeModel:
        import joblib

        folder = Path(folder)
        meta = json.loads((folder / "native.json").read_text())
        pre = joblib.load(folder / "preprocess.joblib")
        if meta["kind"] == "sklearn":
            model = joblib.load(folder / "model.joblib")
        else:
            import torch

            model = build_mlp(meta["n_features"], len(meta["classes"]), meta["hidden_layers"])
            model.load_state_dict(torch.load(folder / "mlp.pt", weights_only=True))
            model.eval()
        return cls(pre, meta["kind"], model, meta["classes"])

    def features(self, rows) -> np.ndarray:
        X = np.asarray(rows, dtype=np.float64)
        return np.ascontiguousarray(self.pre.transform(X), dtype=np.float32)

    def predict(self, rows) -> np.ndarray:
        feats = self.features(rows)
        if self.kind == "sklearn":
            index = self.model.predict(feats)
        else:
            import torch

            with torch.no_grad():
                index = self.model(torch.from_numpy(feats)).argmax(dim=1).numpy()
        return self.classes[index]
