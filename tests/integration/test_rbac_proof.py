"""The chart's RBAC, proven by running ``canaryd run`` as its ServiceAccount.

The chart is rendered with ``helm template``; its ServiceAccount, ClusterRole(Binding) and
lease Role(Binding) are server-side applied to the devstack's apiserver (RBAC on), and the daemon
runs as a subprocess with a TokenRequest kubeconfig of that ServiceAccount, watching a separate
namespace of routes (CANARYD_NAMESPACES) and holding its Lease in the release namespace.

1. With the chart's rules the daemon completes a rollout and an abort (rollback) and records
   Events, and never meets a 403.
2. For every verb of every rule: the role is re-applied without that verb, the daemon is started
   again with the same token, and its output must name the refused call (``cannot <verb>
   resource "<resource>" in API group "<group>"``) in the log line of the code path that needs
   it. ``get`` on httproutes is only used to re-read a route after a conflict; a
   ValidatingAdmissionPolicy that refuses the daemon's patches with a "test operation failed"
   message (HTTP 422, what a stale resourceVersion gives) provokes that path deterministically.

docs/rbac.md is the table of what breaks without each rule.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState
from canaryd.kube import api_client
from devkit.devstack.controlplane import free_port
from tests.conftest import Stack
from tests.integration.test_chart import env_of, one, render
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    patch_route,
    route_body,
    route_events,
    weights,
)

REPO = Path(__file__).resolve().parents[2]
GATEWAY = "gateway.networking.k8s.io"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
FIELD_MANAGER = "rbac-proof"
WAIT_S = 90.0  # generous: two cores, other suites running; nothing asserts durations


# --- the installed chart ------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    release_ns: str
    release: str
    docs: list[dict[str, Any]]
    sa: str
    kubeconfig: Path
    cluster_role: dict[str, Any]
    lease_role: dict[str, Any]

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.release_ns}:{self.sa}"

    @property
    def lease_name(self) -> str:
        return str(env_of(self.docs)["CANARYD_LEASE_NAME"])


def _apply(stack: Stack, docs: list[dict[str, Any]]) -> None:
    text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    stack.kubectl(
        "apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}", "-f", "-", input=text
    )


@pytest.fixture(scope="module")
def chart(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """The chart's RBAC objects, applied once; the SA's token is minted once and reused."""
    rel = f"rb-{secrets.token_hex(4)}"
    stack.kubectl("create", "namespace", rel)
    release = f"cd-{rel}"
    docs = render(tmp_path_factory.mktemp("chart"), namespace=rel, release=release)
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    try:
        _apply(stack, rbac)
        sa = one(docs, "ServiceAccount")["metadata"]["name"]
        # The SA exists already; sa_kubeconfig's `create serviceaccount` then fails harmlessly.
        kc = stack.sa_kubeconfig(rel, sa)
        lease_roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == rel]
        assert len(lease_roles) == 1
        yield Install(rel, release, docs, sa, kc, one(docs, "ClusterRole"), lease_roles[0])
    finally:
        for kind in ("clusterrolebinding", "clusterrole"):
            stack.kubectl("delete", kind, release, "--ignore-not-found", check=False)


def _resource(group: str, resource: str) -> str:
    return f"{resource}.{group}" if group else resource


def _can(stack: Stack, inst: Install, verb: str, resource: str, namespace: str) -> bool:
    out = stack.kubectl("auth", "can-i", verb, resource, "-n", namespace, kubeconfig=str(inst.kubeconfig), check=False)
    return out.strip() == "yes"


async def _await_can(stack: Stack, inst: Install, verb: str, resource: str, namespace: str, want: bool) -> None:
    async def check() -> bool:
        return await asyncio.to_thread(_can, stack, inst, verb, resource, namespace) == want

    await eventually(check, timeout=WAIT_S, interval=0.3, what=f"can-i {verb} {resource} -n {namespace} == {want}")


# --- the daemon ---------------------------------------------------------------------------


class Daemon:
    """``canaryd run`` as the chart's ServiceAccount, with the chart's settings file and env."""

    def __init__(self, inst: Install, apps: str, tmp: Path, identity: str) -> None:
        self.identity = identity
        self.port = free_port()
        self.log_path = tmp / f"{identity}.log"
        deploy = one(inst.docs, "Deployment")
        cm_name = next(
            v["configMap"]["name"] for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
        )
        settings_file = tmp / f"{identity}-canaryd.yaml"
        settings_file.write_text(one(inst.docs, "ConfigMap", cm_name)["data"]["canaryd.yaml"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYD_") and k != "KUBECONFIG"}
        for name, value in env_of(inst.docs).items():  # what the pod gets, field refs resolved
            if isinstance(value, dict):
                value = {"metadata.name": identity, "metadata.namespace": inst.release_ns}[
                    value["fieldRef"]["fieldPath"]
                ]
            env[name] = str(value)
        env |= {
            "CANARYD_CONFIG_FILE": str(settings_file),
            "CANARYD_NAMESPACES": json.dumps([apps]),
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(self.port),
            "CANARYD_LOG_FORMAT": "json",
            "CANARYD_LEASE_DURATION_S": "4",
            "CANARYD_LEASE_RENEW_S": "1",
        }
        assert env["CANARYD_LEASE_NAMESPACE"] == inst.release_ns
        assert env["CANARYD_LEASE_NAME"] == inst.lease_name
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "canaryd", "run", "--kubeconfig", str(inst.kubeconfig)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=20)
        finally:
            self.log.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(timeout=20)
            d.log.close()


def _plain(s: str) -> str:
    """Drop JSON/repr escaping so the apiserver's quoted names can be matched."""
    return s.replace("\\", "")


