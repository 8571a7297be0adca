"""Offline checks of rendered Kubernetes objects: schemas and policy.

- Built-in kinds: the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``
  (strict: unknown fields are errors) at :data:`KUBERNETES_VERSION`, the version of the
  kind node image in ``cluster/kind.yaml``.
- ``ray.io/v1`` and ``monitoring.coreos.com/v1`` kinds: the CRDs' ``openAPIV3Schema``
  (copies in ``crds/``), made strict: every object schema that lists ``properties``
  and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
  refuses other keys, as the API server's structural-schema pruning would drop them.
- Policy (:func:`policy_violations`): every container has CPU and memory requests and
  limits, runs as non-root with privilege escalation off, all capabilities dropped and
  the RuntimeDefault seccomp profile, and a pinned image (no ``latest``, no missing
  tag); long-running containers have liveness and readiness probes; every workload's
  pods are selected by a NetworkPolicy besides the namespace's default deny.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.34.0"
CRDS = Path(__file__).resolve().parent / "crds"
CRD_GROUPS = ("ray.io", "monitoring.coreos.com")
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", *RAY_KINDS)
DNS_1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# Custom resources' metadata: the CRD schemas say only "object"; check what matters.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": DNS_1123},
        "namespace": {"type": "string", "pattern": DNS_1123},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which objects with listed properties refuse
    unlisted keys (unless the schema keeps unknown fields or types the extra keys)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) → a validator of the whole object."""
    validators = {}
    for path in sorted(CRDS.glob("*.v1.json")):
        doc = json.loads(path.read_text())
        schema = strict(copy.deepcopy(doc["openAPIV3Schema"]))
        schema["properties"]["metadata"] = OBJECT_META
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
        api_version = f"{doc['group']}/{doc['version']}"
        validators[(api_version, doc["kind"])] = jsonschema.Draft7Validator(schema)
    return validators


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Everything the schema of ``obj``'s kind refuses in it (empty: valid)."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    where = f"{kind} {obj.get('metadata', {}).get('name')}"
    if api_version.split("/")[0] in CRD_GROUPS:
        validator = crd_validators().get((api_version, kind))
        if validator is None:
            return [f"{where}: no CRD schema for {api_version} {kind}"]
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path)) if hasattr(exc, "path") else ""
        return [f"{where}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc}"]
    return []


