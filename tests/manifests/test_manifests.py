"""The manifests, offline: every overlay built with the real `kubectl kustomize`, every
object checked against its real schema (Kubernetes OpenAPI, KubeRay and Prometheus
Operator CRDs), the policy on every container and workload, serveConfigV2 equal to the
Serve config file the local CLI writes, and the RayJob's entrypoint a command line the
real `rayship` app parses."""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
from pathlib import Path

import click
import pytest
import yaml
from k8s_checks import CRDS, names_ok, parse_cli, policy_violations, schema_errors
from typer.testing import CliRunner

from cluster import k8s
from training.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
BASE_SPEC = ROOT / "manifests" / "base" / "spec.yaml"
SPECS = ("digits.yaml", "breast_cancer.yaml", "churn.yaml")


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    """Each overlay as kustomize builds it, and rendered for each example spec."""
    out = {}
    for overlay in k8s.OVERLAYS:
        objects = k8s.kustomize(overlay)
        out[overlay] = objects
        for name in SPECS:
            path = ROOT / "examples" / name
            spec = load_spec(path)
            out[f"{overlay}+{name}"], _ = k8s.render_for_spec(objects, spec, path.read_text())
    return out


CASES = [o for o in k8s.OVERLAYS] + [f"{o}+{s}" for o in k8s.OVERLAYS for s in SPECS]


@pytest.mark.parametrize("case", CASES)
def test_every_object_matches_its_schema(built, case):
    objects = built[case]
    kinds = {o["kind"] for o in objects}
    assert {"RayJob", "RayService", "PodMonitor", "NetworkPolicy", "Role"} <= kinds
    errors = [e for o in objects for e in schema_errors(o)]
    assert errors == []
    assert names_ok(objects) == []
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "rayship"
    }


@pytest.mark.parametrize("case", CASES)
def test_policy_holds(built, case):
    assert policy_violations(built[case]) == []


def _one(objects, kind, name=None):
    return k8s.find(objects, kind, name)


