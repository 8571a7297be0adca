"""The endpoint running on the local cluster: find it, and change a model's entry in place.

A change that touches only the models' ``user_config`` (the served ref, a canary) is
applied by Serve's ``reconfigure`` on the running replicas: no restart, no failed
request (services.deploy). ``rayship models promote``, ``abort-canary`` and ``retrain``
go through :func:`update_live`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEEP: Any = object()  # leave this part of the entry as it is


@dataclass(frozen=True)
class Swapped:
    """One route of the endpoint after a change: what it serves now."""

    url: str
    route: str
    version: str
    canary_version: str | None


def local_endpoint(state_dir: Path) -> dict[str, Any] | None:
    """The Serve config of the endpoint on the cluster recorded in ``state_dir`` (this
    process connects to it), or None when no cluster runs or no endpoint is deployed."""
    from cluster import local
    from services.deploy import deployed_config

    if local.status(state_dir) is None:
        return None
    local.connect(state_dir, log_to_driver=False)
    return deployed_config()


def update_live(
    state_dir: Path, name: str, ref: object = KEEP, canary: object = KEEP
) -> list[Swapped] | None:
    """Change ``name``'s entries on the running local endpoint in place (user_config
    only: ``ref`` the production ref, ``canary`` None or ``{"ref", "weight"}``) and wait
    until every route serves the versions they resolve to. None when no local endpoint
    serves ``name``; DeployError (the endpoint keeps its previous config) on failure."""
    from services import serve_config
    from services.deploy import deploy
    from training import registry

    config = local_endpoint(state_dir)
    if config is None:
        return None
    entries = serve_config.models_of(config)
    mine = [e for e in entries if e["name"] == name]
    if not mine:
        return None
    uri = serve_config.tracking_uri_of(config)
    expect = {}
    for entry in mine:
        if ref is not KEEP:
            entry["ref"] = ref
        if canary is not KEEP:
            entry["canary"] = canary
        production = str(registry.resolve_version(uri, name, entry["ref"]).version)
        canary_version = (
            str(registry.resolve_version(uri, name, entry["canary"]["ref"]).version)
            if entry["canary"]
            else None
        )
        expect[entry["route"]] = (production, canary_version)
    url = deploy(serve_config.with_models(config, entries), expect=expect)
    return [Swapped(url, route, prod, can) for route, (prod, can) in expect.items()]