# --------------------------------------------------------------------------- policy


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(where, pod template, long-running) of every pod a workload object creates."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    name = f"{kind} {obj.get('metadata', {}).get('name')}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        yield name, spec.get("template", {}), True
    elif kind == "Job":
        yield name, spec.get("template", {}), False
    elif kind == "CronJob":
        yield name, (spec.get("jobTemplate") or {}).get("spec", {}).get("template", {}), False
    elif kind in RAY_KINDS:
        cluster = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec") or {},
            "RayService": spec.get("rayClusterConfig") or {},
        }[kind]
        if cluster:
            yield f"{name} head", cluster.get("headGroupSpec", {}).get("template", {}), True
            for group in cluster.get("workerGroupSpecs") or []:
                yield f"{name} group {group.get('groupName')}", group.get("template", {}), True
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            yield f"{name} submitter", spec["submitterPodTemplate"], False


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def container_violations(
    where: str, container: dict[str, Any], pod: dict[str, Any], long_running: bool
) -> list[str]:
    """What ``container`` (in ``pod``, a PodSpec) breaks of the container policy."""
    at = f"{where} container {container.get('name')}"
    found = []
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(part) or {}):
                found.append(f"{at}: no {resource} in resources.{part}")
    sc = container.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}

    def setting(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    if setting("runAsNonRoot") is not True:
        found.append(f"{at}: runAsNonRoot is not true")
    if setting("runAsUser") == 0:
        found.append(f"{at}: runAsUser 0")
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append(f"{at}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        found.append(f"{at}: privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        found.append(f"{at}: capabilities.drop lacks ALL")
    if (setting("seccompProfile") or {}).get("type") != "RuntimeDefault":
        found.append(f"{at}: seccompProfile is not RuntimeDefault")
    image = container.get("image")
    if image is not None and not _image_pinned(image):
        found.append(f"{at}: image {image!r} is not pinned (tag latest or none)")
    if image is None:
        found.append(f"{at}: no image")
    if long_running:
        for probe in ("livenessProbe", "readinessProbe"):
            if not container.get(probe):
                found.append(f"{at}: no {probe}")
    return found


def policy_violations(objects: list[dict[str, Any]]) -> list[str]:
    """Every breach of the container and network policy in ``objects`` (empty: none)."""
    found: list[str] = []
    for obj in objects:
        for where, template, long_running in pod_templates(obj):
            pod = template.get("spec") or {}
            for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                found += container_violations(where, c, pod, long_running)
            if not pod.get("containers"):
                found.append(f"{where}: no containers")
        cluster = (obj.get("spec") or {}).get(
            {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(obj["kind"], "")
        )
        if obj.get("kind") == "RayCluster":
            cluster = obj.get("spec")
        if cluster and cluster.get("enableInTreeAutoscaling"):
            # KubeRay builds the autoscaler sidecar from autoscalerOptions.
            options = dict(cluster.get("autoscalerOptions") or {}, name="autoscaler")
            options.setdefault("image", "rayship:pinned-by-kuberay")
            found += container_violations(
                f"{obj['kind']} {obj['metadata']['name']} autoscalerOptions", options, {}, False
            )
    found += network_violations(objects)
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels``."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace(obj: dict[str, Any]) -> str:
    return obj.get("metadata", {}).get("namespace", "default")


def network_violations(objects: list[dict[str, Any]]) -> list[str]:
    """Each namespace with workloads has a default-deny policy (all pods, Ingress and
    Egress, no rules), and each workload's pods are selected by a non-empty selector."""
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    found = []
    namespaces = {_namespace(o) for o in objects if o.get("kind") in WORKLOAD_KINDS}
    for ns in sorted(namespaces):
        deny = [
            p
            for p in policies
            if _namespace(p) == ns
            and p["spec"].get("podSelector") == {}
            and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        if not deny:
            found.append(f"namespace {ns}: no default-deny NetworkPolicy")
    for obj in objects:
        for where, template, _ in pod_templates(obj):
            labels = (template.get("metadata") or {}).get("labels") or {}
            selected = [
                p["metadata"]["name"]
                for p in policies
                if _namespace(p) == _namespace(obj)
                and p["spec"].get("podSelector")
                and selects(p["spec"]["podSelector"], labels)
            ]
            if not selected:
                found.append(f"{where}: no NetworkPolicy selects its pods (labels {labels})")
    return found


def names_ok(objects: list[dict[str, Any]]) -> list[str]:
    """Names that are not DNS-1123 subdomains."""
    return [
        f"{o['kind']} {o['metadata']['name']}"
        for o in objects
        if not re.match(DNS_1123, o["metadata"]["name"])
    ]


# --------------------------------------------------------------------------- reachability


def _ports_match(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return True
        low = p["port"]
        if isinstance(low, int) and low <= port <= p.get("endPort", low):
            return True
    return False


def _peer_matches(peer: dict[str, Any], ns: str, labels: dict[str, str] | None) -> bool:
    """Whether a policy peer (in namespace ``ns``) covers a pod of ``ns`` with ``labels``
    (``labels`` None: an address outside the cluster, which only ipBlock peers cover)."""
    if labels is None:
        return "ipBlock" in peer
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer and not selects(
        peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}
    ):
        return False
    return selects(peer.get("podSelector") or {}, labels)


def _direction_allows(
    policies: list[dict[str, Any]],
    ns: str,
    pod: dict[str, str],
    kind: str,
    peer: dict[str, str] | None,
    port: int,
) -> bool:
    """Whether the policies selecting ``pod`` let it send (``kind`` Egress) to, or receive
    (Ingress) from, ``peer`` on TCP ``port``: allowed when no policy of that type selects
    it, or when a rule of one that does covers the peer and the port."""
    field, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    applying = [
        p
        for p in policies
        if _namespace(p) == ns
        and kind in (p["spec"].get("policyTypes") or [])
        and selects(p["spec"].get("podSelector") or {}, pod)
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get(field) or []:
            peers = rule.get(peers_key)
            covered = not peers or any(_peer_matches(x, ns, peer) for x in peers)
            if covered and _ports_match(rule, port):
                return True
    return False


def reachable(
    objects: list[dict[str, Any]],
    ns: str,
    source: dict[str, str],
    target: dict[str, str] | None,
    port: int,
) -> bool:
    """Whether the NetworkPolicies in ``objects`` let a pod of namespace ``ns`` labelled
    ``source`` open a TCP connection to ``port`` of a pod of ``ns`` labelled ``target``
    (None: an address outside the cluster, such as the API server or an external MLflow)."""
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    if not _direction_allows(policies, ns, source, "Egress", target, port):
        return False
    return target is None or _direction_allows(policies, ns, target, "Ingress", source, port)


def parse_cli(argv: list[str]):
    """Resolve and parse a `rayship ...` command line (a container's command) with the
    real app, as the CLI would; no command runs. Raises click's UsageError."""
    import typer

    from cluster.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("rayship", list(argv[1:]), resilient_parsing=False)
    args = [*ctx._protected_args, *ctx.args]
    name, command, rest = group.resolve_command(ctx, args)
    return command.make_context(name, rest, parent=ctx)


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize PATH`` renders (the kubectl of the dev extras)."""
    from cluster import k8s

    proc = subprocess.run(
        [k8s.kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]
