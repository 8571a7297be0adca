#!/usr/bin/env bash
# Shared by kind-up.sh and minikube-up.sh: versions, the image build, the operator.
# Sourced, not run.

KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.0}"
KUBERAY_NAMESPACE="${KUBERAY_NAMESPACE:-kuberay-system}"
IMAGE="${IMAGE:-rayship:0.1.0}"
# cpu (rayproject/ray:2.60.0-py311) or gpu (rayproject/ray:2.60.0-py311-gpu)
FLAVOR="${FLAVOR:-cpu}"

need() {
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "error: $tool is required (see docs/kubernetes.md)" >&2
      exit 1
    fi
  done
}

build_image() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  echo "building $IMAGE ($FLAVOR) from $root"
  docker build --build-arg "FLAVOR=$FLAVOR" -t "$IMAGE" "$root"
}

install_kuberay() {
  echo "installing the KubeRay operator $KUBERAY_VERSION into $KUBERAY_NAMESPACE"
  helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
  helm upgrade --install kuberay-operator kuberay/kuberay-operator \
    --version "$KUBERAY_VERSION" \
    --namespace "$KUBERAY_NAMESPACE" --create-namespace \
    --wait --timeout 5m
  kubectl --namespace "$KUBERAY_NAMESPACE" rollout status deployment/kuberay-operator --timeout=5m
}