def test_schema_check_refuses_what_the_api_server_would(built):
    """Unknown fields and wrong types, in CRs (nested too) and built-in kinds."""
    objects = copy.deepcopy(built["local"])
    job = _one(objects, "RayJob")
    good = copy.deepcopy(job)
    assert schema_errors(good) == []

    bad = copy.deepcopy(good)
    bad["spec"]["shutdownAfterJobFinish"] = True  # a typo
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(bad))

    bad = copy.deepcopy(good)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resource"
    ] = {}
    assert any("resource" in e for e in schema_errors(bad))

    bad = copy.deepcopy(good)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in schema_errors(bad))

    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "Not_A_Name"
    assert schema_errors(bad)

    service = copy.deepcopy(_one(objects, "RayService"))
    service["spec"]["serveConfigV2"] = {"applications": []}  # must be a string
    assert any("serveConfigV2" in e for e in schema_errors(service))

    monitor = copy.deepcopy(_one(objects, "PodMonitor", "rayship-ray-head"))
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert any("prot" in e for e in schema_errors(monitor))

    deployment = copy.deepcopy(_one(objects, "Deployment", "rayship-minio"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert schema_errors(deployment)

    policy = copy.deepcopy(_one(objects, "NetworkPolicy", "default-deny"))
    policy["spec"]["policyTypes"] = "Ingress"
    assert schema_errors(policy)


VIOLATIONS = {
    "no limits": (
        lambda objs: _worker(objs)["resources"].pop("limits"),
        "no cpu in resources.limits",
    ),
    "no requests": (
        lambda objs: _one(objs, "Deployment", "rayship-mlflow")["spec"]["template"]["spec"][
            "containers"
        ][0]["resources"].pop("requests"),
        "no memory in resources.requests",
    ),
    "root allowed": (
        lambda objs: _worker(objs)["securityContext"].update(runAsNonRoot=False),
        "runAsNonRoot is not true",
    ),
    "escalation allowed": (
        lambda objs: _worker(objs)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation is not false",
    ),
    "capabilities kept": (
        lambda objs: _worker(objs)["securityContext"].pop("capabilities"),
        "capabilities.drop lacks ALL",
    ),
    "latest image": (
        lambda objs: _worker(objs).update(image="rayship:latest"),
        "is not pinned",
    ),
    "untagged image": (
        lambda objs: _one(objs, "Deployment", "rayship-minio")["spec"]["template"]["spec"][
            "containers"
        ][0].update(image="quay.io/minio/minio"),
        "is not pinned",
    ),
    "no probe": (
        lambda objs: _worker(objs).pop("readinessProbe"),
        "no readinessProbe",
    ),
    "autoscaler unconfined": (
        lambda objs: _one(objs, "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"].pop(
            "securityContext"
        ),
        "autoscalerOptions",
    ),
    "workload without policy": (
        lambda objs: objs.remove(_one(objs, "NetworkPolicy", "minio")),
        "Deployment rayship-minio: no NetworkPolicy selects its pods",
    ),
    "no default deny": (
        lambda objs: objs.remove(_one(objs, "NetworkPolicy", "default-deny")),
        "no default-deny NetworkPolicy",
    ),
}


def _worker(objects):
    job = _one(objects, "RayJob")
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breach", sorted(VIOLATIONS))
def test_policy_catches_a_violation(built, breach):
    """The policy check fails a deliberately bad copy of the local overlay."""
    objects = copy.deepcopy(built["local"])
    assert policy_violations(objects) == []
    mutate, expected = VIOLATIONS[breach]
    mutate(objects)
    found = policy_violations(objects)
    assert any(expected in v for v in found), found


# --------------------------------------------------------------------- native ingress


def _ray_containers(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("case", CASES)
def test_the_endpoint_serves_through_the_native_ingress(built, case):
    """Every Ray container of the RayService carries the switches `rayship up` sets
    locally; the head's serve port (the serve Service's target) is where HAProxy listens,
    its exporter is scraped and let through, and no policy opens its stats page."""
    from services.ingress import NATIVE

    objects = built[case]
    service = _one(objects, "RayService")
    for container in _ray_containers(service):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in NATIVE} == NATIVE, container["name"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert (
        ports["serve"] == yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    )
    assert ports["haproxy-metrics"] == 9101
    monitor = _one(objects, "PodMonitor", "rayship-ray-head")
    assert "haproxy-metrics" in [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    scrape = _one(objects, "NetworkPolicy", "prometheus-scrape")
    assert 9101 in [p["port"] for rule in scrape["spec"]["ingress"] for p in rule["ports"]]
    opened = [
        p.get("port")
        for policy in objects
        if policy["kind"] == "NetworkPolicy"
        for rule in policy["spec"].get("ingress", [])
        for p in rule.get("ports", [])
    ]
    assert 8404 not in opened


# --------------------------------------------------------------------- serveConfigV2


def _register_base_spec(uri: str) -> str:
    """A version of the base spec's model in an MLflow store, as `rayship tune` leaves
    it (the CLI reads the serve section from the spec stored with the version)."""
    from training import registry

    name = load_spec(BASE_SPEC).name
    onnx = b"not a graph: serve --write-config reads only the spec"
    run_id, source = registry.log_winner(
        uri,
        name,
        onnx_bytes=onnx,
        files={
            "schema.json": {},
            "metrics.json": {},
            "profile.json": {},
            "spec.yaml": BASE_SPEC.read_text(),
        },
        params={},
        metrics={},
        tags={},
    )
    version = registry.register_version(
        uri, name, source, run_id, tags={"onnx_sha256": hashlib.sha256(onnx).hexdigest()}
    )
    registry.set_alias(uri, name, registry.PRODUCTION, version)
    return name


def test_serve_config_v2_is_the_file_the_local_cli_writes(built, tmp_path, monkeypatch):
    """`rayship serve NAME --write-config FILE --host 0.0.0.0` and `rayship render` write
    the same bytes for the same tracking URI; the rendered RayService carries them."""
    from cluster.cli import app

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = _register_base_spec(uri)
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(
        app, ["serve", name, "--write-config", str(out), "--host", "0.0.0.0"]
    )
    assert result.exit_code == 0, result.output
    for overlay in k8s.OVERLAYS:
        objects = copy.deepcopy(built[overlay])
        _one(objects, "ConfigMap", k8s.ENV_CONFIGMAP)["data"]["MLFLOW_TRACKING_URI"] = uri
        rendered, _ = k8s.render_for_spec(objects, load_spec(BASE_SPEC), BASE_SPEC.read_text())
        assert _one(rendered, "RayService")["spec"]["serveConfigV2"] == out.read_text(), overlay


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_static_overlay_carries_the_generated_serve_config(built, overlay):
    """What `kubectl apply -k manifests/overlays/X` deploys is current: its serveConfigV2
    is the generator's output for the base spec and the overlay's MLflow URI."""
    objects = built[overlay]
    uri = k8s.overlay_env(objects)["MLFLOW_TRACKING_URI"]
    expected = k8s.serve_config_text(load_spec(BASE_SPEC), uri)
    actual = _one(objects, "RayService", k8s.BASE_RAYSERVICE)["spec"]["serveConfigV2"]
    assert actual == expected, (
        f"manifests for overlay {overlay} are stale: regenerate serveConfigV2 from "
        f"`rayship render --overlay {overlay} manifests/base/spec.yaml`"
    )
    assert yaml.safe_load(actual)["applications"][0]["args"]["tracking_uri"] == uri


# --------------------------------------------------------------------- RayJob entrypoint


def _usage_errors() -> tuple[type[Exception], ...]:
    """click's UsageError, and that of the click Typer vendors (typer._click) if it does."""
    errors: list[type[Exception]] = [click.UsageError]
    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        return tuple(errors)
    return (*errors, UsageError)


@pytest.mark.parametrize("case", CASES)
def test_rayjob_runs_rayship_tune_on_the_mounted_spec(built, case):
    objects = built[case]
    job = _one(objects, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "rayship"
    scripts = yaml.safe_load(json.dumps(_pyproject_scripts()))
    assert scripts["rayship"] == "cluster.cli:app"
    ctx = parse_cli(argv)
    assert ctx.info_name == "tune"
    spec_path = Path(ctx.params["spec_path"])

    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(
        m for m in head["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == spec_path.parent
    )
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = _one(objects, "ConfigMap", volume["configMap"]["name"])
    text = config_map["data"][spec_path.name]
    spec = parse_spec(yaml.safe_load(text))
    if "+" in case:
        assert text == (ROOT / "examples" / case.split("+")[1]).read_text()
        assert job["metadata"]["name"] == k8s.resource_name(spec.name, "tune")


def test_a_bad_entrypoint_does_not_parse():
    with pytest.raises(_usage_errors()):
        parse_cli(["rayship", "tune"])  # no SPEC
    with pytest.raises(_usage_errors()):
        parse_cli(["rayship", "tunes", "spec.yaml"])


def _pyproject_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


# --------------------------------------------------------------------- CRD copies


def test_crd_copies_match_shared():
    """The extracted schemas name their source's sha256; when ../shared is here, check
    them against it (a CRD update in shared/ must be re-extracted)."""
    copies = sorted(CRDS.glob("*.v1.json"))
    assert len(copies) == 6
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present in this checkout")
    for path in copies:
        doc = json.loads(path.read_text())
        source = SHARED / doc["source"]
        assert hashlib.sha256(source.read_bytes()).hexdigest() == doc["source_sha256"], path
