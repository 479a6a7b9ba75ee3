#!/usr/bin/env bash
# `make image`: builds the canaryd container image from ./Dockerfile with buildah (no daemon, no
# registry, no container engine needed).
#
# The Dockerfile's default base (the official python:3.11-slim-bookworm) comes from a registry
# that not every machine reaches, so unless CANARYD_PYTHON_IMAGE names a base to use (for example
# that official image, where it can be pulled) this script first makes an equivalent one from
# Debian's own packages: `debootstrap --variant=minbase bookworm` from apt's configured mirror,
# then Debian's python3.11, python3-venv and ca-certificates, and a virtualenv at /opt/venv first
# on PATH (Debian's Python has no `python` command and its pip refuses to install system-wide).
# It passes that base as --build-arg PYTHON_IMAGE; the Dockerfile itself is the one `docker build`
# users run against the official base.
#
# Idempotent: the base is made once (cached by its recipe, CANARYD_BASE_RECIPE below), the image is
# rebuilt only when its inputs (Dockerfile, pyproject.toml, README.md, canaryd/, the base, the git
# revision) changed. Needs root (debootstrap, chroot) and Debian's apt to install what is missing.
#
# Environment:
#   CANARYD_IMAGE          image name (default canaryd:<version>, stored as localhost/canaryd:<version>)
#   CANARYD_PYTHON_IMAGE   use this base instead of making one (pulled if missing)
#   CANARYD_IMAGE_CACHE    buildah storage, the figures (build.json) and the lock (~/.cache/canaryd/image)
#   CANARYD_DEBIAN_MIRROR  Debian mirror for the base (default: the one apt is configured with)
#   CANARYD_IMAGE_REBUILD  1 = rebuild the image, base = rebuild the base too (e.g. for security updates)
#   CANARYD_IMAGE_ARCHIVE  also write the image as a docker-archive tar there (`docker load -i`, `kind load image-archive`)
# Prints the image name last on stdout; progress goes to stderr.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "build-image: $*" >&2; }
die() {
  say "$1"
  shift
  for line in "$@"; do printf '%s\n' "$line" | sed 's/^/  /' >&2; done
  exit 1
}

SUITE=bookworm
BASE_PACKAGES="python3.11 python3-venv ca-certificates"
# Bumped when the base recipe below changes, so the cached base is made anew.
CANARYD_BASE_RECIPE=1

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/canaryd/__init__.py")
[ -n "$version" ] || die "cannot read __version__ from canaryd/__init__.py"
image=${CANARYD_IMAGE:-canaryd:$version}
cache=${CANARYD_IMAGE_CACHE:-$HOME/.cache/canaryd/image}
rebuild=${CANARYD_IMAGE_REBUILD:-}
mkdir -p "$cache"

# --- prerequisites ---------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "needs root: debootstrap and buildah's chroot isolation need it" \
  "run it as root (sudo make image), or build with Docker against the official base: docker build -t $image ."
missing=()
command -v buildah >/dev/null || missing+=(buildah)
if [ -z "${CANARYD_PYTHON_IMAGE:-}" ]; then
  command -v debootstrap >/dev/null || missing+=(debootstrap)
fi
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "${missing[*]} not found and this is no Debian/Ubuntu (no apt-get)" \
    "install ${missing[*]} with your package manager, or: docker build -t $image ."
  say "installing ${missing[*]} with apt-get (Debian's packages; once; log in $cache/apt.log)"
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$cache/apt.log" 2>&1 || die "apt-get install ${missing[*]} failed; the last lines of $cache/apt.log:" \
    "$(tail -5 "$cache/apt.log")" "check apt's sources (/etc/apt/sources.list*), or install them by hand; then run make image again"
fi
exec 9>"$cache/lock"
flock 9 # one build at a time per cache
# A storage of its own (vfs: no overlay or fuse needed), so nothing here meets another engine's.
bh() { buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs "$@"; }
exists() { bh inspect --type image "$1" >/dev/null 2>&1; }
label() { bh inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null; }

# --- the base --------------------------------------------------------------------------------
mirrors() { # the Debian archive and security sites apt uses now, one "URI Label" a line
  apt-get indextargets --format '$(REPO_URI) $(LABEL)' 'Created-By: Packages' 2>/dev/null | sort -u
}

