"""Locates (building on first use) the control-plane binaries pinned in hack/versions.env."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from devkit import DevstackError

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-binaries.sh"
NAMES = ("etcd", "kube-apiserver", "kubectl", "helm")


@dataclass(frozen=True)
class Binaries:
    dir: Path

    @property
    def etcd(self) -> Path:
        return self.dir / "etcd"

    @property
    def kube_apiserver(self) -> Path:
        return self.dir / "kube-apiserver"

    @property
    def kubectl(self) -> Path:
        return self.dir / "kubectl"

    @property
    def helm(self) -> Path:
        return self.dir / "helm"

    @property
    def crds(self) -> Path:
        return self.dir / "crds" / "standard"


@cache
def bin_dir() -> Path:
    """The cache dir holding the binaries; runs hack/build-binaries.sh (a no-op when built)."""
    override = os.environ.get("CANARYD_BIN_DIR")
    if override:
        path = Path(override)
    else:
        if not BUILD_SCRIPT.exists():
            raise DevstackError(f"{BUILD_SCRIPT} is missing; run from a canaryd checkout or set CANARYD_BIN_DIR")
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DevstackError(
                "building the control plane binaries failed (hack/build-binaries.sh):\n" + proc.stderr[-4000:]
            )
        path = Path(proc.stdout.strip().splitlines()[-1])
    missing = [n for n in NAMES if not (path / n).exists()]
    if missing or not (path / "crds" / "standard").is_dir():
        raise DevstackError(f"{path} lacks {', '.join(missing) or 'crds/standard'}; rerun hack/build-binaries.sh")
    return path


def binaries() -> Binaries:
    return Binaries(bin_dir())