def _state(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


async def _phase(api: client.ApiClient, ns: str, name: str, phase: Phase) -> RolloutState | None:
    st = _state(await get_route(api, ns, name))
    return st if st is not None and st.phase == phase else None


@pytest.fixture
async def apps(api: client.ApiClient, namespace: str) -> str:
    """The namespace of the routes (the daemon's CANARYD_NAMESPACES), with three backends."""
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)
    return namespace


def _rollout(name: str, steps: str, interval: str) -> dict[str, Any]:
    return route_body(name, annotations={ann.CANARY: "whoami-v2", ann.STEPS: steps, ann.INTERVAL: interval})


# --- 1. the chart's rules are enough ------------------------------------------------------


async def test_chart_rbac_runs_rollout_and_rollback(
    stack: Stack, api: client.ApiClient, chart: Install, apps: str, daemons: list[Daemon], tmp_path: Path
) -> None:
    await create_route(api, apps, _rollout("whoami", "50,100", "1s"))
    await create_route(api, apps, _rollout("whoami-abort", "10,50,100", "1h"))
    d = Daemon(chart, apps, tmp_path, "proof-full")
    daemons.append(d)

    final = await eventually(
        lambda: _phase(api, apps, "whoami", Phase.PROMOTED), timeout=WAIT_S, interval=0.3, what="whoami Promoted"
    )
    assert final.canary_weight == 100
    assert weights(await get_route(api, apps, "whoami")) == {"whoami-v1": 0, "whoami-v2": 100}

    # Mid-rollout (first step, an hour to go) the user aborts: RolledBack, all traffic to stable.
    mid = await eventually(
        lambda: _phase(api, apps, "whoami-abort", Phase.PROGRESSING),
        timeout=WAIT_S,
        interval=0.3,
        what="abort route at step 1",
    )
    assert mid.canary_weight == 10
    assert weights(await get_route(api, apps, "whoami-abort")) == {"whoami-v1": 90, "whoami-v2": 10}
    await patch_route(api, apps, "whoami-abort", {"metadata": {"annotations": {ann.INTENT: "abort"}}})
    await eventually(
        lambda: _phase(api, apps, "whoami-abort", Phase.ROLLED_BACK), timeout=WAIT_S, interval=0.3, what="RolledBack"
    )
    route = await get_route(api, apps, "whoami-abort")
    assert weights(route) == {"whoami-v1": 100, "whoami-v2": 0}
    assert ann.INTENT not in (route["metadata"].get("annotations") or {}), "the intent was consumed"

    # Events were created (core/v1, in the routes' namespace) by the daemon.
    async def reasons(name: str, want: str) -> list[str] | None:
        got = [e.reason for e in await route_events(api, apps, name)]
        return got if want in got else None

    promoted = await eventually(lambda: reasons("whoami", "Promoted"), timeout=WAIT_S, what="Promoted event")
    aborted = await eventually(lambda: reasons("whoami-abort", "Aborted"), timeout=WAIT_S, what="Aborted event")
    assert promoted and aborted
    for e in await route_events(api, apps, "whoami"):
        assert e.reporting_component == "canaryd" and e.involved_object.kind == "HTTPRoute"

    # It held the chart's Lease in the release namespace, and met no 403 on the way.
    lease = await client.CoordinationV1Api(api).read_namespaced_lease(chart.lease_name, chart.release_ns)
    assert lease.spec.holder_identity == "proof-full"
    assert d.stop() == 0
    out = _plain(d.text())
    assert "forbidden" not in out.lower(), out[-4000:]
    recs = d.records()
    assert any(r.get("event") == "leader_elected" for r in recs)
    for bad in ("watch_failed", "lease_renew_failed", "event_failed", "reconcile_failed"):
        assert not [r for r in recs if r.get("event") == bad], f"{bad} with the chart's full rules"


