#!/usr/bin/env bash
# Start the minikube profile `rayship`, install the KubeRay operator from its Helm
# chart, build the rayship image and load it into minikube.
# Needs: docker (or another minikube driver), minikube, kubectl, helm.
set -euo pipefail
# shellcheck source=cluster/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PROFILE="${PROFILE:-rayship}"
CPUS="${CPUS:-4}"
MEMORY="${MEMORY:-8g}"
need docker minikube kubectl helm

if minikube status --profile "$PROFILE" >/dev/null 2>&1; then
  echo "minikube profile $PROFILE is running"
else
  # Calico enforces NetworkPolicies (minikube's default CNI ignores them).
  minikube start --profile "$PROFILE" --cpus "$CPUS" --memory "$MEMORY" \
    --kubernetes-version v1.34.0 --cni calico
fi
kubectl config use-context "$PROFILE"
install_kuberay
build_image
minikube image load "$IMAGE" --profile "$PROFILE"
echo "ready: make k8s-deploy SPEC=examples/breast_cancer.yaml"
