"""The demo data plane against the real apiserver: weighted split, live weight change without a
lost request, retry on a dead endpoint, Envoy/Dapr-shaped metrics that add up, the Gateway
listener with its URLRewrite, and Pods (real Deployments, kwok, the real EndpointSlice
controller) served by the pod runner's local processes.

Tolerances: the share of a backend over n answered requests is binomial; we accept
|observed - p| <= 4 * sqrt(p (1 - p) / n) (a false failure about 1 run in 15,000).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client

from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from devkit.demo.dataplane import DataPlane, apply_local_backend, apply_local_daprd, cluster_name
from devkit.demo.envoy_stats import gateway_parent
from devkit.demo.loadgen import run_load
from devkit.demo.whoami import Whoami, WhoamiConfig
from tests.conftest import Stack
from tests.kubeobjects import eventually, scale

pytestmark = pytest.mark.integration

SIGMAS = 4.0


def assert_share(observed: float, expected: float, n: int, what: str) -> None:
    tol = SIGMAS * math.sqrt(expected * (1 - expected) / n)
    assert abs(observed - expected) <= tol, (
        f"{what}: share {observed:.3f}, expected {expected:.3f} ± {tol:.3f} over {n} requests"
    )


def gamma_route(weights: tuple[int, int]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": "whoami", "annotations": {"canaryd.io/app-id": "whoami"}},
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


async def set_weights(api: client.ApiClient, namespace: str, old: tuple[int, int], new: tuple[int, int]) -> None:
    """A JSON patch guarded by test ops, as canaryd's route adapter would write it."""
    ops: list[dict[str, Any]] = []
    for i, (o, n) in enumerate(zip(old, new, strict=True)):
        path = f"/spec/rules/0/backendRefs/{i}/weight"
        ops += [{"op": "test", "path": path, "value": o}, {"op": "replace", "path": path, "value": n}]
    await client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GATEWAY_GROUP,
        GATEWAY_VERSION,
        namespace,
        HTTPROUTES,
        "whoami",
        ops,
        _content_type="application/json-patch+json",
    )


async def create_route(api: client.ApiClient, namespace: str, weights: tuple[int, int]) -> None:
    # The parent Service: selector-less, never has endpoints; it only names the GAMMA parent.
    await client.CoreV1Api(api).create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="whoami"),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(name="http", port=80)]),
        ),
    )
    await client.CustomObjectsApi(api).create_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, gamma_route(weights)
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


