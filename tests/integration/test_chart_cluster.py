"""charts/canaryd installed with ``helm`` on the devstack's cluster (kube-controller-manager,
kube-scheduler and kwok's fake Node): the objects a user's ``helm install`` creates, as the real
apiserver accepts and the real controllers act on them.

* The Prometheus Operator's own ServiceMonitor and PrometheusRule CRDs (pinned in hack/versions.env,
  copied from its Go module by hack/build-binaries.sh) accept the chart's objects, and refuse a
  broken one (the schema has teeth).
* The Deployment's Pods are scheduled on ``kwok-node-0`` and go Ready; the Service's EndpointSlice
  (written by the EndpointSlice controller) lists exactly their addresses; the disruption
  controller counts them for the PDB.
* ``helm upgrade`` rolls the Pods (settings checksum) and removes what was switched off;
  ``helm uninstall`` leaves nothing: every namespaced and cluster-scoped object of every listable
  type is listed by the release's label before, between and after.

No container runs (kwok plays the kubelet): ``make image-test`` (devkit/image_test.py) runs the
image's process with this chart's identity.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import yaml

from devkit import DevstackError
from devkit.devstack import chart
from devkit.devstack.binaries import Binaries
from devkit.devstack.chart import Obj
from devkit.devstack.controllers import NODE_NAME
from tests.conftest import Stack
from tests.kubeobjects import eventually

T = TypeVar("T")
WAIT_S = 90.0  # generous: two cores, other suites running; nothing asserts durations
VALUES: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "prometheusRule": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "dashboard": {"enabled": True},
}
UPGRADE: dict[str, Any] = VALUES | {"prometheusRule": {"enabled": False}, "replicaCount": 3, "logLevel": "debug"}


async def _run(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kw)


async def _helm(stack: Stack, verb: str, release: str, ns: str, values: dict[str, Any] | None = None) -> None:
    chart_dir = [] if verb == "uninstall" else [str(chart.CHART)]
    args = [verb, release, *chart_dir, "-n", ns, "--wait", "--timeout", "120s"]
    await _run(chart.helm, stack.info, *args, values=values)


def _get(stack: Stack, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(stack.kubectl("get", *args, "-o", "json"))
    return out


def _manifest(stack: Stack, release: str, ns: str) -> set[Obj]:
    text = chart.helm(stack.info, "get", "manifest", release, "-n", ns)
    return {
        Obj(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in yaml.safe_load_all(text) if d
    }


def _pods(stack: Stack, release: str, ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = _get(stack, "pods", "-n", ns, "-l", f"{chart.INSTANCE_LABEL}={release}")["items"]
    return items


def _ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return pod["status"].get("phase") == "Running" and conds.get("Ready") == "True"


async def _settled(stack: Stack, release: str, ns: str, replicas: int) -> list[dict[str, Any]]:
    """The release's Pods once exactly ``replicas`` of them are Ready and no other is left."""

    async def check() -> list[dict[str, Any]] | None:
        pods = await _run(_pods, stack, release, ns)
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return live if len(pods) == replicas and all(_ready(p) for p in live) else None

    return await eventually(check, timeout=WAIT_S, interval=0.3, what=f"{replicas} Ready pods of {release}")


def _expected(stack: Stack, release: str, ns: str, pods: list[dict[str, Any]], revisions: int) -> set[Obj]:
    """helm's manifest, plus what the controllers made of it and helm's release records."""
    rs = _get(stack, "replicasets", "-n", ns, "-l", f"{chart.INSTANCE_LABEL}={release}")["items"]
    slices = _get(stack, "endpointslices", "-n", ns, "-l", f"{chart.INSTANCE_LABEL}={release}")["items"]
    assert len(slices) == 1, slices
    manifest = _manifest(stack, release, ns)
    [svc] = [o for o in manifest if o.kind == "Service"]
    return (
        manifest
        | {Obj("Endpoints", ns, svc.name)}  # the (legacy) Endpoints controller's mirror of the Service
        | {Obj("Pod", ns, p["metadata"]["name"]) for p in pods}
        | {Obj("ReplicaSet", ns, r["metadata"]["name"]) for r in rs}
        | {Obj("EndpointSlice", ns, slices[0]["metadata"]["name"])}
        | {Obj("Secret", ns, f"sh.helm.release.v1.{release}.v{n}") for n in range(1, revisions + 1)}
    )


