"""The daemon's per-route analysis series during a real analysed rollout (real apiserver, real Prometheus
scraping Envoy-shaped series): canary and stable side by side while it is judged, gone once it ends."""

from __future__ import annotations

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase
from canaryd.engine import Engine
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer
from tests.integration.test_rollout_analysis import cluster, state
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    patch_route,
    route_body,
    running_engine,
)

PER_ROLE = ("success_ratio", "request_rate", "requests", "latency_seconds")
SERIES = [(name, role) for name in PER_ROLE for role in ("canary", "stable")]


def sample(engine: Engine, name: str, namespace: str, **labels: str) -> float | None:
    return engine.metrics.registry.get_sample_value(f"canaryd_analysis_{name}", {"namespace": namespace, **labels})


async def test_canary_and_stable_series_while_judged_then_removed(
    api: client.ApiClient, namespace: str, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.01, latency_ms=20)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=100, error_ratio=0.0, latency_ms=40)
    a = {
        ann.CANARY: "whoami-v2",
        ann.STEPS: "20,100",
        ann.INTERVAL: "1h",  # held at 20 % until the test promotes it
        ann.ANALYSIS: "envoy",
        ann.ANALYSIS_INTERVAL: "1s",
        ann.LATENCY_MAX: "1s",
        ann.MIN_REQUESTS: "50",
    }
    async with running_engine(api, namespace, prometheus_url=prometheus.url, analyzer=True) as engine:
        await create_route(api, namespace, route_body("whoami", annotations=a))
        one = {"route": "whoami", "signal": "envoy"}

        async def judged() -> bool:
            return (
                all((sample(engine, name, namespace, **one, role=role) or 0) > 0 for name, role in SERIES)
                and sample(engine, "evidence_threshold", namespace, **one) is not None
            )

        await eventually(judged, timeout=60, interval=0.2, what="canary and stable series with traffic")
        canary = {n: sample(engine, n, namespace, **one, role="canary") for n in PER_ROLE}
        stable = {n: sample(engine, n, namespace, **one, role="stable") for n in PER_ROLE}
        assert canary["success_ratio"] == 1.0 and 0.95 < (stable["success_ratio"] or 0) < 1.0
        assert (stable["request_rate"] or 0) > (canary["request_rate"] or 0) > 0
        assert (canary["latency_seconds"] or 0) > (stable["latency_seconds"] or 0)
        assert (sample(engine, "evidence_threshold", namespace, **one) or 0) > 1
        assert sample(engine, "evidence", namespace, **one) is not None

        # The rollout ends: its analysis series go, the rollout's own gauges stay.
        await patch_route(api, namespace, "whoami", {"metadata": {"annotations": {ann.INTENT: "promote"}}})

        async def ended() -> bool:
            r = await get_route(api, namespace, "whoami")
            gone = all(sample(engine, name, namespace, **one, role=role) is None for name, role in SERIES)
            return state(r).phase == Phase.PROMOTED and gone and sample(engine, "evidence", namespace, **one) is None

        await eventually(ended, timeout=30, what="promoted, and its analysis series removed")
        phase = engine.metrics.registry.get_sample_value(
            "canaryd_rollout_phase", {"namespace": namespace, "route": "whoami", "phase": "Promoted"}
        )
        assert phase == 1
