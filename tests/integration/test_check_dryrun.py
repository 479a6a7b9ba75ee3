"""``canaryd check`` as a first hour needs it (issue 18, items 2 and 3), against the real apiserver,
the chart's own ServiceAccount and a real Prometheus.

- RBAC: check asks exactly what the daemon uses, where it uses it (the Lease in the daemon's lease
  namespace, by name), so the chart's identity passes; each hint names the chart object that really
  grants the permission (proven on the rendered chart, both rbac scopes).
- Dry run: ``--canary``/``--set`` run the daemon's ``admit()`` on values held in memory; the route's
  resourceVersion does not move.
- No series for either backend is a failure, series present are measured; ``-o json`` follows
  docs/check-schema.json and stdout holds nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.preflight import Permission, required_permissions
from canaryd.settings import Settings
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer
from tests.conftest import Stack
from tests.integration.test_chart import SWITCHES, one, render
from tests.integration.test_rbac_proof import Install, apps, chart  # noqa: F401 - fixtures
from tests.kubeobjects import create_backend, create_route, eventually, get_route, route_body

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "check-schema.json").read_text())


async def check(
    *args: str, kubeconfig: Path, env: dict[str, str] | None = None, debug: bool = False
) -> subprocess.CompletedProcess[str]:
    """``python -m canaryd check ...`` (in a thread: the exporter shares this loop) with no CANARYD_*
    of the test run leaking in."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANARYD_") and k not in ("KUBECONFIG", "NO_COLOR")}
    argv = [sys.executable, "-m", "canaryd", *(["--debug"] if debug else []), "check", *args]
    return await asyncio.to_thread(
        subprocess.run,
        [*argv, "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=REPO,
        timeout=60,
        check=False,
    )


def report(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The -o json document: all of stdout, valid against the documented schema."""
    doc: dict[str, Any] = json.loads(out.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    return [f"{f['check']}: {f['message']}" for f in doc["findings"] if not f["ok"]]


# --- 2. the chart's identity, where the daemon acts ----------------------------------------------
def _grants(docs: list[dict[str, Any]], kind: str, name: str, namespace: str | None) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, resourceName or '') of one rendered Role/ClusterRole."""
    found = [
        d
        for d in docs
        if d["kind"] == kind and d["metadata"]["name"] == name and d["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"the chart has no {kind} {name} in {namespace}"
    return {
        (g, r, v, n)
        for rule in found[0]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
        for n in rule.get("resourceNames") or [""]
    }


def _granted_by_chart(p: Permission, docs: list[dict[str, Any]], release_ns: str, scope: str) -> bool:
    """Does the chart object that ``p.grant`` names grant ``p``?"""
    fullname = one(docs, "ServiceAccount")["metadata"]["name"]  # the chart names its objects alike
    want = (p.group, p.resource, p.verb, p.name)
    if p.grant == "lease":
        assert p.namespace == release_ns
        return want in _grants(docs, "Role", f"{fullname}-leader-election", release_ns)
    if scope == "cluster":
        return want in _grants(docs, "ClusterRole", fullname, None)
    assert p.grant == "rules", f"{p}: a cluster-wide permission, which a namespaced install never grants"
    return want in _grants(docs, "Role", fullname, p.namespace)


@pytest.mark.parametrize("case", ["defaults", "namespaced-rbac"])
def test_each_hint_names_the_chart_object_that_grants_it(case: str, tmp_path: Path) -> None:
    """Rendered chart: every permission check asks is granted by the object its hint names, and the
    chart grants nothing check does not ask (what the daemon uses, both ways)."""
    release_ns = "canaryd-system"
    values = SWITCHES[case]
    docs = render(tmp_path, values, namespace=release_ns)
    namespaces = values.get("rbac", {}).get("namespaces", [])
    lease = one(docs, "Role", f"{one(docs, 'ServiceAccount')['metadata']['name']}-leader-election")
    settings = Settings(namespaces=namespaces, lease_namespace=release_ns, lease_name="canaryd-leader")
    asked: set[Permission] = set()
    for route_ns in namespaces or ["shop"]:
        perms = required_permissions(route_ns, settings)
        # list+watch of 3 kinds per watched scope, get+patch+create events here, 3 Lease calls.
        assert len(perms) == 6 * max(1, len(namespaces)) + 3 + 3
        for p in perms:
            assert _granted_by_chart(p, docs, release_ns, "namespaced" if namespaces else "cluster"), p
        asked |= set(perms)
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert lease in roles
    granted = {
        (g, r, v)
        for d in roles
        for g, r, v, _ in _grants(docs, d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
    }
    assert granted == {(p.group, p.resource, p.verb) for p in asked}


async def test_check_as_the_charts_service_account(
    stack: Stack,
    api: client.ApiClient,
    chart: Install,  # noqa: F811 - the fixture imported above
    apps: str,  # noqa: F811
) -> None:
    """The chart's ServiceAccount, its Lease in the release namespace: no false failure."""
    await create_route(api, apps, route_body("ready", annotations={ann.CANARY: "whoami-v2", ann.STEPS: "50,100"}))
    kc = chart.kubeconfig
    lease = ("--lease-namespace", chart.release_ns)
    by_flag, by_env, one_ns, other, elsewhere, single = await asyncio.gather(
        check("ready", "-n", apps, *lease, kubeconfig=kc),
        # The same setting the daemon reads (the chart sets it from the pod's namespace).
        check("ready", "-n", apps, kubeconfig=kc, env={"CANARYD_LEASE_NAMESPACE": chart.release_ns}),
        # Watching one namespace (CANARYD_NAMESPACES, as watchNamespaces renders it): list/watch there.
        check("ready", "-n", apps, *lease, "--watch-namespaces", apps, kubeconfig=kc),
        check("ready", "-n", apps, *lease, "--watch-namespaces", "elsewhere", kubeconfig=kc),
        # A Lease where the chart grants none.
        check("ready", "-n", apps, "--lease-namespace", apps, "-o", "json", kubeconfig=kc),
        # Without leader election there is no Lease to ask about.
        check("ready", "-n", apps, "--no-leader-election", kubeconfig=kc),
    )
    for ok in (by_flag, by_env, one_ns):
        assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all 12 permissions canaryd uses are granted" in by_flag.stdout
    assert f"Lease {chart.release_ns}/canaryd-leader" in by_flag.stdout
    assert other.returncode == 1 and "it would never see httproute" in other.stdout

    # The three Lease calls, each naming the chart's Role that grants them.
    missing = problems(report(elsewhere))
    assert [m.split(";")[0] for m in missing] == [
        f"rbac: missing permission: create leases.coordination.k8s.io in namespace {apps}",
        f"rbac: missing permission: get leases.coordination.k8s.io canaryd-leader in namespace {apps}",
        f"rbac: missing permission: update leases.coordination.k8s.io canaryd-leader in namespace {apps}",
    ]
    assert all("Role <fullname>-leader-election in the release namespace" in m for m in missing)
    assert single.returncode == 0 and "all 9 permissions" in single.stdout, single.stdout


# --- 3. a dry run before the rollout ---------------------------------------------------------------
async def _backends(api: client.ApiClient, namespace: str) -> None:
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)


async def test_dry_run_admits_and_refuses_without_writing(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    await _backends(api, namespace)
    await create_route(api, namespace, route_body("plain", annotations={"team": "shop"}))
    before = await get_route(api, namespace, "plain")
    kc = stack.kubeconfig
    dry = ("plain", "-n", namespace, "--canary", "whoami-v2")
    plain, good, bad, ghost, typo, unseen, seen, refused = await asyncio.gather(
        check("plain", "-n", namespace, kubeconfig=kc),
        check(*dry, "--set", "steps=10,50,100", kubeconfig=kc),
        check(*dry, "--set", "canaryd.io/steps=50,20", "-o", "json", kubeconfig=kc),
        check("plain", "-n", namespace, "--canary", "ghost-v2", "-o", "json", kubeconfig=kc),
        check(*dry, "--set", "stepz=50,100", "-o", "json", kubeconfig=kc),
        # The daemon's label selector (CANARYD_LABEL_SELECTOR), applied by the apiserver.
        check(*dry, "-o", "json", kubeconfig=kc, env={"CANARYD_LABEL_SELECTOR": "app=other"}),
        check(*dry, "-o", "json", kubeconfig=kc, env={"CANARYD_LABEL_SELECTOR": "app=whoami"}),
        check("plain", "-n", namespace, "--set", "state={}", kubeconfig=kc),
    )
    assert plain.returncode == 1 and "--canary <backend>" in plain.stdout

    assert good.returncode == 0, good.stdout + good.stderr
    assert "dry run, nothing written" in good.stdout
    assert "canary whoami-v2, steps 10,50,100 every 60s" in good.stdout

    refusal = report(bad)
    assert refusal["dryRun"] == {"annotations": {ann.STEPS: "50,20", ann.CANARY: "whoami-v2"}}
    assert not refusal["ok"] and any(ann.STEPS in m for m in problems(refusal)), problems(refusal)
    assert any("ghost-v2" in m for m in problems(report(ghost))), ghost.stdout
    assert any("did you mean canaryd.io/steps" in m for m in problems(report(typo))), typo.stdout
    assert any("label selector 'app=other'" in m and "would never see" in m for m in problems(report(unseen)))
    assert report(seen)["ok"], seen.stdout

    assert refused.returncode == 1 and refused.stderr.startswith("error: --set state:")
    assert len(refused.stderr.strip().splitlines()) == 1

    after = await get_route(api, namespace, "plain")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["metadata"]["annotations"] == {"team": "shop"}


# --- 3. no series is a failure; -o json -----------------------------------------------------------------
def _cluster(namespace: str, backend: str) -> str:
    return f"{namespace}/whoami/{namespace}_{backend}_80"  # Cilium's GAMMA cluster, ':' as '_'


async def test_no_series_fails_and_series_are_measured(
    stack: Stack, api: client.ApiClient, namespace: str, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    await _backends(api, namespace)
    await create_route(api, namespace, route_body("whoami"))
    dry = ("--canary", "whoami-v2", "--set", "analysis=envoy", "--prometheus-url", prometheus.url, "-o", "json")

    # Nothing scraped for this namespace: the classic trap, reported as a failure.
    empty = await check("whoami", "-n", namespace, *dry, kubeconfig=stack.kubeconfig)
    assert empty.returncode == 1, empty.stdout + empty.stderr
    doc = report(empty)
    assert doc["analysis"]["signals"][0]["series"] == 0
    [missing] = [m for m in problems(doc) if m.startswith("analysis:")]
    assert "has no series for stable whoami-v1 or canary whoami-v2" in missing
    assert "envoy_cluster_upstream_rq" in missing and "envoy_cluster_pattern" in missing

    # The stable serves traffic (the canary has none yet): measured, not a problem.
    exporter.set_backend(_cluster(namespace, "whoami-v1"), rps=50)
    exporter.set_backend(_cluster(namespace, "whoami-v2"), rps=0)

    async def scraped_twice() -> bool:
        q = f'min(count_over_time(envoy_cluster_upstream_rq_total{{envoy_cluster_name=~"{namespace}/.*"}}[1m]))'
        got = await asyncio.to_thread(prometheus.query, q)
        n = len(
            await asyncio.to_thread(
                prometheus.query, f'envoy_cluster_upstream_rq_total{{envoy_cluster_name=~"{namespace}/.*"}}'
            )
        )
        return n == 2 and bool(got) and float(got[0]["value"][1]) >= 2

    await eventually(scraped_twice, timeout=60, interval=0.3, what="two scrapes of both clusters")
    seen = await check("whoami", "-n", namespace, *dry, kubeconfig=stack.kubeconfig)
    doc = report(seen)
    assert seen.returncode == 0, problems(doc)
    [signal] = doc["analysis"]["signals"]
    assert signal["series"] and signal["series"] >= 2
    assert signal["stable"]["requests"] > 0 and signal["verdict"] == "inconclusive"

    # --debug: the logs go to stderr, stdout is still one JSON document.
    debug = await check("whoami", "-n", namespace, *dry, kubeconfig=stack.kubeconfig, debug=True)
    assert json.loads(debug.stdout)["ok"] is True
    assert "analysis_batch" in debug.stderr
