"""``rayship retrain``: the loop's last step, cooldown → drift check → search → gate →
promote → hot swap.

1. **Cooldown.** No retrain of a model within ``monitor.cooldown_s`` of its last one
   (the MLflow registered-model tag ``rayship.last_retrain``, training.retrain), with or
   without ``--if-drifted``; ``--force`` skips the check. Every retrain that ran its
   search counts, whether its candidate won or lost: a drift that a retrain could not
   fix would otherwise start a search at every tick of the CronJob.
2. **Drift** (``--if-drifted``): ``GET {endpoint}/v1/models/{route}/drift``; nothing
   drifted → nothing to do. The endpoint is ``--url``, else the RayService's serve
   Service (``--kubernetes``), else the local cluster's endpoint; none answering is an
   error.
3. **Search** on the new data (training.retrain: append/replace, the holdout from the
   new rows) and **gate** against production scored on that same holdout
   (``gate.min_metric``, ``must_beat_production``, ``min_improvement``).
4. **Promote** a passing candidate (alias ``production``) and **hot-swap** the live
   endpoint: locally the endpoint's ``user_config`` ref moves (Serve reconfigures the
   running replicas: no restart, no failed request; a canary of the model ends, as with
   ``rayship models promote``); with ``--kubernetes`` the
   RayService's serveConfigV2 is patched the same way (``rayship models promote
   --kubernetes``). No endpoint: promoted only, and said so.

Exit status (the CLI): 0 when the loop did what it should — promoted, refused a
candidate that did not win (production and the endpoint stay; the gate's reasons are
printed), nothing drifted, or inside the cooldown — so a CronJob never fails or
crash-loops on a correct refusal; 1 with one line on an error (bad data, no endpoint to
ask, a failed search or swap).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from training import registry
from training.retrain import Mode, cooldown_left, last_retrain, record_retrain, retrain_data

Action = Literal["promoted", "refused", "not-drifted", "cooldown"]


class RetrainError(RuntimeError):
    """The retrain cannot go on (message says why): no endpoint answers the drift check,
    or it answers with an error."""


@dataclass
class Where:
    """Which endpoint to ask and swap: the local cluster's, or a RayService."""

    state_dir: Path
    kubernetes: bool = False
    namespace: str = "rayship"
    url: str | None = None  # the endpoint's base URL, when not the default one


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def serve_service_url(spec_name: str, namespace: str) -> str:
    """The in-cluster URL of a RayService's endpoint: KubeRay's ``<service>-serve-svc``."""
    from cluster import k8s

    service = k8s.resource_name(spec_name, "serve")
    return f"http://{service}-serve-svc.{namespace}.svc:{k8s.SERVE_PORT}"


def endpoint_url(spec_name: str, where: Where) -> str | None:
    """The base URL of the endpoint serving the model, or None when none is known."""
    if where.url:
        return where.url.rstrip("/")
    if where.kubernetes:
        return serve_service_url(spec_name, where.namespace)
    from cluster.live import local_endpoint
    from services.deploy import endpoint_url as url_of

    config = local_endpoint(where.state_dir)
    return url_of(config) if config is not None else None


def drift_report(url: str, route: str, timeout: float = 30, tries: int = 3) -> dict[str, Any]:
    """``GET {url}/v1/models/{route}/drift``; RetrainError when it cannot be had (a 503,
    the monitor not reachable for a moment, is asked again after its Retry-After)."""
    address = f"{url}/v1/models/{route}/drift"
    for attempt in range(tries):
        try:
            resp = httpx.get(address, timeout=timeout)
        except httpx.HTTPError as exc:
            raise RetrainError(
                f"--if-drifted: no endpoint answers at {address} ({exc or type(exc).__name__})"
            ) from None
        if resp.status_code != 503 or attempt == tries - 1:
            break
        time.sleep(min(10.0, float(resp.headers.get("retry-after") or 1)))
    if resp.status_code != 200:
        try:
            message = resp.json().get("error", resp.text)
        except ValueError:
            message = resp.text[:300]
        raise RetrainError(f"--if-drifted: HTTP {resp.status_code} from {address}: {message}")
    report = resp.json()
    if not isinstance(report.get("drifted"), list):
        raise RetrainError(f"--if-drifted: {address} gave no 'drifted' list: {resp.text[:300]}")
    return report


