#!/usr/bin/env bash
# Installs Debian's prometheus (and openssl, used for the devstack's keys) when missing.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v openssl >/dev/null || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-prometheus: missing ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2; exit 1
fi
echo "install-prometheus: installing ${need[*]} from Debian" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package may start a system service on machines with an init; the devstack runs its own.
command -v prometheus >/dev/null || { echo "install-prometheus: prometheus still missing after apt-get" >&2; exit 1; }
