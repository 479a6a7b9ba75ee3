"""PrometheusAnalyzer + judge against a real Prometheus scraping the fake exporter."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path

import pytest

from canaryd.core.analysis import AnalysisTarget, Judgement, Verdict
from canaryd.core.judge import judge_round
from canaryd.errors import MetricsError
from canaryd.metrics import PrometheusAnalyzer
from canaryd.metrics.envoy import EnvoySignal
from canaryd.settings import PrometheusSettings
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer
from tests.specs import analysis_spec

pytestmark = pytest.mark.integration

WINDOW_S = 8.0
SPEC = analysis_spec(window_s=WINDOW_S)


async def judged(analyzer: PrometheusAnalyzer, t: AnalysisTarget) -> list[Judgement]:
    """The analyzer's counts for one window, judged as a rollout's first round (the engine's judge)."""
    n = len(t.spec.signals)
    return [judge_round(o, t.spec, signals=n)[0] for o in await analyzer.analyze(t)]


def new_namespace() -> str:
    # Unique per test: old series of other tests stay in the TSDB for the window.
    return "t" + uuid.uuid4().hex[:10]


def cluster(ns: str, parent: str, backend: str, port: int = 80) -> str:
    # The shape Cilium gives GAMMA backend clusters once ':' became '_' in stats.
    return f"{ns}/{parent}/{ns}_{backend}_{port}"


def target(
    ns: str, parent: str = "whoami", stable: str = "whoami-v1", canary: str = "whoami-v2", **spec: object
) -> AnalysisTarget:
    return AnalysisTarget(
        namespace=ns,
        route=parent,
        service=parent,
        port=80,
        stable=stable,
        canary=canary,
        spec=replace(SPEC, **spec),  # type: ignore[arg-type]
    )


async def wait_for_full_window(prometheus: PrometheusServer, ns: str, backends: int, timeout: float = 60.0) -> None:
    """Wait until Prometheus holds a full window of samples for all ``backends`` of ``ns``."""
    want = int(WINDOW_S) - 1
    query = (
        f'count(count_over_time(envoy_cluster_upstream_rq_total{{envoy_cluster_name=~"{ns}/.*"}}'
        f"[{int(WINDOW_S)}s]) >= {want})"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(prometheus.query, query)
        if result and float(result[0]["value"][1]) >= backends:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"Prometheus did not collect {WINDOW_S:g}s of samples for {ns} in {timeout:g}s")


async def wait_for_dapr_window(prometheus: PrometheusServer, callees: Iterable[str], timeout: float = 60.0) -> None:
    names = "|".join(callees)
    query = (
        f'count(count_over_time(dapr_runtime_service_invocation_req_sent_total{{dst_app_id=~"{names}"}}'
        f"[{int(WINDOW_S)}s]) >= {int(WINDOW_S) - 1})"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(prometheus.query, query)
        if result and float(result[0]["value"][1]) >= len(names.split("|")):
            return
        await asyncio.sleep(0.5)
    raise AssertionError("Prometheus did not collect a full window of Dapr samples")


@pytest.fixture
async def analyzer(prometheus: PrometheusServer) -> AsyncIterator[PrometheusAnalyzer]:
    a = PrometheusAnalyzer(PrometheusSettings(url=prometheus.url, timeout_s=5.0))
    try:
        yield a
    finally:
        await a.aclose()


async def one(analyzer: PrometheusAnalyzer, t: AnalysisTarget) -> tuple[Verdict, str]:
    (judgement,) = await judged(analyzer, t)
    return judgement.verdict, judgement.reason


async def test_healthy_canary_passes(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    ns = new_namespace()
    exporter.set_backend(cluster(ns, "whoami", "whoami-v1"), rps=100, error_ratio=0.001, latency_ms=20)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v2"), rps=100, error_ratio=0.001, latency_ms=20)
    await wait_for_full_window(prometheus, ns, 2)
    verdict, reason = await one(analyzer, target(ns, latency_max_ms=250.0))
    assert verdict is Verdict.PASS, reason
    assert "no harm shown" in reason and "slow" in reason and "evidence of harm" in reason


async def test_canary_with_more_errors_than_stable_fails(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    ns = new_namespace()
    exporter.set_backend(cluster(ns, "whoami", "whoami-v1"), rps=100, error_ratio=0.001)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v2"), rps=100, error_ratio=0.05)
    await wait_for_full_window(prometheus, ns, 2)
    verdict, reason = await one(analyzer, target(ns))
    assert verdict is Verdict.FAIL, reason
    assert "canary error rate ≥" in reason and "allowed" in reason
    # The relative test alone also catches it when the absolute bar is low.
    verdict, reason = await one(analyzer, target(ns, success_rate_min=90.0))
    assert verdict is Verdict.FAIL, reason
    assert "canary error rate" in reason and "stable" in reason


async def test_too_little_traffic_is_inconclusive(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    ns = new_namespace()
    per_second = 20 / WINDOW_S  # about 20 requests per window
    exporter.set_backend(cluster(ns, "whoami", "whoami-v1"), rps=100)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v2"), rps=per_second, error_ratio=0.0)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v3"), rps=per_second, error_ratio=0.5)
    await wait_for_full_window(prometheus, ns, 3)
    verdict, reason = await one(analyzer, target(ns, min_requests=50))
    assert verdict is Verdict.INCONCLUSIVE, reason
    assert "canary requests" in reason
    # Few requests are no shelter for a bad canary: half of 20 failing is evidence enough.
    verdict, reason = await one(analyzer, target(ns, canary="whoami-v3", min_requests=50))
    assert verdict is Verdict.FAIL, reason


async def test_latency_regression_alone_fails(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    ns = new_namespace()
    exporter.set_backend(cluster(ns, "whoami", "whoami-v1"), rps=100, latency_ms=20)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v2"), rps=100, latency_ms=400)
    await wait_for_full_window(prometheus, ns, 2)
    (j,) = await judged(analyzer, target(ns, latency_max_ms=250.0))
    assert j.verdict is Verdict.FAIL, j.reason
    assert "latency" in j.reason and "success rate" not in j.reason
    assert j.canary is not None and j.canary.errors == 0
    assert j.canary.latency_ms is not None and 250 < j.canary.latency_ms <= 500
    assert j.stable is not None and j.stable.latency_ms is not None and j.stable.latency_ms <= 25


async def test_a_route_without_latency_max_shows_prometheus_quantile(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    """Without latency-max no buckets are fetched: Prometheus' histogram_quantile per cluster is shown,
    and it agrees with the quantile computed from the buckets for a route that judges latency."""
    ns = new_namespace()
    exporter.set_backend(cluster(ns, "whoami", "whoami-v1"), rps=100, latency_ms=20)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v2"), rps=100, latency_ms=400)
    await wait_for_full_window(prometheus, ns, 2)
    issued = analyzer.client.queries_issued
    (shown,) = await judged(analyzer, target(ns))
    assert analyzer.client.queries_issued - issued == 2  # requests + one quantile, no bucket query
    assert shown.verdict is Verdict.PASS, shown.reason  # latency is not judged without a limit
    assert shown.canary is not None and shown.canary.latency_ms is not None and 250 < shown.canary.latency_ms <= 500
    assert shown.canary.slow is None
    (judged_j,) = await judged(analyzer, target(ns, latency_max_ms=250.0))
    assert judged_j.canary is not None and judged_j.canary.latency_ms is not None
    assert abs(judged_j.canary.latency_ms - shown.canary.latency_ms) <= 0.05 * shown.canary.latency_ms


async def test_prometheus_down_is_error(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path / "prom-down")
    server.start()
    url = server.url
    server.stop()
    analyzer = PrometheusAnalyzer(PrometheusSettings(url=url, timeout_s=3.0))
    try:
        (j,) = await judged(analyzer, target(new_namespace()))
    finally:
        await analyzer.aclose()
    assert j.verdict is Verdict.ERROR
    assert "Prometheus" in j.reason and url in j.reason


async def test_promql_injection_is_refused(prometheus: PrometheusServer, analyzer: PrometheusAnalyzer) -> None:
    evil = 'whoami-v2"} or vector(1) #'
    with pytest.raises(MetricsError, match="canary"):
        EnvoySignal(analyzer.settings).prepare(target("prod", canary=evil))
    (j,) = await judged(analyzer, target("prod", canary=evil))
    assert j.verdict is Verdict.ERROR and "refusing" in j.reason
    (j,) = await judged(analyzer, target('prod",x="', signals=("dapr",), app_id="whoami"))
    assert j.verdict is Verdict.ERROR and "refusing namespace" in j.reason
    (j,) = await judged(analyzer, target("prod", signals=("dapr",), app_id="a|b"))
    assert j.verdict is Verdict.ERROR and "app_id" in j.reason
    assert analyzer.client.queries_issued == 0  # refused before anything reached Prometheus


async def test_batched_query_count_is_constant(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    ns = new_namespace()
    routes = 50
    for i in range(routes):
        exporter.set_backend(cluster(ns, f"svc{i}", f"svc{i}-v1"), rps=60, error_ratio=0.0)
        bad = 0.2 if i == 7 else 0.0
        exporter.set_backend(cluster(ns, f"svc{i}", f"svc{i}-v2"), rps=60, error_ratio=bad)
    await wait_for_full_window(prometheus, ns, 2 * routes)
    targets = [target(ns, f"svc{i}", f"svc{i}-v1", f"svc{i}-v2") for i in range(routes)]

    client = analyzer.client
    client.queries_issued = 0
    await judged(analyzer, targets[0])
    single = client.queries_issued
    assert single == 2  # requests by code + the latency quantile shown (no latency-max: no buckets)

    await asyncio.sleep(analyzer.answer_ttl(WINDOW_S))  # let that answer expire: no sharing below
    client.queries_issued = 0
    results = await asyncio.gather(*(judged(analyzer, t) for t in targets))
    assert client.queries_issued == single
    verdicts = [r[0].verdict for r in results]
    assert verdicts[7] is Verdict.FAIL, results[7][0].reason
    assert all(v is Verdict.PASS for i, v in enumerate(verdicts) if i != 7), verdicts
    # Each route got its own slice, not the batch total.
    assert all(r[0].canary is not None and r[0].canary.requests < 60 * WINDOW_S * 1.5 for r in results)

    # Routes with a different window form their own batch (one more query pair).
    await asyncio.sleep(analyzer.answer_ttl(WINDOW_S))
    client.queries_issued = 0
    other = [replace(t, spec=replace(t.spec, window_s=WINDOW_S - 2)) for t in targets[:5]]
    await asyncio.gather(*(judged(analyzer, t) for t in [*targets[:5], *other]))
    assert client.queries_issued == 2 * single


async def test_batches_are_chunked(prometheus: PrometheusServer, exporter: MetricsExporter) -> None:
    ns = new_namespace()
    for i in range(5):
        exporter.set_backend(cluster(ns, f"s{i}", f"s{i}-a"), rps=60)
        exporter.set_backend(cluster(ns, f"s{i}", f"s{i}-b"), rps=60)
    await wait_for_full_window(prometheus, ns, 10)
    targets = [target(ns, f"s{i}", f"s{i}-a", f"s{i}-b") for i in range(5)]
    # Without answer sharing each chunk queries on its own.
    a = PrometheusAnalyzer(PrometheusSettings(url=prometheus.url, batch_max_targets=2, answer_ttl_s=0))
    try:
        results = await asyncio.gather(*(judged(a, t) for t in targets))
        assert a.client.queries_issued == 2 * 3
        assert all(r[0].verdict is Verdict.PASS for r in results), results
    finally:
        await a.aclose()
    # With it (the default), the chunks of one namespace share one answer.
    a = PrometheusAnalyzer(PrometheusSettings(url=prometheus.url, batch_max_targets=2))
    try:
        results = await asyncio.gather(*(judged(a, t) for t in targets))
        assert a.client.queries_issued == 2
        assert all(r[0].verdict is Verdict.PASS for r in results), results
    finally:
        await a.aclose()


async def test_answer_is_shared_across_batches_of_a_round(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    """Analyses of one round arrive spread over far more than the batch window: batches of the
    same window and namespace reuse one answer for ``answer_ttl``; other namespaces, other
    windows and an expired answer query again, and every route still gets its own numbers."""
    ns, other_ns = new_namespace(), new_namespace()
    routes = 30
    for space in (ns, other_ns):
        for i in range(routes):
            bad = 0.2 if (space, i) in ((ns, 3), (other_ns, 11)) else 0.0
            exporter.set_backend(cluster(space, f"svc{i}", f"svc{i}-v1"), rps=60)
            exporter.set_backend(cluster(space, f"svc{i}", f"svc{i}-v2"), rps=60, error_ratio=bad)
    await wait_for_full_window(prometheus, ns, 2 * routes)
    await wait_for_full_window(prometheus, other_ns, 2 * routes)
    ttl = analyzer.answer_ttl(WINDOW_S)
    assert ttl == min(analyzer.settings.answer_ttl_s, WINDOW_S / 10) > 0
    gap = analyzer.settings.batch_window_s * 3  # well apart: separate batches
    assert 3 * gap < ttl

    def targets(space: str, which: range) -> list[AnalysisTarget]:
        return [target(space, f"svc{i}", f"svc{i}-v1", f"svc{i}-v2") for i in which]

    async def burst(ts: list[AnalysisTarget], delay: float) -> list[list[Judgement]]:
        await asyncio.sleep(delay)
        return list(await asyncio.gather(*(judged(analyzer, t) for t in ts)))

    client = analyzer.client
    client.queries_issued = 0
    # Three bursts of the same namespace: one answer (the first still in flight or just done).
    bursts = await asyncio.gather(
        burst(targets(ns, range(0, 10)), 0),
        burst(targets(ns, range(10, 20)), gap),
        burst(targets(ns, range(20, 30)), 2 * gap),
    )
    assert client.queries_issued == 2
    results = [r for b in bursts for r in b]
    verdicts = [r[0].verdict for r in results]
    assert verdicts[3] is Verdict.FAIL and all(v is Verdict.PASS for i, v in enumerate(verdicts) if i != 3), verdicts

    # Another namespace is not covered by that answer: its own query pair, its own numbers.
    client.queries_issued = 0
    (other,) = await asyncio.gather(burst(targets(other_ns, range(routes)), 0))
    assert client.queries_issued == 2
    verdicts = [r[0].verdict for r in other]
    assert verdicts[11] is Verdict.FAIL and all(v is Verdict.PASS for i, v in enumerate(verdicts) if i != 11), verdicts

    # A batch of both namespaces is covered by neither answer; once asked, it covers both.
    client.queries_issued = 0
    mixed = targets(ns, range(2, 5)) + targets(other_ns, range(10, 13))
    await asyncio.gather(*(judged(analyzer, t) for t in mixed))
    await asyncio.gather(*(judged(analyzer, t) for t in targets(other_ns, range(5))))
    assert client.queries_issued == 2

    # Another window is another answer; after the TTL the same batch asks again.
    client.queries_issued = 0
    await judged(analyzer, replace(targets(ns, range(1))[0], spec=replace(SPEC, window_s=WINDOW_S - 2)))
    assert client.queries_issued == 2
    await asyncio.sleep(ttl)
    client.queries_issued = 0
    (j,) = await judged(analyzer, targets(ns, range(3, 4))[0])
    assert client.queries_issued == 2 and j.verdict is Verdict.FAIL, j.reason


async def test_dapr_compares_app_ids_and_guards_whole_service(
    prometheus: PrometheusServer, exporter: MetricsExporter, analyzer: PrometheusAnalyzer
) -> None:
    tag = uuid.uuid4().hex[:6]
    v1, v2, whole = f"whoami-v1-{tag}", f"whoami-v2-{tag}", f"whoami-{tag}"
    exporter.set_dapr("ingress", v1, rps=80, error_ratio=0.0, latency_ms=15)
    exporter.set_dapr("ingress", v2, rps=80, error_ratio=0.02, lost_ratio=0.03, latency_ms=15)
    exporter.set_dapr("ingress", whole, rps=80, error_ratio=0.0, latency_ms=15)
    exporter.set_dapr("other", whole, rps=80, error_ratio=0.5)  # another caller, filtered out
    await wait_for_dapr_window(prometheus, [v1, v2, whole])

    (j,) = await judged(analyzer, target("prod", signals=("dapr",), app_id=v2, stable_app_id=v1))
    assert j.verdict is Verdict.FAIL, j.reason
    assert j.canary is not None and j.stable is not None
    assert 0.03 < j.canary.errors / j.canary.requests < 0.07  # 500s + lost requests

    (j,) = await judged(
        analyzer, target("prod", signals=("dapr",), app_id=whole, caller_app_id="ingress", latency_max_ms=100.0)
    )
    assert j.verdict is Verdict.PASS, j.reason
    assert j.stable is None and j.canary is not None and j.canary.latency_ms is not None


async def test_custom_template(prometheus: PrometheusServer, exporter: MetricsExporter, tmp_path: Path) -> None:
    ns = new_namespace()
    exporter.set_backend(cluster(ns, "whoami", "whoami-v1"), rps=100)
    exporter.set_backend(cluster(ns, "whoami", "whoami-v2"), rps=100, error_ratio=0.1)
    templates = tmp_path / "templates.yaml"
    templates.write_text(
        "templates:\n"
        "  envoy-total:\n"
        "    requests: sum(increase(envoy_cluster_upstream_rq_total{envoy_cluster_name="
        '"{namespace}/{service}/{namespace}_{backend}_{port}"}[{window}]))\n'
        "    errors: sum(increase(envoy_cluster_upstream_rq{envoy_cluster_name="
        '"{namespace}/{service}/{namespace}_{backend}_{port}",envoy_response_code=~"5.."}[{window}]))\n'
    )
    await wait_for_full_window(prometheus, ns, 2)
    a = PrometheusAnalyzer(PrometheusSettings(url=prometheus.url, custom_templates_file=str(templates)))
    try:
        (j,) = await judged(a, target(ns, signals=("custom:envoy-total",)))
        assert j.verdict is Verdict.FAIL, j.reason
        assert j.canary is not None and 0.05 < j.canary.errors / j.canary.requests < 0.15
        (j,) = await judged(a, target(ns, signals=("custom:missing",)))
        assert j.verdict is Verdict.ERROR and "envoy-total" in j.reason
        (j,) = await judged(a, replace(target(ns, signals=("custom:envoy-total",)), route="r}"))
        assert j.verdict is Verdict.ERROR and "route" in j.reason
    finally:
        await a.aclose()


async def test_sample_templates_are_valid_promql(prometheus: PrometheusServer) -> None:
    """Every query in config/metric-templates.yaml renders and is accepted by Prometheus."""
    repo = Path(__file__).resolve().parents[2]  # noqa: ASYNC240 - test set-up
    settings = PrometheusSettings(
        url=prometheus.url, custom_templates_file=str(repo / "config" / "metric-templates.yaml")
    )
    a = PrometheusAnalyzer(settings)
    try:
        for name in ("hubble", "envoy-xx", "app-http"):
            (j,) = await judged(a, target(new_namespace(), signals=(f"custom:{name}",), app_id="x"))
            # No data for these series here: a parse error would be ERROR instead.
            assert j.verdict is Verdict.INCONCLUSIVE, (name, j.reason)
    finally:
        await a.aclose()
