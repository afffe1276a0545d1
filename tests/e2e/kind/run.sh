#!/usr/bin/env bash
# Cumulo on kind, end to end: create a kind cluster, build the image and load it into the nodes, install the
# chart with the simulator hypervisor, apply examples/quickstart adapted for it (quickstart-simulator/ plus a Host
# and a local pool per node) and wait until demo/demo-vm is Running.
#
# Needs: docker (a running engine), kind, kubectl, helm (HELM=... or `cumulo toolchain` builds one).
# Environment: CLUSTER (default cumulo-e2e), KEEP=1 keeps the cluster afterwards, IMAGE (default
# localhost/cumulo:e2e; set SKIP_BUILD=1 to use one already built), TIMEOUT (seconds, default 600).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cluster=${CLUSTER:-cumulo-e2e}
image=${IMAGE:-localhost/cumulo:e2e}
timeout=${TIMEOUT:-600}
helm=${HELM:-helm}
kubectl=${KUBECTL:-kubectl}
kubeconfig=$(mktemp)
export KUBECONFIG=$kubeconfig

step() { printf '\n==> %s\n' "$*"; }
cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    step "failed; state of the cluster"
    $kubectl get pods -A -o wide || true
    $kubectl get cumulo -A || true
    $kubectl -n cumulo-system logs deploy/cumulo-controller --tail=100 || true
    $kubectl -n cumulo-system logs ds/cumulo-agent --tail=100 || true
  fi
  if [ -z "${KEEP:-}" ]; then kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; fi
  rm -f "$kubeconfig"
  exit "$status"
}
trap cleanup EXIT

for tool in docker kind "$kubectl" "$helm"; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is not installed" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "run.sh: docker cannot reach a container engine" >&2; exit 2; }

step "kind cluster $cluster"
kind get clusters 2>/dev/null | grep -qx "$cluster" || kind create cluster --name "$cluster" --config "$here/kind.yaml" --wait 120s
kind export kubeconfig --name "$cluster" --kubeconfig "$kubeconfig"

if [ -z "${SKIP_BUILD:-}" ]; then
  step "image $image (Containerfile)"
  docker build -t "$image" -f "$repo/Containerfile" "$repo"
fi
kind load docker-image "$image" --name "$cluster"

step "helm install (simulator hypervisor)"
repository=${image%:*}
tag=${image##*:}
$helm upgrade --install cumulo "$repo/charts/cumulo" --namespace cumulo-system --create-namespace \
  -f "$here/values-simulator.yaml" --set image.repository="$repository" --set image.tag="$tag" \
  --wait --timeout 300s
$kubectl -n cumulo-system rollout status ds/cumulo-agent --timeout=300s

step "quickstart for the simulator"
$kubectl kustomize --load-restrictor LoadRestrictionsNone "$here/quickstart-simulator" | $kubectl apply -f -
# One Host and one local pool per node (hosts.sh).
"$here/hosts.sh" $($kubectl get nodes -o jsonpath='{.items[*].metadata.name}') | $kubectl apply -f -

step "waiting for the hosts to be Up and demo/demo-vm Running (up to ${timeout}s)"
deadline=$((SECONDS + timeout))
until [ "$($kubectl -n demo get vm demo-vm -o jsonpath='{.status.phase}' 2>/dev/null)" = Running ]; do
  if [ $SECONDS -ge $deadline ]; then echo "run.sh: demo-vm is not Running after ${timeout}s" >&2; exit 1; fi
  sleep 5
done
$kubectl get hosts
$kubectl -n demo get vm,volumes,networks,publicipaddresses
holder=$($kubectl -n cumulo-system get lease cumulo-controller -o jsonpath='{.spec.holderIdentity}')
echo "demo-vm Running; the controller leading is $holder"
