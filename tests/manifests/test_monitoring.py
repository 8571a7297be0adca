"""manifests/monitoring, offline: built with the real `kubectl kustomize`, every object
checked against its schema (Kubernetes OpenAPI, the Prometheus Operator's PrometheusRule
CRD) and the container and network policy together with each overlay it is applied on;
the dashboard a Grafana dashboard; every PromQL expression parsed by a real PromQL parser
and reading only metrics rayship's endpoint exports; the CronJob's command a
`rayship retrain` the real CLI parses, on the spec and the RayService `rayship deploy`
creates, under a ServiceAccount whose Role allows the hot swap."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml
from k8s_checks import (
    kustomize,
    names_ok,
    parse_cli,
    policy_violations,
    reachable,
    schema_errors,
)
from monitoring_queries import (
    DRIFT_GAUGES,
    EXPORTED,
    MONITORING,
    TARGET_LABELS,
    dashboard,
    dashboard_queries,
    grouping_labels,
    panels,
    parse,
    rule_queries,
    rules,
    selectors,
)

from cluster import k8s
from training.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
BASE_SPEC = ROOT / "manifests" / "base" / "spec.yaml"
NS = k8s.NAMESPACE
RETRAIN = {"app.kubernetes.io/name": "rayship-retrain", "app.kubernetes.io/component": "retrain"}


@pytest.fixture(scope="module")
def monitoring() -> list[dict]:
    return kustomize(MONITORING)


@pytest.fixture(scope="module")
def deployed() -> dict[str, list[dict]]:
    """Per overlay: what `rayship deploy manifests/base/spec.yaml` applies, plus
    manifests/monitoring applied after it."""
    spec = load_spec(BASE_SPEC)
    out = {}
    for overlay in k8s.OVERLAYS:
        rendered, _ = k8s.render_for_spec(k8s.kustomize(overlay), spec, BASE_SPEC.read_text())
        out[overlay] = rendered + kustomize(MONITORING)
    return out


def _cronjob(objects: list[dict]) -> dict:
    return k8s.find(objects, "CronJob", "rayship-retrain")


def _pod(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]


# --------------------------------------------------------------------- objects


def test_every_object_matches_its_schema(monitoring):
    kinds = sorted(o["kind"] for o in monitoring)
    assert kinds == ["ConfigMap", "CronJob", "NetworkPolicy", "NetworkPolicy", "PrometheusRule"]
    assert [e for o in monitoring for e in schema_errors(o)] == []
    assert names_ok(monitoring) == []
    assert {o["metadata"]["namespace"] for o in monitoring} == {NS}


def test_schema_check_refuses_a_bad_rule_and_a_bad_cronjob(monitoring):
    rule = copy.deepcopy(k8s.find(monitoring, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["fore"] = "15m"
    assert any("fore" in e for e in schema_errors(rule))
    rule = copy.deepcopy(k8s.find(monitoring, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "a while"
    assert schema_errors(rule)
    cron = copy.deepcopy(_cronjob(monitoring))
    cron["spec"]["concurrency"] = "Forbid"
    assert schema_errors(cron)


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_policy_holds_with_each_overlay(deployed, overlay):
    """Monitoring applied on top of an overlay: the CronJob's containers (its init
    container too) meet the container policy and its pods are selected by a policy."""
    objects = deployed[overlay]
    assert policy_violations(objects) == []
    broken = copy.deepcopy(objects)
    broken.remove(k8s.find(broken, "NetworkPolicy", "retrain"))
    assert any("CronJob rayship-retrain" in v for v in policy_violations(broken))
    broken = copy.deepcopy(objects)
    _pod(_cronjob(broken))["spec"]["initContainers"][0]["securityContext"].pop("capabilities")
    assert any("fetch-data" in v for v in policy_violations(broken))


def _head_labels(objects: list[dict], kind: str) -> dict[str, str]:
    obj = k8s.find(objects, kind)
    cluster = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec")
    return cluster["headGroupSpec"]["template"]["metadata"]["labels"]


def _pod_labels(objects: list[dict], name: str) -> dict[str, str]:
    return k8s.find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_retrain_pods_reach_the_endpoint_mlflow_and_the_api_server(deployed, overlay):
    """Under the namespace's default deny: the endpoint's ingress (drift report), the API
    server (hot swap), MLflow and S3 (in-cluster on local, HTTPS on prod); and nothing
    else of the namespace (not the Ray cluster's GCS, not the search's head)."""
    objects = deployed[overlay]
    source = _pod(_cronjob(objects))["metadata"]["labels"]
    serve_head = _head_labels(objects, "RayService")
    assert reachable(objects, NS, source, serve_head, k8s.SERVE_PORT)
    assert reachable(objects, NS, source, None, 443)
    if overlay == "local":
        assert reachable(objects, NS, source, _pod_labels(objects, "rayship-mlflow"), 5000)
        assert reachable(objects, NS, source, _pod_labels(objects, "rayship-minio"), 9000)
        # The Ray pods' own access to MLflow is unchanged.
        assert reachable(objects, NS, serve_head, _pod_labels(objects, "rayship-mlflow"), 5000)
    assert not reachable(objects, NS, source, serve_head, 6379)
    assert not reachable(objects, NS, source, _head_labels(objects, "RayJob"), 8265)
    assert not reachable(objects, NS, serve_head, source, 8000)
    # The check itself: without the retrain policy, default deny blocks everything.
    without = [o for o in objects if o["metadata"]["name"] != "retrain"]
    assert not reachable(without, NS, source, serve_head, k8s.SERVE_PORT)


# --------------------------------------------------------------------- the CronJob


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's command from its env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def test_cronjob_runs_rayship_retrain_if_drifted_on_the_deployed_spec(deployed, tmp_path):
    """The container's command, expanded as the kubelet does and with its volumes where
    they are mounted, is `rayship retrain SPEC --data FILE --if-drifted --kubernetes`
    as the real CLI parses it; SPEC is the key of the spec ConfigMap `rayship deploy`
    creates for the base spec, FILE where the init container writes the new rows, and
    the RayService it swaps is the one deploy creates."""
    objects = deployed["local"]
    pod = _pod(_cronjob(objects))["spec"]
    (container,) = pod["containers"]
    (fetch,) = pod["initContainers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = [_expand(a, env) for a in container["command"]]
    assert argv[:2] == ["rayship", "retrain"]

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    local = {}  # mount path → a folder here standing for the volume
    for path, name in mounts.items():
        local[path] = tmp_path / name
        local[path].mkdir()
    spec_cm = volumes[mounts["/home/ray/spec"]]["configMap"]["name"]
    cm = k8s.find(objects, "ConfigMap", spec_cm)
    for key, text in cm["data"].items():
        (local["/home/ray/spec"] / key).write_text(text)
    fetch_env = {e["name"]: e["value"] for e in fetch["env"]}
    data_file = fetch_env["RETRAIN_DATA_FILE"]
    assert data_file == env["RETRAIN_DATA_FILE"]
    data_mount = next(p for p in mounts if data_file.startswith(p + "/"))
    assert {m["mountPath"]: m["name"] for m in fetch["volumeMounts"]}[data_mount] == mounts[
        data_mount
    ]
    (local[data_mount] / Path(data_file).name).write_text("rows")

    def here(arg: str) -> str:
        for path, folder in local.items():
            if arg.startswith(path + "/"):
                return str(folder / arg[len(path) + 1 :])
        return arg

    ctx = parse_cli([here(a) for a in argv])
    assert ctx.info_name == "retrain"
    assert ctx.params["if_drifted"] and ctx.params["kubernetes"]
    assert ctx.params["namespace"] == NS
    assert not ctx.params["force"]  # the cooldown applies
    assert Path(ctx.params["data"]).suffix in (".csv", ".parquet")
    assert fetch_env["RETRAIN_DATA_URI"].endswith(Path(data_file).suffix)

    spec = load_spec(ctx.params["spec_path"])
    assert spec.name == load_spec(BASE_SPEC).name
    # What retrain --kubernetes patches and asks for drift exists in the deployed objects.
    service = k8s.find(objects, "RayService", k8s.resource_name(spec.name, "serve"))
    assert service["metadata"]["namespace"] == NS


def _with_overlay_images(overlay: str, tmp_path: Path) -> list[dict]:
    """manifests/monitoring built as docs/monitoring.md tells prod users to: from a
    kustomization of their own that sets the overlay's images."""
    overlay_file = ROOT / "manifests" / "overlays" / overlay / "kustomization.yaml"
    images = yaml.safe_load(overlay_file.read_text())["images"]
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [os.path.relpath(MONITORING, tmp_path)], "images": images})
    )
    return kustomize(tmp_path)


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_cronjob_runs_like_the_rayjob(deployed, overlay, tmp_path):
    """Same image and environment as the search (on prod, with the overlay's images set
    as the docs say), credentials only from Secrets by name, one retrain at a time, a
    bounded run."""
    objects = deployed[overlay]
    job = k8s.find(objects, "RayJob")
    cron = _cronjob(objects if overlay == "local" else _with_overlay_images(overlay, tmp_path))
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    pod = _pod(cron)["spec"]
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert container["image"] == head["image"]
        assert container["envFrom"] == head["envFrom"]
        for var in container.get("env", []):
            secret_like = re.search(r"KEY|SECRET|PASSWORD|TOKEN", var["name"])
            assert not (secret_like and "value" in var), var["name"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
    assert pod["restartPolicy"] == "Never"


def test_cronjob_identity_may_swap_the_rayservice(deployed):
    """The pod runs as the deployer ServiceAccount with its token mounted, and the Role
    bound to it allows what `retrain --kubernetes` calls: get and patch RayServices
    (cluster.k8s_apply.promote_rayservice)."""
    objects = deployed["local"]
    pod = _pod(_cronjob(objects))["spec"]
    account = pod["serviceAccountName"]
    k8s.find(objects, "ServiceAccount", account)
    assert pod["automountServiceAccountToken"] is True
    bindings = [
        b
        for b in objects
        if b["kind"] == "RoleBinding"
        and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
    ]
    verbs = set()
    for binding in bindings:
        role = k8s.find(objects, "Role", binding["roleRef"]["name"])
        for rule in role["rules"]:
            if "ray.io" in rule["apiGroups"] and "rayservices" in rule["resources"]:
                verbs |= set(rule["verbs"])
    assert {"get", "patch"} <= verbs


# --------------------------------------------------------------------- the dashboard

WANTED_PANELS = {
    "Request rate",
    "Latency percentiles",
    "Errors by code",
    "Batch sizes",
    "Replicas",
    "Model version",
    "Canary weight",
    "PSI per feature",
    "PSI / threshold",
    "Drifted features",
    "Model drift score",
    "Window rows",
}


def test_dashboard_is_a_grafana_dashboard(monitoring):
    """What Grafana's sidecar loads: the generated ConfigMap (labelled for the sidecar)
    holds dashboard.json unchanged; the JSON has a uid, a schemaVersion, and panels that
    each query the templated Prometheus datasource, with unique ids and refIds, laid out
    on Grafana's 24-column grid without overlapping."""
    cm = k8s.find(monitoring, "ConfigMap", "rayship-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["dashboard.json"] == (MONITORING / "dashboard.json").read_text()

    board = dashboard()
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    all_panels = panels(board)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in all_panels if p["type"] != "row"]
    assert {p["title"] for p in graphs} >= WANTED_PANELS
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= set(variables), (p["title"], used)


# --------------------------------------------------------------------- PromQL

ALL_QUERIES = [*dashboard_queries(), *rule_queries()]


@pytest.mark.parametrize("query", ALL_QUERIES, ids=lambda q: q.where)
def test_every_query_parses_and_reads_exported_metrics(query):
    found = selectors(query.expr)
    assert found, f"{query.where}: reads no metric"
    unknown = {s.metric for s in found} - set(EXPORTED)
    assert not unknown, f"{query.where}: metrics the endpoint does not export: {unknown}"


def test_the_checks_catch_a_bad_query():
    with pytest.raises(ValueError):
        parse('sum by (model) (rate(ray_rayship_requests_total{model="a"}[5m])')
    typo = selectors('rate(ray_rayship_request_total{model=~"$model"}[$__rate_interval])')
    assert {s.metric for s in typo} - set(EXPORTED) == {"ray_rayship_request_total"}


def test_dashboard_shows_every_metric_and_drift_per_feature():
    read = {s.metric for q in dashboard_queries() for s in selectors(q.expr)}
    assert read == set(EXPORTED)
    by_title = {p["title"]: p for p in panels(dashboard())}
    for title in ("PSI per feature", "PSI / threshold", "Drifted features"):
        for target in by_title[title]["targets"]:
            assert "feature" in grouping_labels(target["expr"]), title


def test_alerts_cover_drift_errors_and_latency_and_name_model_and_feature():
    by_name = {r["alert"]: r for r in rules()}
    assert set(by_name) >= {
        "RayshipFeatureDrift",
        "RayshipHighErrorRate",
        "RayshipHighLatencyP99",
    }
    for name, rule in by_name.items():
        assert rule["for"], name
        kept = grouping_labels(rule["expr"])
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in kept, f"{name}: annotation uses {label}, which the expr drops"
        assert rule["labels"]["severity"] in ("warning", "critical")
    drift = by_name["RayshipFeatureDrift"]
    assert {"model", "version", "feature"} <= grouping_labels(drift["expr"])
    assert {s.metric for s in selectors(drift["expr"])} <= DRIFT_GAUGES
    assert "5.." in by_name["RayshipHighErrorRate"]["expr"]
    assert "0.99" in by_name["RayshipHighLatencyP99"]["expr"]
    allowed = TARGET_LABELS | {"model", "version", "feature", "le"}
    for rule in by_name.values():
        assert grouping_labels(rule["expr"]) <= allowed
