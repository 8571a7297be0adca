"""KServe V1 request parsing: ``{"instances": [...], "return_probabilities": bool}``.

The rows themselves are checked by :meth:`services.predictor.OnnxPredictor.feeds`,
which knows the model's features; this module checks the envelope.
"""

from __future__ import annotations

from typing import Any

from services.predictor import BadInput, json_object, problem

V1_KEYS = ("instances", "return_probabilities")


def parse_v1(body: bytes) -> tuple[Any, bool]:
    """The ``instances`` and ``return_probabilities`` of a V1 predict body, or BadInput."""
    payload = json_object(body, 'a JSON object {"instances": [...], "return_probabilities": false}')
    unknown = [k for k in payload if k not in V1_KEYS]
    if unknown:
        raise BadInput(
            f"request body: unknown key(s) {unknown}; allowed: {list(V1_KEYS)}",
            [problem(k, f"one of {list(V1_KEYS)}", "unknown key") for k in unknown],
        )
    if "instances" not in payload:
        raise BadInput(
            "instances: missing",
            [problem("instances", "a list of objects or lists", "no such key")],
        )
    want = payload.get("return_probabilities", False)
    if not isinstance(want, bool):
        raise BadInput(
            "return_probabilities: expected true or false",
            [problem("return_probabilities", "a boolean", repr(want)[:40])],
        )
    return payload["instances"], want