async def scrape(url: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """Samples by the name written, as Prometheus reads them (prometheus_client's parser would
    fold Envoy's ``envoy_cluster_upstream_rq`` counter into ``..._rq_total``)."""
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = defaultdict(dict)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is not None and not line.startswith("#"):
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            out[m.group(1)][labels] = float(m.group(3))
    return out


def pick(series: dict[frozenset[tuple[str, str]], float], **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in series.items() if want <= k)


async def test_split_follows_weight_patch_without_losing_requests(
    stack: Stack,
    api: client.ApiClient,
    namespace: str,
) -> None:
    async with Whoami(WhoamiConfig(name="v1")) as v1, Whoami(WhoamiConfig(name="v2")) as v2:
        await apply_local_backend(api, namespace, "whoami-v1", [v1.port])
        await apply_local_backend(api, namespace, "whoami-v2", [v2.port])
        await create_route(api, namespace, (80, 20))

        async with DataPlane(str(stack.kubeconfig), namespace, listen={"whoami": 0}, seed=7) as dp:
            url = dp.url("whoami") + "/"

            # 1. 80/20: 400 requests.
            first = await run_load(url, rate=200, duration_s=2.0, concurrency=16)
            assert first.sent == 400
            assert first.errors == 0 and first.answered == 400, first.by_status
            assert first.by_status == {"200": 400}
            assert set(first.by_backend) <= {"whoami-v1", "whoami-v2"}
            assert_share(first.share("whoami-v2"), 0.2, first.answered, "80/20")

            # 2. Patch to 20/80 while load runs; every request must be answered.
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            load = asyncio.create_task(
                run_load(url, rate=150, duration_s=5.0, concurrency=16, keep_results=True, timeline=True)
            )
            await asyncio.sleep(1.5)
            t_patch = loop.time() - t0
            await set_weights(api, namespace, (80, 20), (20, 80))
            second = await asyncio.wait_for(load, timeout=30)
            assert second.errors == 0, second.by_status
            assert second.by_status == {"200": second.sent}, second.by_status

            before = [r for r in second.results if r.t < t_patch]
            after = [r for r in second.results if r.t >= t_patch + 1.0]  # reacted within 1 s
            assert len(before) > 100 and len(after) > 300
            assert_share(second.share("whoami-v2", until=t_patch), 0.2, len(before), "before patch")
            assert_share(second.share("whoami-v2", since=t_patch + 1.0), 0.8, len(after), "1 s after patch")

            # 3. Metrics add up to what the load generator saw.
            m = await scrape(dp.metrics_url)
            total = first.answered + second.answered
            for svc in ("whoami-v1", "whoami-v2"):
                cluster = cluster_name(namespace, "whoami", svc, 80)
                served = first.by_backend.get(svc, 0) + second.by_backend.get(svc, 0)
                assert served > 0
                assert pick(m["envoy_cluster_upstream_rq_total"], envoy_cluster_name=cluster) == served
                assert (
                    pick(m["envoy_cluster_upstream_rq"], envoy_cluster_name=cluster, envoy_response_code="200")
                    == served
                )
                assert (
                    pick(m["envoy_cluster_upstream_rq_xx"], envoy_cluster_name=cluster, envoy_response_code_class="2")
                    == served
                )
                assert pick(m["envoy_cluster_upstream_rq_time_count"], envoy_cluster_name=cluster) == served
                assert pick(m["envoy_cluster_upstream_rq_time_bucket"], envoy_cluster_name=cluster, le="+Inf") == served
            dapr = {"app_id": "ingress", "type": "unary"}
            assert pick(m["dapr_runtime_service_invocation_req_sent_total"], dst_app_id="whoami", **dapr) == total
            assert (
                pick(m["dapr_runtime_service_invocation_res_recv_total"], src_app_id="whoami", status="200", **dapr)
                == total
            )
            assert (
                pick(
                    m["dapr_runtime_service_invocation_res_recv_latency_ms_count"],
                    app_id="ingress",
                    src_app_id="whoami",
                    status="200",
                )
                == total
            )


async def test_dead_endpoint_is_retried_and_empty_backend_gets_503s(
    stack: Stack,
    api: client.ApiClient,
    namespace: str,
) -> None:
    """v1 has two endpoints, one of them dead (connection refused): the retry hides it.
    v2 has no endpoints: its share is answered with 503 and counted on its cluster."""
    async with Whoami(WhoamiConfig(name="v1")) as live:
        dead = Whoami(WhoamiConfig(name="v1"))
        await dead.start()
        dead_port = dead.port
        await dead.stop()  # nothing listens there any more
        await apply_local_backend(api, namespace, "whoami-v1", [live.port, dead_port])
        await apply_local_backend(api, namespace, "whoami-v2", [])
        await create_route(api, namespace, (50, 50))

        async with DataPlane(str(stack.kubeconfig), namespace, listen={"whoami": 0}, seed=3) as dp:
            res = await run_load(dp.url("whoami") + "/", rate=200, duration_s=1.5, concurrency=8)
            assert res.errors == 0
            assert res.by_backend_status.get("whoami-v1") == {"200": res.by_backend["whoami-v1"]}
            assert res.by_backend_status.get("whoami-v2") == {"503": res.by_backend["whoami-v2"]}
            assert_share(res.share("whoami-v2"), 0.5, res.answered, "50/50")
            m = await scrape(dp.metrics_url)
            v2 = cluster_name(namespace, "whoami", "whoami-v2", 80)
            assert (
                pick(m["envoy_cluster_upstream_rq_xx"], envoy_cluster_name=v2, envoy_response_code_class="5")
                == res.by_backend["whoami-v2"]
            )


# --------------------------------------------------------------------------- the Gateway listener


def ingress_route() -> dict[str, Any]:
    """The seed's ingress route: every path of default-gateway to the ingress daprd's invoke API."""
    rewrite = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1.0/invoke/whoami.default/method/"}
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": "ingress"},
        "spec": {
            "parentRefs": [{"group": GATEWAY_GROUP, "kind": "Gateway", "name": "default-gateway"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "filters": [{"type": "URLRewrite", "urlRewrite": {"path": rewrite}}],
                    "backendRefs": [{"name": "ingress-dapr", "port": 3500}],
                }
            ],
        },
    }


