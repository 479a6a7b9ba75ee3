"""The ground everything stands on: real apiserver + CRDs, RBAC, Prometheus, the devstack command."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, new_client
from tests.conftest import Stack

REPO = Path(__file__).resolve().parents[2]


def gamma_route(name: str, weights: tuple[int, int] = (90, 10)) -> dict[str, Any]:
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "whoami", "port": 80}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": "whoami-v1", "port": 80, "weight": weights[0]},
                        {"name": "whoami-v2", "port": 80, "weight": weights[1]},
                    ]
                }
            ],
        },
    }


async def test_gamma_route_roundtrip_and_crd_validation(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    await co.create_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, gamma_route("whoami")
    )
    got = await co.get_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, "whoami")
    assert got["spec"]["parentRefs"][0]["kind"] == "Service"
    assert [b["weight"] for b in got["spec"]["rules"][0]["backendRefs"]] == [90, 10]

    with pytest.raises(ApiException) as err:
        await co.create_namespaced_custom_object(
            GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, gamma_route("too-heavy", (1_000_001, 0))
        )
    assert err.value.status == 422
    assert "1000000" in err.value.body or "1e+06" in err.value.body


async def test_rbac_is_enforced(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    sa_config = stack.sa_kubeconfig(namespace, "reader")
    sa_api = await new_client(str(sa_config))
    try:
        co = client.CustomObjectsApi(sa_api)
        with pytest.raises(ApiException) as err:
            await co.list_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES)
        assert err.value.status == 403

        rbac = client.RbacAuthorizationV1Api(api)
        await rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="routes-reader"),
                rules=[client.V1PolicyRule(api_groups=[GATEWAY_GROUP], resources=[HTTPROUTES], verbs=["get", "list"])],
            ),
        )
        await rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="routes-reader"),
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="routes-reader"),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
            ),
        )
        deadline = time.monotonic() + 10
        while True:  # the RBAC authorizer's cache catches up within a moment
            try:
                listed = await co.list_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES)
                break
            except ApiException as exc:
                if exc.status != 403 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert listed["items"] == []
    finally:
        await sa_api.close()


def _processes_under(directory: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(directory) in line and "ps -eo" not in line]


def test_devstack_up_twice_in_parallel_then_down_leaves_nothing() -> None:
    dirs = [Path(tempfile.mkdtemp(prefix="canaryd-ds-")) for _ in range(2)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "canaryd", "devstack", "up", "--dir", str(d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for d in dirs
    ]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            assert "devstack ready" in out
        for d in dirs:
            env_file = (d / "env").read_text()
            assert "KUBECONFIG=" in env_file and "PROMETHEUS_URL=" in env_file
            st = subprocess.run(
                [sys.executable, "-m", "canaryd", "devstack", "status", "--dir", str(d)],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=False,
            )
            assert st.returncode == 0, st.stdout + st.stderr
            # Each stack answers on its own port.
            kubeconfig = str(d / "kubeconfig")
            bin_dir = Path(__import__("json").loads((d / "stack.json").read_text())["bin_dir"])
            got = subprocess.run(
                [
                    str(bin_dir / "kubectl"),
                    "--kubeconfig",
                    kubeconfig,
                    "get",
                    "crd",
                    "httproutes.gateway.networking.k8s.io",
                    "-o",
                    "name",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert got.returncode == 0, got.stderr
        servers = {(d / "kubeconfig").read_text().split("server: ")[1].split()[0] for d in dirs}
        assert len(servers) == 2
    finally:
        for d in dirs:
            subprocess.run(
                [sys.executable, "-m", "canaryd", "devstack", "down", "--dir", str(d)],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=False,
            )
    for d in dirs:
        assert _processes_under(d) == [], f"processes left behind for {d}"


async def test_prometheus_scrapes_a_test_target(prometheus: Any, exporter: Any) -> None:
    # The exporter fixture registered a file_sd target and waited for it; read `up` back via PromQL.
    async def up() -> list[dict[str, Any]] | None:
        res = await asyncio.to_thread(prometheus.query, f'up{{instance="{exporter.address}"}}')
        return res if res and res[0]["value"][1] == "1" else None

    deadline = time.monotonic() + 10
    while (res := await up()) is None:
        assert time.monotonic() < deadline, "Prometheus did not report the test target up"
        await asyncio.sleep(0.5)
    assert res[0]["metric"]["instance"] == exporter.address
