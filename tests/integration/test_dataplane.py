"""The demo GAMMA data plane against the real apiserver: weighted split, live weight change
without a lost request, retry on a dead endpoint, and Envoy/Dapr-shaped metrics that add up.

Tolerances: the share of a backend over n answered requests is binomial; we accept
|observed - p| <= 4 * sqrt(p (1 - p) / n) (a false failure about 1 run in 15,000).
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client
from prometheus_client.parser import text_string_to_metric_families

from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from devkit.demo.dataplane import DataPlane, apply_local_backend, cluster_name
from devkit.demo.loadgen import run_load
from devkit.demo.whoami import Whoami, WhoamiConfig
from tests.conftest import Stack

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


async def scrape(url: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[sample.name][frozenset(sample.labels.items())] = sample.value
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