async def test_gateway_listener_rewrites_to_the_ingress_daprd(
    stack: Stack,
    api: client.ApiClient,
    namespace: str,
) -> None:
    """GET /whoami on the Gateway's listener reaches ingress-dapr:3500 as the Dapr invoke call.
    The daprd is stood in for by a whoami (it echoes the request line it got)."""
    co = client.CustomObjectsApi(api)
    gateway = {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "Gateway",
        "metadata": {"name": "default-gateway"},
        "spec": {"gatewayClassName": "cilium", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
    }
    await co.create_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, "gateways", gateway)
    await co.create_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, ingress_route())
    async with Whoami(WhoamiConfig(name="ingress-daprd")) as daprd:
        await apply_local_daprd(api, namespace, daprd.port)
        async with DataPlane(str(stack.kubeconfig), namespace, listen={}, dapr_metrics=False) as dp:
            assert set(dp.gateway_ports) == {"default-gateway/http"}
            async with aiohttp.ClientSession() as s:
                async with s.get(dp.gateway_url("default-gateway") + "/whoami?wait=0") as r:
                    text = await r.text()
                    assert r.status == 200, text
                    assert r.headers["x-canaryd-backend"] == "ingress-dapr"
                assert "\nGET /v1.0/invoke/whoami.default/method/whoami?wait=0 HTTP/1.1\r\n" in text
                async with s.get(dp.gateway_url("default-gateway") + "/") as r:
                    assert "GET /v1.0/invoke/whoami.default/method/ HTTP/1.1" in await r.text()
                async with s.get(dp.metrics_url) as r:
                    exposition = await r.text()
            # Envoy's series only (the Dapr imitation is off), byte for byte what the renderer makes.
            assert exposition == dp.envoy.render() and "dapr_runtime" not in exposition
            m = await scrape(dp.metrics_url)
            cluster = cluster_name(namespace, gateway_parent("default-gateway"), "ingress-dapr", 3500)
            assert pick(m["envoy_cluster_upstream_rq"], envoy_cluster_name=cluster, envoy_response_code="200") == 2
            assert pick(m["envoy_cluster_upstream_rq_total"], envoy_cluster_name=cluster) == 2


# --------------------------------------------------------------------------- Pods (kwok) as endpoints


def whoami_deployment(version: str, replicas: int, port: int) -> dict[str, Any]:
    """The seed's Deployment shape (config/samples/whoami.yaml): containerPort 80 named http,
    the app listening on ``--port``."""
    labels = {"app.kubernetes.io/name": "whoami", "app.kubernetes.io/version": version}
    container = {
        "name": "whoami",
        "image": "traefik/whoami:v1.11",
        "args": [f"--name={version}", f"--port={port}"],
        "ports": [{"name": "http", "containerPort": 80}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"whoami-{version}", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def version_service(version: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "whoami", "app.kubernetes.io/version": version}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"whoami-{version}"},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }


