#!/usr/bin/env bash
# Builds the local stack's binaries from Go modules into a cache outside the repo: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm, kwok, daprd and
# Dapr Sentry; unpacks the Gateway API standard CRDs, Cilium's CRDs, the Prometheus Operator's
# ServiceMonitor/PrometheusRule CRDs and kwok's default stages beside them.
# Reuses whatever is already there; safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

command -v go >/dev/null || { echo "build-binaries: 'go' not found; install Go >= 1.26 (it builds the test control plane)" >&2; exit 1; }

cache=${CANARYD_BIN_CACHE:-$HOME/.cache/canaryd/bin}
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_gwapi-${GATEWAY_API_VERSION}_kwok-${KWOK_VERSION}_dapr-${DAPR_VERSION}_cilium-${CILIUM_VERSION}_r${BUILD_REVISION}"
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
check_pin cilium github.com/cilium/cilium "$CILIUM_VERSION"
check_pin kwok sigs.k8s.io/kwok "$KWOK_VERSION"
check_pin dapr github.com/dapr/dapr "$DAPR_VERSION"
check_pin prometheus-operator github.com/prometheus-operator/prometheus-operator "$PROMETHEUS_OPERATOR_VERSION"

build() { # module dir, package, binary name, extra -ldflags, build tags
  if [ -x "$out/$3" ]; then return 0; fi
  echo "build-binaries: building $3 (first time only; cached in $out)" >&2
  (cd "$here/controlplane/$1" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -tags="${5:-}" -ldflags="-s -w ${4:-}" -o "$out/$3.tmp" "$2")
  mv "$out/$3.tmp" "$out/$3"
}
# Kubernetes' own release flags: without them the servers report v0.0.0-master+$Format:%H$,
# which some clients refuse as a non-semver version.
minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
kv=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kv="$kv -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
dv="-X github.com/dapr/dapr/pkg/buildinfo.version=${DAPR_VERSION#v}"
# Two at a time: each Kubernetes binary links several GB on this machine's cores.
build etcd . etcd &
p1=$!
build helm helm.sh/helm/v3/cmd/helm helm &
p2=$!
wait $p1; wait $p2
build kube k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$kv" &
p1=$!
build kwok sigs.k8s.io/kwok/cmd/kwok kwok &
p2=$!
wait $p1; wait $p2
build kube k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$kv" &
p1=$!
build kube k8s.io/kubernetes/cmd/kube-scheduler kube-scheduler "$kv" &
p2=$!
wait $p1; wait $p2
build kube k8s.io/kubernetes/cmd/kubectl kubectl "$kv" &
p1=$!
# daprd's component registry refuses to start without one of its two tags; the stable set
# builds with current Go (the Kitex binding, in the full set, does not).
build dapr ./daprd daprd "$dv" stablecomponents &
p2=$!
wait $p1; wait $p2
build dapr github.com/dapr/dapr/cmd/sentry sentry "$dv"

moddir() { # module dir, module path: where the Go module cache holds that module's files
  (cd "$here/controlplane/$1" && go mod download -json "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
}
if [ ! -f "$out/kwok-stages/.done" ]; then
  dir=$(moddir kwok sigs.k8s.io/kwok)
  mkdir -p "$out/kwok-stages"
  for s in node/fast node/heartbeat-with-lease pod/fast; do cp "$dir/kustomize/stage/$s"/*.yaml "$out/kwok-stages/"; done
  rm -f "$out"/kwok-stages/kustomization.yaml
  chmod u+w "$out"/kwok-stages/*.yaml
  touch "$out/kwok-stages/.done"
fi
if [ ! -f "$out/crds/cilium/.done" ]; then
  dir=$(moddir cilium github.com/cilium/cilium)
  mkdir -p "$out/crds/cilium"
  for c in ciliumnetworkpolicies ciliumclusterwidenetworkpolicies ciliumlocalredirectpolicies ciliumenvoyconfigs; do
    cp "$dir"/pkg/k8s/apis/cilium.io/client/crds/v2/$c.yaml "$out/crds/cilium/"
  done
  chmod u+w "$out"/crds/cilium/*.yaml
  touch "$out/crds/cilium/.done"
fi

if [ ! -f "$out/crds/standard/.done" ]; then
  dir=$(moddir crds sigs.k8s.io/gateway-api)
  mkdir -p "$out/crds/standard"
  cp "$dir"/config/crd/standard/*.yaml "$out/crds/standard/"
  chmod u+w "$out"/crds/standard/*.yaml
  touch "$out/crds/standard/.done"
fi
# The Prometheus Operator's CRDs for the chart's ServiceMonitor and PrometheusRule. Its version is
# not in the cache key (adding it would rebuild every binary): the marker records it instead.
po="$out/crds/prometheus-operator"
if [ "$(cat "$po/.done" 2>/dev/null)" != "$PROMETHEUS_OPERATOR_VERSION" ]; then
  dir=$(moddir prometheus-operator github.com/prometheus-operator/prometheus-operator)
  rm -rf "$po.tmp"
  mkdir -p "$po.tmp"
  for c in servicemonitors prometheusrules; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$c.yaml" "$po.tmp/"
  done
  chmod u+w "$po.tmp"/*.yaml
  echo "$PROMETHEUS_OPERATOR_VERSION" >"$po.tmp/.done"
  rm -rf "$po"
  mv "$po.tmp" "$po"
fi
echo "$out"
