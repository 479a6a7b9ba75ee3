#!/usr/bin/env bash
# Builds Flagger from its Go module (hack/controlplane/flagger, pinned in hack/versions.env as
# FLAGGER_VERSION) for the bench against it only (make bench-vs-flagger); make test never runs
# this. Cached in ~/.cache/canaryd/bin/flagger-<version>/ with Flagger's CRDs copied from the
# module (artifacts/flagger/crd.yaml). Reuses whatever is already there; prints the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

command -v go >/dev/null || { echo "build-flagger: 'go' not found; install Go >= 1.26" >&2; exit 1; }
grep -qE "^\s*(require\s+)?github.com/fluxcd/flagger $FLAGGER_VERSION\b" "$here/controlplane/flagger/go.mod" || {
  echo "build-flagger: hack/controlplane/flagger/go.mod does not require github.com/fluxcd/flagger $FLAGGER_VERSION (hack/versions.env); update one of them" >&2
  exit 1
}

cache=${CANARYD_BIN_CACHE:-$HOME/.cache/canaryd/bin}
out="$cache/flagger-$FLAGGER_VERSION"
mkdir -p "$out"
if [ ! -x "$out/flagger" ]; then
  echo "build-flagger: building flagger $FLAGGER_VERSION (first time only; cached in $out)" >&2
  (cd "$here/controlplane/flagger" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags="-s -w" \
    -o "$out/flagger.tmp" github.com/fluxcd/flagger/cmd/flagger)
  mv "$out/flagger.tmp" "$out/flagger"
fi
if [ ! -f "$out/crd.yaml" ]; then
  dir=$(cd "$here/controlplane/flagger" && go mod download -json github.com/fluxcd/flagger |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  cp "$dir/artifacts/flagger/crd.yaml" "$out/crd.yaml.tmp"
  chmod u+w "$out/crd.yaml.tmp"
  mv "$out/crd.yaml.tmp" "$out/crd.yaml"
fi
echo "$out"