async def test_pods_are_served_by_local_processes_and_the_bad_release_refuses(
    stack: Stack,
    api: client.ApiClient,
    namespace: str,
) -> None:
    """Real Deployments: the scheduler binds the Pods to kwok's Node, kwok makes them Running/Ready
    with Pod IPs, the EndpointSlice controller publishes those. The pod runner stands a whoami in
    for each Pod: v2's answer as their Pods; v3 (--port=8080 behind targetPort 80, the seed's bad
    release) gets connection refused, i.e. 503s; scaling v2 to 0 removes its endpoints and processes."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    for version, replicas, port in (("v2", 2, 80), ("v3", 1, 8080)):
        svc: Any = version_service(version)
        deployment: Any = whoami_deployment(version, replicas, port)
        await core.create_namespaced_service(namespace, svc)
        await apps.create_namespaced_deployment(namespace, deployment)
    await client.CoreV1Api(api).create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="whoami"),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(name="http", port=80)]),
        ),
    )
    route = gamma_route((50, 50))
    route["spec"]["rules"][0]["backendRefs"] = [
        {"name": "whoami-v2", "port": 80, "weight": 50},
        {"name": "whoami-v3", "port": 80, "weight": 50},
    ]
    await client.CustomObjectsApi(api).create_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, route
    )

    async with DataPlane(str(stack.kubeconfig), namespace, listen={"whoami": 0}, seed=5) as dp:
        runner = dp.pods
        assert runner is not None

        seen: list[str] = []

        async def served() -> bool | None:
            v2 = dp.table.endpoints.get(("whoami-v2", 80), ())
            v3 = dp.table.endpoints.get(("whoami-v3", 80), ())
            seen[:] = [f"v2={v2!r} v3={v3!r} pods={runner.pids()!r}"]
            return (len(v2) == 2 and not any(e.refused for e in v2) and len(v3) == 1 and v3[0].refused) or None

        try:
            await eventually(served, timeout=90, what="2 v2 Pods served locally, v3's endpoint refusing")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the data plane saw {seen}") from None
        pods = await core.list_namespaced_pod(namespace)
        v2_pods = {p.metadata.name for p in pods.items if p.metadata.labels["app.kubernetes.io/version"] == "v2"}
        v2_ips = {p.status.pod_ip for p in pods.items if p.metadata.name in v2_pods}
        assert {e.address for e in dp.table.endpoints[("whoami-v2", 80)]} == {f"{ip}:80" for ip in v2_ips}
        assert set(runner.pids()) == {p.metadata.name for p in pods.items}  # one process per Pod, v3's too
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{dp.admin_port}/routes") as r:
            listing = await r.json()
        assert set(listing["pods"]) == {p.metadata.name for p in pods.items}
        (v3_endpoint,) = listing["parents"]["whoami"]["rules"][0]["backends"][1]["endpoints"]
        assert v3_endpoint.endswith(":80 (nothing listens there: connection refused)")

        hosts: set[str] = set()
        codes: dict[str, list[int]] = defaultdict(list)
        async with aiohttp.ClientSession() as s:
            for _ in range(60):
                async with s.get(dp.url("whoami") + "/", headers={"dapr-caller-app-id": "ingress"}) as r:
                    text = await r.text()
                    backend = r.headers["x-canaryd-backend"]
                    codes[backend].append(r.status)
                    if backend == "whoami-v2":
                        assert text.startswith("Name: v2\nHostname: whoami-v2-"), text
                        assert "Dapr-Caller-App-Id: ingress\r\n" in text
                        hosts.add(text.split("\n")[1].removeprefix("Hostname: "))
                    else:
                        assert text.startswith("upstream connect error or disconnect/reset before headers."), text
        assert set(codes["whoami-v2"]) == {200} and set(codes["whoami-v3"]) == {503}, codes
        assert hosts == v2_pods  # both Pods answered, each as itself (2^-n chance of a false failure)
        m = await scrape(dp.metrics_url)
        v3 = cluster_name(namespace, "whoami", "whoami-v3", 80)
        n3 = len(codes["whoami-v3"])
        assert pick(m["envoy_cluster_upstream_rq"], envoy_cluster_name=v3, envoy_response_code="503") == n3
        assert pick(m["envoy_cluster_upstream_rq_total"], envoy_cluster_name=v3) == 0  # never connected

        v2_pids = [pid for name, pid in runner.pids().items() if name in v2_pods]
        await scale(api, namespace, "whoami-v2", 0)

        async def gone() -> bool:
            no_endpoints = not dp.table.endpoints.get(("whoami-v2", 80))
            return no_endpoints and not v2_pods & set(runner.pids())

        await eventually(gone, timeout=90, what="v2's endpoints and processes gone after scaling to 0")
        for pid in v2_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.get(dp.url("whoami") + "/") as r:
                    assert r.status == 503
                    if r.headers["x-canaryd-backend"] == "whoami-v2":
                        assert await r.text() == "no healthy upstream"
