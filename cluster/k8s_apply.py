"""The thin layer that talks to a Kubernetes API server (the ``kubernetes`` client):
server-side apply, following a RayJob and a RayService, promoting a model in place.

Everything that decides *what* to send or how to read a status is in
:mod:`cluster.k8s` (pure, tested offline); this module only makes the calls. It is not
exercised by the test suite (no API server on CI): see docs/kubernetes.md for what to
check on a real cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from cluster.k8s import (
    NAMESPACE,
    K8sError,
    State,
    apply_order,
    promoted_serve_config,
    rayjob_state,
    rayservice_state,
)

FIELD_MANAGER = "rayship"
RAY_GROUP, RAY_VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}


def _api(context: str | None = None):
    """An ApiClient from the kubeconfig (or the in-cluster service account)."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except Exception:
        try:
            config.load_incluster_config()
        except Exception as exc:
            raise K8sError(
                f"no Kubernetes cluster configured (kubeconfig or in-cluster): {exc}"
            ) from None
    return client.ApiClient()


def _error(exc: Exception, what: str) -> K8sError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or str(exc)
    body = getattr(exc, "body", "") or ""
    if status == 404 and "the server could not find the requested resource" in body:
        return K8sError(f"{what}: the API server does not know this kind (is KubeRay installed?)")
    if status == 403:
        return K8sError(f"{what}: forbidden (the rayship-deployer Role allows deploys): {body}")
    return K8sError(f"{what}: {status or ''} {reason}".strip())


def server_side_apply(objects: list[dict[str, Any]], *, context: str | None = None) -> list[str]:
    """Apply every object with server-side apply (field manager ``rayship``, conflicts
    forced: rayship owns the fields it writes); returns ``kind/name`` lines."""
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException

    dyn = dynamic.DynamicClient(_api(context))
    done = []
    for obj in apply_order(objects):
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            resource = dyn.resources.get(api_version=obj["apiVersion"], kind=kind)
            dyn.server_side_apply(
                resource,
                body=obj,
                name=name,
                namespace=obj["metadata"].get("namespace") if resource.namespaced else None,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except ApiException as exc:
            raise _error(exc, f"apply {kind} {name}") from exc
        except Exception as exc:  # ResourceNotFoundError: the kind is not served
            raise K8sError(f"apply {kind} {name}: {exc}") from exc
        done.append(f"{kind.lower()}/{name}")
    return done


def _custom(context: str | None = None):
    from kubernetes import client

    return client.CustomObjectsApi(_api(context))


def get_object(kind: str, name: str, namespace: str = NAMESPACE, context: str | None = None):
    """A RayJob/RayService/RayCluster as a dict, or None when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        return _custom(context).get_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, PLURALS[kind], name
        )
    except ApiException as exc:
        if exc.status == 404 and "could not find the requested resource" not in (exc.body or ""):
            return None
        raise _error(exc, f"get {kind} {name}") from exc


def delete_finished_rayjob(name: str, namespace: str = NAMESPACE, context: str | None = None):
    """A RayJob runs once: delete a finished one of this name so applying it runs the
    search again. Returns True when one was deleted (and is gone)."""
    from kubernetes.client.exceptions import ApiException

    job = get_object("RayJob", name, namespace, context)
    if job is None or not rayjob_state(job).done:
        return False
    api = _custom(context)
    try:
        api.delete_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, "rayjobs", name, propagation_policy="Foreground"
        )
    except ApiException as exc:
        raise _error(exc, f"delete RayJob {name}") from exc
    for _ in range(120):
        if get_object("RayJob", name, namespace, context) is None:
            return True
        time.sleep(1)
    raise K8sError(f"RayJob {name} is still being deleted after 2 minutes")


def deploy(objects: list[dict[str, Any]], *, context: str | None = None) -> list[str]:
    """Apply rendered manifests; a finished RayJob of the same name is replaced."""
    for obj in objects:
        if obj["kind"] == "RayJob":
            ns = obj["metadata"].get("namespace", NAMESPACE)
            delete_finished_rayjob(obj["metadata"]["name"], ns, context)
    return server_side_apply(objects, context=context)


def watch_states(
    kind: str,
    name: str,
    *,
    namespace: str = NAMESPACE,
    context: str | None = None,
    timeout_s: float = 3600,
) -> Iterator[State]:
    """Each new state of a RayJob or RayService (by a watch on that one object) until it
    is done or ``timeout_s`` passes."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    read = rayjob_state if kind == "RayJob" else rayservice_state
    first = get_object(kind, name, namespace, context)
    if first is None:
        raise K8sError(f"no {kind} {name} in namespace {namespace}")
    last = read(first)
    yield last
    if last.done:
        return
    deadline = time.monotonic() + timeout_s
    api = _custom(context)
    while time.monotonic() < deadline:
        w = watch.Watch()
        try:
            for event in w.stream(
                api.list_namespaced_custom_object,
                RAY_GROUP,
                RAY_VERSION,
                namespace,
                PLURALS[kind],
                field_selector=f"metadata.name={name}",
                timeout_seconds=min(300, max(1, int(deadline - time.monotonic()))),
            ):
                if event["type"] == "DELETED":
                    raise K8sError(f"{kind} {name} was deleted")
                state = read(event["object"])
                if state != last:
                    last = state
                    yield state
                if state.done:
                    w.stop()
                    return
        except ApiException as exc:
            if exc.status == 410:  # the watch's resourceVersion expired: start another
                continue
            raise _error(exc, f"watch {kind} {name}") from exc
    raise K8sError(f"{kind} {name}: still {last.phase} after {timeout_s:.0f} s")


def follow_job_log(
    name: str,
    emit: Callable[[str], None],
    *,
    namespace: str = NAMESPACE,
    context: str | None = None,
    wait_s: float = 900,
) -> bool:
    """Stream the log of the RayJob's submitter pod (KubeRay's Job ``name``, label
    ``job-name``): ``ray job submit`` tails the Ray job's own log there. Returns False
    when no submitter pod appeared within ``wait_s``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(_api(context))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        if running:
            pod = sorted(running, key=lambda p: p.metadata.creation_timestamp)[-1]
            try:
                stream = core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, follow=True, _preload_content=False
                )
                for line in stream.stream():
                    for text in line.decode("utf-8", "replace").splitlines():
                        emit(text)
            except ApiException as exc:
                raise _error(exc, f"log of pod {pod.metadata.name}") from exc
            return True
        time.sleep(2)
    return False


def promote_rayservice(name: str, version: str, *, namespace: str, service: str) -> None:
    """Serve ``version`` of model ``name`` on RayService ``service``: patch its
    serveConfigV2 so that only that model's user_config ``ref`` changes. KubeRay sends
    the new config to the running cluster (Serve reconfigures the replicas in place: no
    new cluster, no restart). The patch carries the resourceVersion read, so a
    concurrent change makes it fail instead of being overwritten."""
    from kubernetes.client.exceptions import ApiException

    current = get_object("RayService", service, namespace)
    if current is None:
        raise K8sError(f"no RayService {service} in namespace {namespace}")
    text = current["spec"].get("serveConfigV2") or ""
    updated = promoted_serve_config(text, name, version)
    if updated == text:
        return
    patch = {
        "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
        "spec": {"serveConfigV2": updated},
    }
    try:
        _custom().patch_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, "rayservices", service, patch
        )
    except ApiException as exc:
        if exc.status == 409:
            raise K8sError(f"RayService {service} changed meanwhile; promote again") from exc
        raise _error(exc, f"patch RayService {service}") from exc
