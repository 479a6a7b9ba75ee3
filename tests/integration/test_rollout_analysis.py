"""Engine + analysis end to end: real apiserver, real Prometheus scraping Envoy-shaped series."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState, parse_ts
from canaryd.engine import Engine
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    route_body,
    running_engine,
    wait_events,
    weights,
)


def cluster(namespace: str, backend: str) -> str:
    # Cilium's GAMMA naming: <ns>/<parent>/<ns>:<svc>:<port>, with ':' read as '_' in stats.
    return f"{namespace}/whoami/{namespace}_{backend}_80"


def _engine(api: client.ApiClient, namespace: str, prom_url: str) -> AbstractAsyncContextManager[Engine]:
    return running_engine(api, namespace, prometheus_url=prom_url, analyzer=True)


@pytest.fixture
async def setup(api: client.ApiClient, namespace: str) -> AsyncIterator[None]:
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)
    yield


def annotations(**extra: str) -> dict[str, str]:
    base = {
        ann.CANARY: "whoami-v2",
        ann.STEPS: "20,50,100",
        ann.INTERVAL: "4s",
        ann.ANALYSIS: "envoy",
        ann.ANALYSIS_WINDOW: "4s",
        ann.MIN_REQUESTS: "50",
        ann.SUCCESS_RATE_MIN: "99",
        ann.FAILURE_THRESHOLD: "2",
    }
    return {**base, **{ann.PREFIX + k.replace("_", "-"): v for k, v in extra.items()}}


def state(route: dict[str, Any]) -> RolloutState:
    return RolloutState.from_annotation(route["metadata"]["annotations"][ann.STATE])


async def wait_phase(api: client.ApiClient, namespace: str, phase: Phase, timeout: float = 90) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await get_route(api, namespace, "whoami")
        raw = (r["metadata"].get("annotations") or {}).get(ann.STATE)
        return r if raw and RolloutState.from_annotation(raw).phase == phase else None

    return await eventually(check, timeout=timeout, interval=0.2, what=f"phase {phase}")


async def test_healthy_canary_is_promoted(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.001)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=100, error_ratio=0.001)
    async with _engine(api, namespace, prometheus.url):
        await create_route(api, namespace, route_body("whoami", annotations=annotations()))
        r = await wait_phase(api, namespace, Phase.PROMOTED)
        st = state(r)
        assert weights(r) == {"whoami-v1": 0, "whoami-v2": 100}
        passes = [h for h in st.history if h.verdict == "pass"]
        assert len(passes) >= 2 and all((h.canary_requests or 0) >= 50 for h in passes)


async def test_erroring_canary_is_rolled_back_at_the_threshold(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.001)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=100, error_ratio=0.05)
    async with _engine(api, namespace, prometheus.url):
        await create_route(api, namespace, route_body("whoami", annotations=annotations()))
        r = await wait_phase(api, namespace, Phase.ROLLED_BACK)
        st = state(r)
        assert weights(r) == {"whoami-v1": 100, "whoami-v2": 0}
        fails = [h for h in st.history if h.verdict == "fail"]
        # Rolled back on the round that reached the threshold, never passing a step on the way.
        assert len(fails) == 2 and st.step == 0 and "error rate" in st.message
        # Two rounds, not one Prometheus answer counted twice: the second failure came an interval later.
        first, second = (parse_ts(h.at) for h in fails)
        assert first is not None and second is not None and (second - first).total_seconds() >= 4
        rb = await wait_events(api, namespace, "whoami", "RolledBack")
        assert rb and "%" in rb[0].message and "requests" in rb[0].message


async def test_thin_traffic_holds_then_pauses_and_a_paused_bad_canary_rolls_back(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.0)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=2, error_ratio=0.0)  # never reaches min-requests
    async with _engine(api, namespace, prometheus.url):
        a = annotations(max_inconclusive="2", min_requests="5000", analysis_interval="2s")
        await create_route(api, namespace, route_body("whoami", annotations=a))
        r = await wait_phase(api, namespace, Phase.PAUSED, timeout=120)
        assert weights(r) == {"whoami-v1": 80, "whoami-v2": 20}  # held at the first step, not rolled back
        assert {h.verdict for h in state(r).history} == {"inconclusive"}
        assert await wait_events(api, namespace, "whoami", "Inconclusive")
        # Paused is not a shelter: the test keeps running and evidence of harm rolls back.
        exporter.set_backend(cluster(namespace, "whoami-v2"), rps=20, error_ratio=0.5)
        r = await wait_phase(api, namespace, Phase.ROLLED_BACK, timeout=60)
        assert weights(r) == {"whoami-v1": 100, "whoami-v2": 0}
        assert await wait_events(api, namespace, "whoami", "RolledBackWhilePaused")


async def test_a_clear_regression_rolls_back_mid_step(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.001)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=100, error_ratio=0.2)
    async with _engine(api, namespace, prometheus.url):
        a = annotations(interval="60s", analysis_window="60s", analysis_interval="2s", failure_threshold="1")
        await create_route(api, namespace, route_body("whoami", annotations=a))
        r = await wait_phase(api, namespace, Phase.ROLLED_BACK, timeout=60)
    st = state(r)
    started, ended = parse_ts(st.step_started_at), parse_ts(st.updated_at)
    assert started is not None and ended is not None and st.step == 0
    assert (ended - started).total_seconds() < 60, "rolled back only at the step's end"
    assert [h.verdict for h in st.history][-1] == "fail"


async def test_a_healthy_canary_at_the_threshold_is_promoted(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    # Both versions exactly at success-rate-min 99 %: a point estimate failed half the rounds of this.
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=300, error_ratio=0.01)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=150, error_ratio=0.01)
    async with _engine(api, namespace, prometheus.url):
        a = annotations(analysis_interval="1s", failure_threshold="1")
        await create_route(api, namespace, route_body("whoami", annotations=a))
        r = await wait_phase(api, namespace, Phase.PROMOTED, timeout=90)
    assert "fail" not in {h.verdict for h in state(r).history}


async def test_a_restart_mid_analysis_keeps_the_evidence(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    """Rounds inside a step are not written (quiet), so a restart loses only their records: the counts
    are cumulative from ``counted_since``, which the state keeps, and the step's end round counts the
    whole step, including what the first process saw."""
    rps = 20
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.0)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=rps, error_ratio=0.0)
    a = annotations(
        interval="16s", analysis_window="60s", analysis_interval="2s", min_requests="100000", max_inconclusive="5"
    )

    async def started() -> RolloutState | None:
        r = await get_route(api, namespace, "whoami")
        raw = (r["metadata"].get("annotations") or {}).get(ann.STATE)
        return state(r) if raw and weights(r) == {"whoami-v1": 80, "whoami-v2": 20} else None

    async def step_end_round() -> RolloutState | None:
        r = await get_route(api, namespace, "whoami")
        st = state(r)
        return st if st.history else None

    async with _engine(api, namespace, prometheus.url):
        await create_route(api, namespace, route_body("whoami", annotations=a))
        before = await eventually(started, timeout=30, what="the first step")
        await asyncio.sleep(7)  # a few quiet rounds
        mid = state(await get_route(api, namespace, "whoami"))
    assert mid.history == (), "a quiet round was written"
    restarted = time.monotonic()
    async with _engine(api, namespace, prometheus.url):  # a new process reads the state back
        after = await eventually(step_end_round, timeout=60, what="the step's end round")
    since_restart = time.monotonic() - restarted
    assert after.counted_since == before.counted_since and after.started_at == before.started_at
    (rec,) = after.history
    assert rec.verdict == "inconclusive" and rec.step == 0
    # More requests than the second process alone could have seen: the first one's were not lost.
    assert (rec.canary_requests or 0.0) > rps * since_restart


async def test_prometheus_down_holds_then_rolls_back(
    api: client.ApiClient, namespace: str, setup: None, tmp_path: Path, exporter: MetricsExporter
) -> None:
    prom = PrometheusServer(tmp_path / "prom", scrape_interval="1s")
    prom.start(timeout=60)
    job = "down-test"
    prom.add_target(job, exporter.address)
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=100)
    try:
        async with _engine(api, namespace, prom.url):
            await prom.wait_target_up(job, timeout=30)
            await create_route(
                api, namespace, route_body("whoami", annotations=annotations(steps="20,40,60,100", max_errors="2"))
            )
            await eventually(lambda: _at_step(api, namespace, 1), timeout=60, what="a passed analysis round")
            prom.stop()
            t0 = time.monotonic()
            r = await wait_phase(api, namespace, Phase.ROLLED_BACK)
            st = state(r)
            errors = [h for h in st.history if h.verdict == "error"]
            assert len(errors) == 2 and "Prometheus" in errors[-1].reason
            assert weights(r) == {"whoami-v1": 100, "whoami-v2": 0}
            evs = await wait_events(api, namespace, "whoami", "AnalysisError")
            assert evs and "Prometheus" in evs[-1].message
            print(f"prometheus down -> rollback after {time.monotonic() - t0:.1f}s")
    finally:
        prom.stop()


async def _at_step(api: client.ApiClient, namespace: str, step: int) -> bool:
    r = await get_route(api, namespace, "whoami")
    raw = (r["metadata"].get("annotations") or {}).get(ann.STATE)
    return bool(raw) and RolloutState.from_annotation(raw).step >= step


async def test_promql_injection_in_an_annotation_is_refused(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer
) -> None:
    async with _engine(api, namespace, prometheus.url):
        before = await create_route(
            api,
            namespace,
            route_body("whoami", annotations=annotations(analysis="dapr", app_id='whoami"} or vector(1) #')),
        )
        r = await wait_phase(api, namespace, Phase.FAILED, timeout=30)
        assert ann.APP_ID in state(r).message and r["spec"] == before["spec"]
        evs = await wait_events(api, namespace, "whoami", "InvalidSpec")
        assert evs and ann.APP_ID in evs[0].message


async def test_latency_regression_alone_is_rolled_back(
    api: client.ApiClient, namespace: str, setup: None, prometheus: PrometheusServer, exporter: MetricsExporter
) -> None:
    exporter.set_backend(cluster(namespace, "whoami-v1"), rps=200, error_ratio=0.0, latency_ms=20)
    exporter.set_backend(cluster(namespace, "whoami-v2"), rps=100, error_ratio=0.0, latency_ms=800)
    async with _engine(api, namespace, prometheus.url):
        await create_route(api, namespace, route_body("whoami", annotations=annotations(latency_max="300ms")))
        r = await wait_phase(api, namespace, Phase.ROLLED_BACK)
        st = state(r)
        fails = [h for h in st.history if h.verdict == "fail"]
        assert len(fails) == 2 and all((h.canary_success or 0) == 100 for h in fails)  # no errors: latency alone
        assert "latency" in st.message and "slow" in st.message
