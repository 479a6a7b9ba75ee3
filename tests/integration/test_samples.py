"""The shipped manifests against the real schemas and the real controllers.

Every YAML under config/ goes through server-side apply with strict field validation, so the
Gateway API CRDs and Cilium's CRDs (installed by the devstack from their modules) judge them,
not a schema copy of ours. The workload sample is then applied for real: kube-controller-manager
makes the Pods, the scheduler binds them to kwok's Node, kwok runs them to Ready and the real
EndpointSlice controller lists them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devkit.devstack import controlplane
from devkit.devstack.controllers import NODE_NAME, POD_CIDR
from tests.conftest import Stack

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted(
    [*REPO.glob("config/samples/**/*.yaml"), REPO / "config" / "cilium-network-policy.yaml"],
    key=lambda p: p.as_posix(),
)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_manifest_is_accepted_by_the_real_schema(stack: Stack, namespace: str, path: Path) -> None:
    out = stack.kubectl(
        "apply", "--server-side", "--dry-run=server", "--field-manager=samples-test", "-n", namespace, "-f", str(path)
    )
    assert "serverside-applied" in out, out


def test_a_typo_is_refused_by_the_cilium_schema(stack: Stack, namespace: str) -> None:
    """Proves the check above has teeth: the CRDs' schemas are really there."""
    good = (REPO / "config" / "samples" / "cilium" / "policies.yaml").read_text()
    bad = good.replace("endpointSelector", "endpointSelectr", 1)
    proc = controlplane.kubectl(
        stack.info, "apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-", input=bad, check=False
    )
    assert proc.returncode != 0
    assert ".spec.endpointSelectr: field not declared in schema" in proc.stderr, proc.stderr


def test_the_seed_workload_runs_on_the_kwok_node(stack: Stack, namespace: str) -> None:
    stack.kubectl("apply", "--server-side", "-n", namespace, "-f", str(REPO / "config" / "samples" / "whoami.yaml"))
    stack.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Available",
        "--timeout=60s",
        "deployment/whoami-v1",
        "deployment/whoami-v2",
    )
    pods = json.loads(stack.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
    assert pods and all(p["spec"]["nodeName"] == NODE_NAME for p in pods)
    assert all(p["status"]["podIP"].startswith(POD_CIDR.split(".0.0/")[0] + ".") for p in pods)
    v2_ips = sorted(p["status"]["podIP"] for p in pods if p["metadata"]["labels"]["app.kubernetes.io/version"] == "v2")
    assert len(v2_ips) == 2
    _until(lambda: _ready(stack, namespace, "whoami-v2") == v2_ips, "the EndpointSlice controller listing v2's Pods")
    stack.kubectl("scale", "-n", namespace, "deployment/whoami-v2", "--replicas=0")
    _until(lambda: _ready(stack, namespace, "whoami-v2") == [], "the EndpointSlice controller dropping v2's Pods")


def _ready(stack: Stack, namespace: str, service: str) -> list[str]:
    out = stack.kubectl(
        "get", "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}", "-o", "json"
    )
    return sorted(
        a
        for s in json.loads(out)["items"]
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready", True)
        for a in e["addresses"]
    )


def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