def retrain(
    spec: Any,
    data: Path,
    *,
    mode: Mode,
    where: Where,
    search: Callable[[Any, Any], Any],
    say: Callable[[str], None],
    if_drifted: bool = False,
    force: bool = False,
) -> Action:
    """Run the loop (module docstring) for ``spec`` on ``data``; returns what it did.

    ``search(spec, splits)`` runs the search and the gate and returns the pipeline's
    Outcome (the CLI's, with its progress bar); ``say`` prints a line."""
    uri = registry.tracking_uri(where.state_dir)
    name, route = spec.name, spec.route
    cooldown_s = float(spec.monitor.cooldown_s)
    if not force:
        left = cooldown_left(uri, name, cooldown_s)
        if left > 0:
            say(
                f"cooldown: {name} was last retrained at {_when(last_retrain(uri, name))}; "
                f"monitor.cooldown_s is {cooldown_s:g} s, so the next retrain is due after "
                f"{_when(time.time() + left)} (--force retrains now); nothing done"
            )
            return "cooldown"
    if if_drifted:
        url = endpoint_url(name, where)
        if url is None:
            raise RetrainError(
                f"--if-drifted: no endpoint serves {name} on the local cluster; "
                "give its address with --url (or --kubernetes for the RayService)"
            )
        report = drift_report(url, route)
        rows = report.get("window_rows")
        if not rows:
            say(
                f"no drift report yet: the endpoint at {url} has seen no rows of {name} "
                f"(version {report.get('version')}) since it started serving it; "
                "nothing to retrain"
            )
            return "not-drifted"
        if not report["drifted"]:
            say(
                f"no drift: no feature of {name} (version {report.get('version')}) drifted in "
                f"the last {rows} rows at {url}; nothing to retrain"
            )
            return "not-drifted"
        say(
            f"drifted in the last {rows} rows: {', '.join(map(str, report['drifted']))} "
            f"(score {report.get('score')}); retraining"
        )
    prepared = retrain_data(spec, data, mode, where.state_dir)
    say(
        f"retrain data ({mode}): {prepared.new_rows} new rows"
        + (f" + {prepared.old_rows} of {spec.data.source}" if prepared.old_rows else "")
        + f" → {prepared.path}; holdout {len(prepared.splits.X_test)} new rows"
    )
    outcome = search(prepared.spec, prepared.splits)
    record_retrain(uri, name)
    _say_production(uri, outcome, say)
    if not outcome.passed:
        kept = (
            f"production stays version {outcome.production_version} and the endpoint is unchanged"
            if outcome.production_version
            else "no version is in production"
        )
        say(f"not promoted: {'; '.join(outcome.reasons)}; {kept}")
        return "refused"
    registry.set_alias(uri, name, registry.PRODUCTION, outcome.version)
    say(f"promoted {name} version {outcome.version} to production")
    _swap(name, outcome.version, where, say)
    return "promoted"


def _say_production(uri: str, outcome: Any, say: Callable[[str], None]) -> None:
    """Production's score when registered and on the new holdout (what the gate used)."""
    if outcome.production_version is None:
        say(f"no production version of {outcome.name} yet: the gate's min_metric alone decides")
        return
    if outcome.production_holdout is None:
        return  # not comparable: the gate's reasons say why
    then = registry.resolve_version(uri, outcome.name, outcome.production_version).tags.get(
        "holdout_score"
    )
    was = f"{float(then):.4f} when registered, " if then else ""
    say(
        f"production version {outcome.production_version}: {outcome.metric} {was}"
        f"{outcome.production_holdout:.4f} on the new holdout; "
        f"candidate {outcome.holdout:.4f}"
    )


def _swap(name: str, version: str, where: Where, say: Callable[[str], None]) -> None:
    """Serve ``version`` on the live endpoint in place (RayService or local endpoint)."""
    if where.kubernetes:
        from cluster import k8s
        from cluster.k8s_apply import promote_rayservice

        service = k8s.resource_name(name, "serve")
        promote_rayservice(name, str(version), namespace=where.namespace, service=service)
        say(f"RayService {where.namespace}/{service}: serveConfigV2 now serves version {version}")
        return
    from cluster.live import update_live

    swapped = update_live(where.state_dir, name, ref=str(version), canary=None)
    if swapped is None:
        say(
            f"no local endpoint serves {name}: promoted only "
            f"(rayship serve {name} serves production)"
        )
        return
    for s in swapped:
        say(f"live at {s.url}/v1/models/{s.route}: version {s.version} (swapped in place)")
