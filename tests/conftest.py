"""Fixtures every test folder shares."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cluster.local import free_ports

_handed_out: set[int] = set()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no other test got.

    From cluster.local's range, outside the kernel's ephemeral ports: a port the
    kernel handed out can be taken by an outgoing connection before the server
    binds it (that failed a Ray dashboard start in CI).
    """
    (port,) = free_ports(1, exclude=_handed_out)
    _handed_out.add(port)
    return port


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    return _free_port


def _register_without_search(spec, state, production: bool = False):
    """What a search's winner goes through (export, parity, gate, drift reference,
    register) for a logistic regression fitted here, without Ray: its checkpoint as Tune
    leaves it. Returns the Outcome; ``production`` also points that alias at it."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    from training import pipeline, registry
    from training.tune import SearchResult

    prep = pipeline.prepare(spec)
    estimator = LogisticRegression(max_iter=500).fit(prep.arrays["X_train"], prep.arrays["y_train"])
    checkpoint = state / "checkpoint"
    checkpoint.mkdir(parents=True)
    joblib.dump(estimator, checkpoint / "estimator.joblib")
    result = SearchResult(
        best_config={"family": 0},
        best_metrics={spec.metric: 0.5},
        best_checkpoint=str(checkpoint),
        trial_id="t0",
        trials=1,
        errored=0,
        wall_s=0.0,
        experiment_path=str(state),
        trial_nodes=set(),
    )
    uri = registry.tracking_uri(state)
    outcome = pipeline.register_winner(spec, prep, result, uri)
    if production:
        registry.set_alias(uri, spec.name, registry.PRODUCTION, outcome.version)
    return outcome


@pytest.fixture(scope="session")
def register_without_search():
    return _register_without_search
