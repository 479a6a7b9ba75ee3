"""charts/canaryd on a devstack: ``helm`` against it, the Prometheus Operator's CRDs, a release's objects.

Used by tests/integration/test_chart_cluster.py (install, upgrade, uninstall on the cluster) and
devkit/image_test.py (the image run with the installed chart's identity). helm is the devstack's
own binary (``Binaries.helm``), with its cache/config/data homes inside the stack directory: no
repository, plugin or kubeconfig of the user's is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devkit import DevstackError
from devkit.devstack.binaries import REPO, Binaries
from devkit.devstack.controlplane import StackInfo, kubectl

CHART = REPO / "charts" / "canaryd"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MONITORING_CRDS = ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com")


def helm(info: StackInfo, *args: str, values: dict[str, Any] | None = None, timeout: float = 240) -> str:
    """Run the devstack's helm against the stack (admin kubeconfig); its stdout, or DevstackError."""
    homes = Path(info.dir) / "helm"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(homes),
        "KUBECONFIG": info.kubeconfig,
        "HELM_CACHE_HOME": str(homes / "cache"),
        "HELM_CONFIG_HOME": str(homes / "config"),
        "HELM_DATA_HOME": str(homes / "data"),
    }
    argv = [str(Path(info.bin_dir) / "helm"), *args]
    if values is not None:
        homes.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
        vf = homes / f"values-{digest}.yaml"
        vf.write_text(yaml.safe_dump(values))
        argv += ["-f", str(vf)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise DevstackError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def install_monitoring_crds(info: StackInfo, b: Binaries) -> None:
    """The Prometheus Operator's own ServiceMonitor and PrometheusRule CRDs (hack/versions.env pins them).

    Applied with kubectl's default field manager and ``--force-conflicts``, so whichever copy of
    these CRDs was applied before (the minimal stand-ins of tests/integration/crds) is replaced.
    """
    kubectl(info, "apply", "--server-side", "--force-conflicts", "-f", str(b.prometheus_operator_crds))
    kubectl(info, "wait", "--for", "condition=Established", "--timeout", "60s", *(f"crd/{c}" for c in MONITORING_CRDS))


@dataclass(frozen=True, order=True)
class Obj:
    kind: str
    namespace: str  # "" for a cluster-scoped object
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


def listable_resources(info: StackInfo) -> list[str]:
    """Every resource type the apiserver serves with ``list``, built-in and custom."""
    out = kubectl(info, "api-resources", "--verbs=list", "-o", "name").stdout.split()
    if not out:
        raise DevstackError("kubectl api-resources listed nothing")
    return sorted(set(out))


def labelled(info: StackInfo, selector: str, resources: list[str] | None = None) -> set[Obj]:
    """Every object of every listable type, namespaced or cluster-scoped, matching ``selector``."""
    kinds = ",".join(resources or listable_resources(info))
    raw = kubectl(info, "get", kinds, "--all-namespaces", "-l", selector, "-o", "json").stdout
    return {Obj(i["kind"], i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in json.loads(raw)["items"]}


def release_objects(info: StackInfo, release: str, resources: list[str] | None = None) -> set[Obj]:
    """What a release left in the cluster: objects with its instance label, and helm's release records."""
    return labelled(info, f"{INSTANCE_LABEL}={release}", resources) | labelled(
        info, f"owner=helm,name={release}", ["secrets", "configmaps"]
    )