def _check_pods(stack: Stack, release: str, ns: str, pods: list[dict[str, Any]]) -> None:
    deploy = _get(stack, "deployment", "-n", ns, "-l", f"{chart.INSTANCE_LABEL}={release}")["items"][0]
    template = deploy["spec"]["template"]
    for p in pods:
        assert p["spec"]["nodeName"] == NODE_NAME
        assert p["spec"]["serviceAccountName"] == template["spec"]["serviceAccountName"]
        assert p["metadata"]["annotations"]["checksum/config"] == template["metadata"]["annotations"]["checksum/config"]
        [c] = p["spec"]["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["runAsUser"] == 65532
    # The Service selects exactly these Pods: the EndpointSlice controller lists their IPs as ready.
    [sl] = _get(stack, "endpointslices", "-n", ns, "-l", f"{chart.INSTANCE_LABEL}={release}")["items"]
    ready = sorted(a for e in sl["endpoints"] if e["conditions"].get("ready") for a in e["addresses"])
    assert ready == sorted(p["status"]["podIP"] for p in pods)
    assert [pt["name"] for pt in sl["ports"]] == ["http-metrics"]


async def _pdb_counts(stack: Stack, release: str, ns: str, healthy: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        [pdb] = (await _run(_get, stack, "pdb", "-n", ns, "-l", f"{chart.INSTANCE_LABEL}={release}"))["items"]
        st: dict[str, Any] = pdb.get("status", {})
        return st if st.get("currentHealthy") == healthy and st.get("expectedPods") == healthy else None

    return await eventually(check, timeout=WAIT_S, interval=0.3, what=f"PDB counting {healthy} healthy pods")


def _check_monitoring(stack: Stack, release: str, ns: str) -> None:
    """The ServiceMonitor, as stored under the real CRD, scrapes this release's Service by port name."""
    sel = f"{chart.INSTANCE_LABEL}={release}"
    [sm] = _get(stack, "servicemonitors.monitoring.coreos.com", "-n", ns, "-l", sel)["items"]
    [svc] = _get(stack, "services", "-n", ns, "-l", sel)["items"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [ns]
    [rule] = _get(stack, "prometheusrules.monitoring.coreos.com", "-n", ns, "-l", sel)["items"]
    assert all(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])


async def _gone(stack: Stack, release: str, resources: list[str]) -> bool:
    left = await _run(chart.release_objects, stack.info, release, resources)
    return not left


@pytest.fixture(scope="module")
def monitoring_crds(stack: Stack) -> None:
    chart.install_monitoring_crds(stack.info, Binaries(stack.bin_dir))


async def test_install_upgrade_uninstall(stack: Stack, namespace: str, monitoring_crds: None) -> None:
    ns, release = namespace, f"cd-{namespace}"
    resources = await _run(chart.listable_resources, stack.info)
    assert "servicemonitors.monitoring.coreos.com" in resources and "poddisruptionbudgets.policy" in resources
    assert await _run(chart.release_objects, stack.info, release, resources) == set()

    await _helm(stack, "install", release, ns, VALUES)
    pods = await _settled(stack, release, ns, 2)
    _check_pods(stack, release, ns, pods)
    _check_monitoring(stack, release, ns)
    assert (await _pdb_counts(stack, release, ns, 2))["disruptionsAllowed"] == 1
    installed = await _run(chart.release_objects, stack.info, release, resources)
    assert installed == _expected(stack, release, ns, pods, revisions=1)
    kinds = {o.kind for o in installed}
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap"):
        assert kind in kinds
    assert {"PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "Deployment", "Service"} <= kinds
    assert {o.namespace for o in installed} == {"", ns}  # cluster-scoped RBAC and the release namespace only

    # Upgrade: a settings change rolls the Pods, three replicas, the PrometheusRule switched off.
    await _helm(stack, "upgrade", release, ns, UPGRADE)
    pods = await _settled(stack, release, ns, 3)
    _check_pods(stack, release, ns, pods)
    assert (await _pdb_counts(stack, release, ns, 3))["disruptionsAllowed"] == 2
    upgraded = await _run(chart.release_objects, stack.info, release, resources)
    assert upgraded == _expected(stack, release, ns, pods, revisions=2)
    assert "PrometheusRule" not in {o.kind for o in upgraded}
    assert {o.name for o in installed if o.kind == "Pod"}.isdisjoint({o.name for o in upgraded if o.kind == "Pod"})

    # Uninstall: the garbage collector takes the ReplicaSets, Pods and the EndpointSlice after helm.
    await _helm(stack, "uninstall", release, ns)
    await eventually(lambda: _gone(stack, release, resources), timeout=WAIT_S, interval=0.5, what="nothing left")
    assert await _run(chart.release_objects, stack.info, release, resources) == set()


def _dry_run(stack: Stack, doc: dict[str, Any]) -> str:
    try:
        stack.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(doc))
    except DevstackError as exc:
        return str(exc)
    return ""


async def test_real_crds_refuse_broken_objects(stack: Stack, namespace: str, monitoring_crds: None) -> None:
    """The negative control: the stand-in CRDs preserve unknown fields; the operator's validate."""
    meta = {"name": "broken", "namespace": namespace}
    sm = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {"selector": {}, "endpoints": [{"port": "http-metrics", "interval": "often"}]},
    }
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta,
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]},
    }
    errors: list[Awaitable[str]] = [_run(_dry_run, stack, sm), _run(_dry_run, stack, rule)]
    sm_err, rule_err = await asyncio.gather(*errors)
    assert "spec.endpoints[0].interval" in sm_err and "should match" in sm_err, sm_err
    assert "expr" in rule_err and "Required value" in rule_err, rule_err
    sm["spec"]["endpoints"][0]["interval"] = "30s"
    assert await _run(_dry_run, stack, sm) == ""
