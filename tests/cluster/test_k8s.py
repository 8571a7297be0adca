"""cluster/k8s.py's pure functions: rendering for a spec (names, sizes, refusals), the
written files, status messages for every RayJob/RayService state, and promotion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import k8s
from services.serve_config import load, models_of
from training.spec import ServeSpec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local() -> list[dict]:
    return k8s.kustomize("local")


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return k8s.kustomize("prod")


def _spec(**changes):
    data = yaml.safe_load((ROOT / "examples" / "breast_cancer.yaml").read_text())
    for key, value in changes.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    return parse_spec(data), yaml.safe_dump(data)


def _groups(objects, kind):
    obj = k8s.find(objects, kind)
    cluster = obj["spec"]["rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"]
    return cluster["workerGroupSpecs"]


def test_render_names_and_spec(local):
    spec, text = _spec()
    objects, _ = k8s.render_for_spec(local, spec, text)
    assert k8s.find(objects, "RayJob")["metadata"]["name"] == "breast-cancer-tune"
    assert k8s.find(objects, "RayService")["metadata"]["name"] == "breast-cancer-serve"
    cm = k8s.find(objects, "ConfigMap", "breast-cancer-spec")
    assert cm["data"][k8s.SPEC_KEY] == text
    head = k8s.find(objects, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert [v["configMap"]["name"] for v in head["template"]["spec"]["volumes"]] == [
        "breast-cancer-spec"
    ]
    # The input is left alone.
    assert k8s.find(local, "RayJob")["metadata"]["name"] == k8s.BASE_RAYJOB


@pytest.mark.parametrize(
    ("name", "expected"),
    [("digits", "digits-tune"), ("Churn_v2.1", "churn-v2-1-tune"), ("x" * 60, "x" * 40 + "-tune")],
)
def test_resource_names_are_dns_labels(name, expected):
    assert k8s.resource_name(name, "tune") == expected


@pytest.mark.parametrize(
    ("serve", "worker_cpus", "expected"),
    [
        (dict(min_replicas=1, max_replicas=4, cpus_per_replica=1), 1, (1, 1, 4)),
        (dict(min_replicas=0, max_replicas=4, cpus_per_replica=1), 1, (1, 0, 4)),
        (dict(min_replicas=3, max_replicas=8, cpus_per_replica=1), 4, (1, 1, 2)),
        (dict(min_replicas=2, max_replicas=5, cpus_per_replica=0.5), 1, (1, 1, 3)),
        (dict(min_replicas=2, max_replicas=3, cpus_per_replica=2), 4, (1, 1, 2)),
    ],
)
def test_serve_worker_sizes(serve, worker_cpus, expected):
    s = k8s.serve_worker_sizes(ServeSpec(**serve), worker_cpus)
    assert (s.replicas, s.min_replicas, s.max_replicas) == expected


def test_serve_replica_larger_than_a_worker_is_refused(local):
    spec, text = _spec(serve__cpus_per_replica=2)
    with pytest.raises(k8s.K8sError, match="cpus_per_replica 2"):
        k8s.render_for_spec(local, spec, text)


def test_rayservice_worker_group_follows_the_serve_section(local, prod):
    spec, text = _spec(serve__min_replicas=2, serve__max_replicas=6)
    objects, _ = k8s.render_for_spec(local, spec, text)
    group = _groups(objects, "RayService")[0]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (2, 6, 2)
    objects, _ = k8s.render_for_spec(prod, spec, text)  # 4-CPU workers: 4 replicas each
    group = _groups(objects, "RayService")[0]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)
    served = models_of(load(k8s.find(objects, "RayService")["spec"]["serveConfigV2"]))
    assert [m["name"] for m in served] == ["breast_cancer"]


def test_rayjob_worker_group_follows_the_search(local, prod):
    spec, text = _spec(search__max_concurrent_trials=2)
    objects, warnings = k8s.render_for_spec(local, spec, text)
    cpu = _groups(objects, "RayJob")[0]
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (1, 2)
    assert warnings == []
    spec, text = _spec(search__max_concurrent_trials=40)
    objects, warnings = k8s.render_for_spec(prod, spec, text)
    assert _groups(objects, "RayJob")[0]["maxReplicas"] == 10  # 40 trials / 4 CPUs
    assert [g["groupName"] for g in _groups(objects, "RayJob")] == ["cpu", "gpu"]
    objects, warnings = k8s.render_for_spec(local, spec, text)
    assert _groups(objects, "RayJob")[0]["maxReplicas"] == 2  # the overlay's cap
    assert any("allows 2" in w for w in warnings)
    spec, text = _spec()
    _, warnings = k8s.render_for_spec(local, spec, text)
    assert any("max_concurrent_trials is not set" in w for w in warnings)


def test_gpu_spec_needs_a_gpu_group(local, prod):
    spec = load_spec(ROOT / "examples" / "digits.yaml")
    data = spec.model_dump(mode="json", exclude_none=True)
    data["models"][0]["gpus_per_worker"] = 1
    gpu = parse_spec(data)
    with pytest.raises(k8s.K8sError, match="no GPU worker group"):
        k8s.render_for_spec(local, gpu, "")
    k8s.render_for_spec(prod, gpu, "")


def test_local_data_path_is_flagged(local):
    spec = load_spec(ROOT / "examples" / "churn.yaml")
    _, warnings = k8s.render_for_spec(local, spec, "")
    assert any("local path" in w for w in warnings)


def test_written_manifests_read_back(local, tmp_path):
    spec, text = _spec()
    objects, _ = k8s.render_for_spec(local, spec, text)
    files = k8s.write_manifests(objects, tmp_path / "out")
    assert len(files) == len(objects) + 1
    assert k8s.read_manifests(tmp_path / "out") == objects
    # Multi-line strings stay readable blocks and exact.
    service = (tmp_path / "out" / "rayservice-breast-cancer-serve.yaml").read_text()
    assert "serveConfigV2: |" in service
    docs = list(yaml.safe_load_all(k8s.dump_objects(objects)))
    assert docs == objects


def test_apply_order_puts_references_first(local):
    kinds = [o["kind"] for o in k8s.apply_order(local)]
    assert kinds[0] == "Namespace"
    assert kinds.index("ConfigMap") < kinds.index("RayJob")
    assert kinds.index("NetworkPolicy") < kinds.index("Deployment")


def _job(**status):
    return {"metadata": {"name": "digits-tune"}, "status": status}


@pytest.mark.parametrize(
    ("status", "phase", "done", "failed", "words"),
    [
        ({}, "New", False, False, "KubeRay operator"),
        (
            {"jobDeploymentStatus": "Initializing", "rayClusterName": "c1"},
            "Initializing",
            False,
            False,
            "creating Ray cluster c1",
        ),
        (
            {"jobDeploymentStatus": "Running", "jobId": "j1", "jobStatus": "RUNNING"},
            "Running",
            False,
            False,
            "j1 RUNNING",
        ),
        (
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "jobId": "j1"},
            "Complete",
            True,
            False,
            "search finished",
        ),
        (
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": "exit 2",
            },
            "Failed",
            True,
            True,
            "gate refused the winner (exit code 2): exit 2",
        ),
        (
            {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"},
            "Failed",
            True,
            True,
            "activeDeadlineSeconds",
        ),
        (
            {"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed"},
            "Failed",
            True,
            True,
            "could not submit",
        ),
        (
            {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"},
            "Complete",
            True,
            True,
            "Ray job STOPPED",
        ),
        ({"jobDeploymentStatus": "Suspended"}, "Suspended", True, False, "suspended"),
        ({"jobDeploymentStatus": "Retrying", "message": "x"}, "Retrying", False, False, "x"),
    ],
)
def test_rayjob_state(status, phase, done, failed, words):
    state = k8s.rayjob_state(_job(**status))
    assert (state.phase, state.done, state.failed) == (phase, done, failed)
    assert words in state.message and state.message.startswith("digits-tune")


def _service(conditions=(), apps=None, **status):
    st = dict(status)
    if conditions:
        st["conditions"] = [
            {"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions
        ]
    if apps is not None:
        st["activeServiceStatus"] = {"applicationStatuses": apps}
    return {"metadata": {"name": "digits-serve"}, "status": st}


@pytest.mark.parametrize(
    ("obj", "phase", "done", "failed", "words"),
    [
        (_service(), "New", False, False, "operator"),
        (
            _service([("Ready", "False", "Initializing", "")], serviceStatus=""),
            "Initializing",
            False,
            False,
            "Initializing",
        ),
        (
            _service([("Ready", "False", "InitializingTimeout", "head pending")]),
            "InitializingTimeout",
            True,
            True,
            "did not become ready: head pending",
        ),
        (
            _service([("Ready", "False", "ZeroServeEndpoints", "")]),
            "ZeroServeEndpoints",
            False,
            False,
            "no pod answers",
        ),
        (
            _service(
                [("Ready", "True", "NonZeroServeEndpoints", "")],
                {"rayship": {"status": "RUNNING"}},
                numServeEndpoints=2,
            ),
            "Ready",
            True,
            False,
            "2 endpoint(s) (rayship RUNNING)",
        ),
        (
            _service(
                [("Ready", "True", "NonZeroServeEndpoints", "")],
                {"rayship": {"status": "DEPLOY_FAILED", "message": "trace\nRegistryError: sha"}},
            ),
            "DEPLOY_FAILED",
            True,
            True,
            "RegistryError: sha",
        ),
        (
            _service(
                [
                    ("Ready", "True", "NonZeroServeEndpoints", ""),
                    ("UpgradeInProgress", "True", "BothActivePendingClustersExist", ""),
                ],
                pendingServiceStatus={"rayClusterName": "c2"},
            ),
            "Upgrading",
            False,
            False,
            "new Ray cluster c2",
        ),
    ],
)
def test_rayservice_state(obj, phase, done, failed, words):
    state = k8s.rayservice_state(obj)
    assert (state.phase, state.done, state.failed) == (phase, done, failed)
    assert words in state.message


def test_promoted_serve_config_changes_only_the_ref(local):
    spec, text = _spec()
    objects, _ = k8s.render_for_spec(local, spec, text)
    before = k8s.find(objects, "RayService")["spec"]["serveConfigV2"]
    after = k8s.promoted_serve_config(before, "breast_cancer", "7")
    old, new = load(before), load(after)
    assert models_of(new)[0]["ref"] == "7"
    models_of(new)[0]["ref"] = models_of(old)[0]["ref"]
    assert new == old  # nothing else moved: a user_config-only change, applied in place
    with pytest.raises(k8s.K8sError, match="not served"):
        k8s.promoted_serve_config(before, "digits", "3")


def test_quantities():
    assert k8s.quantity("500m") == 0.5
    assert k8s.quantity(2) == 2.0
    assert k8s.quantity("1.5") == 1.5


def test_tune_storage_follows_the_manifests_env(monkeypatch, tmp_path):
    """The RayJob's containers get RAYSHIP_STORAGE_PATH (rayship-env); Tune uses it."""
    from training.tune import storage_root

    monkeypatch.delenv("RAYSHIP_STORAGE_PATH", raising=False)
    assert storage_root(tmp_path) == str((tmp_path / "searches").resolve())
    monkeypatch.setenv("RAYSHIP_STORAGE_PATH", "s3://rayship/searches/")
    assert storage_root(tmp_path) == "s3://rayship/searches"
    for overlay in k8s.OVERLAYS:
        env = k8s.overlay_env(k8s.kustomize(overlay))
        assert env["RAYSHIP_STORAGE_PATH"].startswith("s3://")