# --- 2. every verb is needed ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    role: str  # "cluster" (the ClusterRole) or "lease" (the leader-election Role)
    group: str
    resource: str
    verb: str
    where: str  # the log event naming the refused call (the daemon keeps running and retries)
    conflict: bool = False  # provoke a conflicting patch (the only path that GETs a route)

    @property
    def id(self) -> str:
        return f"{self.resource}-{self.verb}"

    @property
    def phrase(self) -> str:
        return f'cannot {self.verb} resource "{self.resource}" in API group "{self.group}"'


CASES = [
    Case("cluster", GATEWAY, "httproutes", "list", "watch_failed"),
    Case("cluster", GATEWAY, "httproutes", "watch", "watch_failed"),
    Case("cluster", GATEWAY, "httproutes", "patch", "reconcile_failed"),
    Case("cluster", GATEWAY, "httproutes", "get", "reconcile_failed", conflict=True),
    Case("cluster", "", "services", "list", "watch_failed"),
    Case("cluster", "", "services", "watch", "watch_failed"),
    Case("cluster", "discovery.k8s.io", "endpointslices", "list", "watch_failed"),
    Case("cluster", "discovery.k8s.io", "endpointslices", "watch", "watch_failed"),
    Case("cluster", "", "events", "create", "event_failed"),
    Case("lease", "coordination.k8s.io", "leases", "create", "lease_renew_failed"),
    Case("lease", "coordination.k8s.io", "leases", "get", "lease_renew_failed"),
    Case("lease", "coordination.k8s.io", "leases", "update", "lease_renew_failed"),
]


def _verbs(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }


def test_every_granted_verb_has_a_case(tmp_path: Path) -> None:
    """A rule added to the chart without a proof case here fails (and vice versa)."""
    docs = render(tmp_path)
    granted = {("cluster", *t) for t in _verbs(one(docs, "ClusterRole"))}
    granted |= {("lease", *t) for t in _verbs(one(docs, "Role"))}
    assert {(c.role, c.group, c.resource, c.verb) for c in CASES} == granted


def _without(role: dict[str, Any], case: Case) -> dict[str, Any]:
    out = {
        "apiVersion": role["apiVersion"],
        "kind": role["kind"],
        "metadata": {k: v for k, v in role["metadata"].items() if k in {"name", "namespace", "labels"}},
        "rules": [],
    }
    removed = 0
    for rule in copy.deepcopy(role["rules"]):
        if case.group in rule["apiGroups"] and case.resource in rule["resources"] and case.verb in rule["verbs"]:
            assert rule["apiGroups"] == [case.group] and rule["resources"] == [case.resource], rule
            rule["verbs"] = [v for v in rule["verbs"] if v != case.verb]
            removed += 1
        if rule["verbs"]:
            out["rules"].append(rule)
    assert removed == 1, f"{case.id}: expected exactly one rule granting it"
    return out


