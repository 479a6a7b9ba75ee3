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
NAMES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "helm",
    "kwok",
    "daprd",
    "sentry",
)
DIRS = ("crds/standard", "crds/cilium", "crds/prometheus-operator", "kwok-stages")


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
    def kube_controller_manager(self) -> Path:
        return self.dir / "kube-controller-manager"

    @property
    def kube_scheduler(self) -> Path:
        return self.dir / "kube-scheduler"

    @property
    def kwok(self) -> Path:
        return self.dir / "kwok"

    @property
    def daprd(self) -> Path:
        return self.dir / "daprd"

    @property
    def sentry(self) -> Path:
        return self.dir / "sentry"

    @property
    def crds(self) -> Path:
        return self.dir / "crds" / "standard"

    @property
    def cilium_crds(self) -> Path:
        return self.dir / "crds" / "cilium"

    @property
    def prometheus_operator_crds(self) -> Path:
        """The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs (the chart's optional objects)."""
        return self.dir / "crds" / "prometheus-operator"

    @property
    def kwok_stages(self) -> Path:
        """kwok's default stages (node-initialize, heartbeat, pod-ready/complete/delete) from its module."""
        return self.dir / "kwok-stages"


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
    missing = [n for n in NAMES if not (path / n).exists()] + [d for d in DIRS if not (path / d).is_dir()]
    if missing:
        raise DevstackError(f"{path} lacks {', '.join(missing)}; rerun hack/build-binaries.sh")
    return path


def binaries() -> Binaries:
    return Binaries(bin_dir())
