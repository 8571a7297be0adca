#!/usr/bin/env bash
# Create the kind cluster `rayship` (cluster/kind.yaml), install the KubeRay operator
# from its Helm chart, build the rayship image and load it into the nodes.
# Needs: docker, kind, kubectl, helm.
set -euo pipefail
# shellcheck source=cluster/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CLUSTER="${CLUSTER:-rayship}"
need docker kind kubectl helm

if kind get clusters | grep -qx "$CLUSTER"; then
  echo "kind cluster $CLUSTER exists"
else
  kind create cluster --name "$CLUSTER" \
    --config "$(dirname "${BASH_SOURCE[0]}")/../kind.yaml" --wait 5m
fi
kubectl config use-context "kind-$CLUSTER"
install_kuberay
build_image
kind load docker-image "$IMAGE" --name "$CLUSTER"
echo "ready: make k8s-deploy SPEC=examples/breast_cancer.yaml"
