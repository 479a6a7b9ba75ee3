#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd and helm from Go modules into a cache
# outside the repo, and unpacks the Gateway API standard CRDs beside them.
# Reuses whatever is already there; safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

command -v go >/dev/null || { echo "build-binaries: 'go' not found; install Go >= 1.26 (it builds the test control plane)" >&2; exit 1; }

cache=${CANARYD_BIN_CACHE:-$HOME/.cache/canaryd/bin}
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_gwapi-${GATEWAY_API_VERSION}"
out="$cache/$key"
mkdir -p "$out"

check_pin() { # module dir, module path, version: go.mod must require exactly the pinned version
  grep -qE "^\s*(require\s+)?$2 $3\b" "$here/controlplane/$1/go.mod" || {
    echo "build-binaries: hack/controlplane/$1/go.mod does not require $2 $3 (hack/versions.env); update one of them" >&2; exit 1; }
}
check_pin kube k8s.io/kubernetes "$KUBERNETES_VERSION"
check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin helm helm.sh/helm/v3 "$HELM_VERSION"
check_pin crds sigs.k8s.io/gateway-api "$GATEWAY_API_VERSION"

build() { # module dir, package, binary name
  if [ -x "$out/$3" ]; then return 0; fi
  echo "build-binaries: building $3 (first time only; cached in $out)" >&2
  (cd "$here/controlplane/$1" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags='-s -w' -o "$out/$3.tmp" "$2")
  mv "$out/$3.tmp" "$out/$3"
}
build etcd . etcd &
p1=$!
build helm helm.sh/helm/v3/cmd/helm helm &
p2=$!
wait $p1; wait $p2
build kube k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver
build kube k8s.io/kubernetes/cmd/kubectl kubectl

if [ ! -f "$out/crds/standard/.done" ]; then
  dir=$(cd "$here/controlplane/crds" && go mod download -json sigs.k8s.io/gateway-api | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$out/crds/standard"
  cp "$dir"/config/crd/standard/*.yaml "$out/crds/standard/"
  chmod u+w "$out"/crds/standard/*.yaml
  touch "$out/crds/standard/.done"
fi
echo "$out"