def _conflict_policy(name: str, apps: str, user: str) -> list[dict[str, Any]]:
    """Refuse the daemon's route patches the way a stale resourceVersion would (422, test failed)."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GATEWAY],
                            "apiVersions": ["v1"],
                            "operations": ["UPDATE"],
                            "resources": ["httproutes"],
                        }
                    ]
                },
                "matchConditions": [
                    {
                        "name": "canaryd-here",
                        "expression": f"request.namespace == '{apps}' && request.userInfo.username == '{user}'",
                    }
                ],
                "validations": [
                    {
                        "expression": "false",
                        "reason": "Invalid",
                        "message": "injected conflict: JSON patch test operation failed",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]


async def _install_conflict(stack: Stack, inst: Install, apps: str, route: str) -> str:
    name = f"canaryd-conflict-{apps}"
    await asyncio.to_thread(_apply, stack, _conflict_policy(name, apps, inst.user))
    probe = [{"op": "add", "path": "/metadata/annotations/probe", "value": "x"}]

    async def active() -> bool:
        # A server-side dry-run patch as the ServiceAccount (kubectl patch would GET first).
        async with api_client(str(inst.kubeconfig)) as sa_api:
            try:
                await client.CustomObjectsApi(sa_api).patch_namespaced_custom_object(
                    GATEWAY, "v1", apps, "httproutes", route, probe, dry_run="All"
                )
            except client.ApiException as exc:
                return exc.status == 422 and "injected conflict" in str(exc.body)
        return False

    await eventually(active, timeout=WAIT_S, interval=0.3, what="the conflict policy refusing the SA's patches")
    return name


def _named(d: Daemon, case: Case) -> str | None:
    """The output naming the refused call where the case expects it, else None."""
    if case.where == "exit":
        text = _plain(d.text())
        return text if case.phrase in text and d.proc.poll() is not None else None
    for rec in d.records():
        if rec.get("event") == case.where:
            line = _plain(json.dumps(rec))
            if case.phrase in line:
                return line
    return None


async def _wait_named(d: Daemon, case: Case) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = _named(d, case)
        if found:
            return found
        if d.proc.poll() is not None:
            await asyncio.sleep(0.5)  # let the last lines land
            found = _named(d, case)
            break
        await asyncio.sleep(0.2)
    assert found, (
        f"{case.id}: no {case.where!r} output naming {case.phrase!r} "
        f"(exit code {d.proc.poll()}); daemon output:\n{_plain(d.text())[-6000:]}"
    )
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_each_rule_is_needed(
    case: Case, stack: Stack, api: client.ApiClient, chart: Install, apps: str, daemons: list[Daemon], tmp_path: Path
) -> None:
    full = chart.cluster_role if case.role == "cluster" else chart.lease_role
    if case.role == "cluster":
        can = (case.verb, _resource(case.group, case.resource), apps)
    elif case.verb == "create":
        can = (case.verb, _resource(case.group, case.resource), chart.release_ns)
    else:  # get/update are granted on the chart's Lease name only
        can = (case.verb, f"{_resource(case.group, case.resource)}/{chart.lease_name}", chart.release_ns)
    await create_route(api, apps, _rollout("whoami", "50,100", "1s"))
    policy = None
    coord = client.CoordinationV1Api(api)
    try:
        with_lease = await coord.list_namespaced_lease(chart.release_ns)
        for lease in with_lease.items:  # every case starts without a Lease (the create path)
            await coord.delete_namespaced_lease(lease.metadata.name, chart.release_ns)
        await asyncio.to_thread(_apply, stack, [_without(full, case)])
        await _await_can(stack, chart, *can, want=False)
        if case.conflict:
            policy = await _install_conflict(stack, chart, apps, "whoami")

        d = Daemon(chart, apps, tmp_path, f"proof-{case.id}")
        daemons.append(d)
        line = await _wait_named(d, case)
        assert case.phrase in line and chart.user in line

        route = await get_route(api, apps, "whoami")
        assert d.proc.poll() is None, "a refused call is the cluster's weather: the daemon retries, it does not exit"
        if case.verb in ("patch", "list") or (case.resource == "leases" and case.verb != "update"):
            # No progress: never led, never listed, or every patch refused.
            assert _state(route) is None and weights(route) == {"whoami-v1": 100, "whoami-v2": 0}
        if case.resource == "events":
            assert await route_events(api, apps, "whoami") == []
        d.stop()
    finally:
        if policy is not None:
            for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
                await asyncio.to_thread(stack.kubectl, "delete", kind, policy, "--ignore-not-found", check=False)
        await asyncio.to_thread(_apply, stack, [full])
        await _await_can(stack, chart, *can, want=True)


async def test_conflict_path_rereads_with_get(
    stack: Stack, api: client.ApiClient, chart: Install, apps: str, daemons: list[Daemon], tmp_path: Path
) -> None:
    """Control for the httproutes-get case: with the full rules the injected conflict is retried
    through GETs (``conflict_rereading``), and nothing is forbidden."""
    await create_route(api, apps, _rollout("whoami", "50,100", "1s"))
    policy = await _install_conflict(stack, chart, apps, "whoami")
    try:
        d = Daemon(chart, apps, tmp_path, "proof-conflict-control")
        daemons.append(d)

        async def exhausted() -> bool:
            return any(r.get("event") == "conflict_retries_exhausted" for r in d.records())

        await eventually(exhausted, timeout=WAIT_S, interval=0.2, what="conflict retries (re-read by GET) exhausted")
        d.stop()
        recs = d.records()
        rereads = [r for r in recs if r.get("event") == "conflict_rereading"]
        assert rereads and all("test operation" in r["error"] for r in rereads)
        # (the policy's own denial reads "is forbidden: ValidatingAdmissionPolicy ..."; RBAC's reads "cannot")
        assert "cannot get resource" not in _plain(d.text()) and "User " not in _plain(d.text())
        assert not [r for r in recs if r.get("event") == "reconcile_failed"]
    finally:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            await asyncio.to_thread(stack.kubectl, "delete", kind, policy, "--ignore-not-found", check=False)