make_base() { # $1 = base image name
  local mirror security root ctr mnt t0
  mirror=${CANARYD_DEBIAN_MIRROR:-$(mirrors | awk '$2 == "Debian" {print $1; exit}')}
  security=$(mirrors | awk '$2 == "Debian-Security" {print $1; exit}')
  [ -n "$mirror" ] || die "no Debian mirror configured in apt (apt-get indextargets lists none)" \
    "run apt-get update, or set CANARYD_DEBIAN_MIRROR=http://deb.debian.org/debian (a mirror you reach)"
  t0=$SECONDS
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove this rootfs
  trap "rm -rf '$root'" EXIT
  say "making the base $1: debootstrap --variant=minbase $SUITE from $mirror (once; about a minute)"
  debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    die "debootstrap failed; the last lines of $cache/debootstrap.log:" "$(tail -5 "$cache/debootstrap.log")" \
      "check that $mirror serves $SUITE (or set CANARYD_DEBIAN_MIRROR)"
  {
    echo "Types: deb"
    echo "URIs: $mirror"
    echo "Suites: $SUITE $SUITE-updates"
    echo "Components: main"
    echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$security" "$SUITE"
      echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    fi
  } >"$root/etc/apt/sources.list.d/debian.sources"
  rm -f "$root/etc/apt/sources.list"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  local t1=$SECONDS
  say "debootstrap took $((t1 - t0))s; installing $BASE_PACKAGES and the venv /opt/venv in the base"
  # A private mount namespace: /proc and /dev vanish with it, whatever happens.
  unshare --mount --propagation private sh -ec '
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
      sh -ec "apt-get update -qq
        apt-get install -y -qq --no-install-recommends $2
        python3.11 -m venv /opt/venv
        apt-get clean"
  ' _ "$root" "$BASE_PACKAGES" >"$cache/base-chroot.log" 2>&1 ||
    die "installing the base's packages failed; the last lines of $cache/base-chroot.log:" \
      "$(tail -5 "$cache/base-chroot.log")"
  # What a container runtime provides, or nothing needs at run time.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/* \
    "$root"/dev/* "$root"/run/* "$root"/etc/resolv.conf "$root"/etc/hostname
  ctr=$(bh from scratch)
  mnt=$(bh mount "$ctr")
  cp -a "$root"/. "$mnt"/
  bh umount "$ctr" >/dev/null
  bh config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 --os linux --arch amd64 \
    --label "org.opencontainers.image.description=Debian $SUITE minbase, $BASE_PACKAGES, venv /opt/venv (canaryd's local base)" \
    "$ctr"
  bh commit --quiet --rm "$ctr" "$1" >/dev/null
  echo "$((SECONDS - t0))" >"$cache/base-seconds"
  rm -rf "$root"
  trap - EXIT
  say "base $1 made in $((SECONDS - t0))s (debootstrap $((t1 - t0))s, packages and venv $((SECONDS - t1))s)"
}

if [ -n "${CANARYD_PYTHON_IMAGE:-}" ]; then
  base=$CANARYD_PYTHON_IMAGE
  base_pull=--pull
else
  base=localhost/canaryd-python:3.11-$SUITE-r$CANARYD_BASE_RECIPE
  base_pull=--pull-never
  if [ "$rebuild" = base ] && exists "$base"; then bh rmi "$base" >/dev/null; fi
  exists "$base" || make_base "$base"
fi

# --- the image -------------------------------------------------------------------------------
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git -C "$repo" status --porcelain -- Dockerfile pyproject.toml README.md canaryd)" ]; then
  revision="$revision-dirty"
fi
base_id=$(bh inspect --type image --format '{{.FromImageID}}' "$base" 2>/dev/null || echo "$base")
inputs=$(
  cd "$repo"
  {
    echo "$revision $base $base_id"
    find Dockerfile pyproject.toml README.md canaryd -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)
ref=localhost/${image#localhost/}
figures=$cache/build.json
if [ -z "$rebuild" ] && exists "$ref" && [ "$(label "$ref" io.canaryd.build.inputs)" = "$inputs" ]; then
  say "$ref is up to date (inputs $inputs); CANARYD_IMAGE_REBUILD=1 rebuilds it"
  seconds=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("build_seconds", ""))' "$figures" 2>/dev/null || true)
else
  old=$(bh inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null || true)
  say "building $ref from Dockerfile on $base"
  t0=$SECONDS
  # The build stage's `pip wheel` reaches PyPI: it trusts the host's CA bundle (mounted read-only
  # for the RUN steps only: volumes are never committed, so the image keeps Debian's own bundle).
  bh build --isolation chroot --layers=false "$base_pull" \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg "PYTHON_IMAGE=$base" --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" --label "io.canaryd.build.inputs=$inputs" \
    -t "$ref" -f "$repo/Dockerfile" "$repo" >"$cache/build.log" 2>&1 ||
    die "buildah build failed; the last lines of $cache/build.log:" "$(tail -15 "$cache/build.log")"
  seconds=$((SECONDS - t0))
  new=$(bh inspect --type image --format '{{.FromImageID}}' "$ref")
  # The previous build of this name, now untagged: drop it so the storage does not grow.
  if [ -n "$old" ] && [ "$old" != "$new" ]; then bh rmi "$old" >/dev/null 2>&1 || true; fi
  say "built $ref in ${seconds}s"
fi

size=$(bh images --format '{{.Size}}' "$ref" | head -1)
base_size=$(bh images --format '{{.Size}}' "$base" 2>/dev/null | head -1)
python3 - "$figures" <<EOF
import json, sys
json.dump({
    "image": "$ref", "base": "$base", "size": "$size", "base_size": "$base_size",
    "build_seconds": "$seconds", "base_seconds": "$(cat "$cache/base-seconds" 2>/dev/null)",
    "revision": "$revision", "inputs": "$inputs",
    "storage": ["--root", "$cache/storage", "--runroot", "$cache/run", "--storage-driver", "vfs"],
}, open(sys.argv[1], "w"), indent=2)
EOF
say "$ref: $size (base $base: $base_size); figures in $figures"
say "use it: buildah --root $cache/storage --runroot $cache/run --storage-driver vfs images"
if [ -n "${CANARYD_IMAGE_ARCHIVE:-}" ]; then
  rm -f "$CANARYD_IMAGE_ARCHIVE"
  bh push --quiet "$ref" "docker-archive:$CANARYD_IMAGE_ARCHIVE:${ref#localhost/}" >&2
  say "wrote $CANARYD_IMAGE_ARCHIVE (docker load -i $CANARYD_IMAGE_ARCHIVE)"
fi
echo "$ref"
