"""Model families: a torch MLP and scikit-learn estimators named by import path.

Every family trains on the preprocessed float32 features; classification targets
are class indices (0..K-1, in the schema's class order), regression targets floats.
"""

from __future__ import annotations

from typing import Any

from training.spec import resolve_estimator

TORCH_DEFAULTS: dict[str, Any] = {
    "hidden_layers": [64],
    "lr": 1e-3,
    "dropout": 0.0,
    "batch_size": 64,
    "epochs": 10,
    "weight_decay": 0.0,
}


def build_mlp(n_in: int, n_out: int, hidden_layers: list[int], dropout: float):
    """A ReLU MLP; ``n_out`` logits for classification, 1 output for regression."""
    from torch import nn

    layers: list[nn.Module] = []
    width = n_in
    for h in hidden_layers:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(float(dropout)))
        width = int(h)
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def make_estimator(path: str, params: dict[str, Any], seed: int):
    """Instantiate a scikit-learn estimator with the trial's params and the spec's seed."""
    est = resolve_estimator(path)()
    if "random_state" in est.get_params():
        params = {"random_state": seed, **params}
    return est.set_params(**params)
