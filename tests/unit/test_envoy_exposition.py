"""The data plane's Envoy exposition, byte for byte, against a golden file written by hand.

The golden file tests/golden/envoy_stats_prometheus.txt follows the layout of envoyproxy/envoy's
``source/server/admin/prometheus_stats.cc`` (``statsAsPrometheusText``) as its tests in
``test/server/admin/prometheus_stats_test.cc`` expect it (``OutputWithAllMetricTypes``,
``OutputSortedByMetricName``, ``HistogramWithNoValuesAndNoTags``): counters before histograms,
one ``# TYPE`` line per family, families sorted by name, series by stat name, no blank lines, the
response-code tag before ``envoy_cluster_name``, Envoy's default bucket bounds, ``{:.32g}`` sums.
"""

from __future__ import annotations

import re
from pathlib import Path

from canaryd.metrics.envoy import cluster_pattern
from canaryd.settings import PrometheusSettings
from devkit.demo.envoy_stats import ENVOY_BUCKETS_MS, EnvoyStats, cluster_name, gateway_parent

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "envoy_stats_prometheus.txt"


def fixed_counts() -> EnvoyStats:
    stats = EnvoyStats()
    gw = cluster_name("demo", gateway_parent("default-gateway"), "ingress-dapr", 3500)
    v1, v2, v3 = (cluster_name("demo", "whoami", f"whoami-{v}", 80) for v in ("v1", "v2", "v3"))
    stats.ensure([v1, v2, v3, gw])  # v2: configured, never sent to
    for ms in (0, 3, 42):
        stats.cluster(v1).charge(200, sent=True, upstream_ms=ms)
    for _ in range(2):  # the bad release: connection refused, a local 503, nothing sent
        stats.cluster(v3).charge(503, sent=False, upstream_ms=None)
    stats.cluster(gw).charge(200, sent=True, upstream_ms=12)
    stats.cluster(gw).charge(404, sent=True, upstream_ms=1)
    return stats


def test_exposition_matches_envoys_bytes() -> None:
    assert fixed_counts().render() == GOLDEN.read_text()


def test_histogram_figures_match_envoys_own_tests() -> None:
    """Envoy's expectations for 20, 30, 50, 70, 100, 200, 5000 ms (OutputWithAllMetricTypes) and
    for 1 ms x 1e5, 100 ms x 1e6, 1000 ms x 1e8 (HistogramWithHighCounts)."""
    stats = EnvoyStats()
    for ms in (50, 20, 30, 70, 100, 5000, 200):
        stats.cluster("c").charge(200, sent=True, upstream_ms=ms)
    text = stats.render()
    buckets = [int(m) for m in re.findall(r'_bucket\{envoy_cluster_name="c",le="[^+][^"]*"\} (\d+)', text)]
    assert buckets == [0, 0, 0, 0, 1, 3, 5, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7]
    assert 'envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="c"} 5531.1160155998386471765115857124\n' in text

    high = EnvoyStats()
    for ms, n in ((1, 100_000), (100, 1_000_000), (1000, 100_000_000)):
        high.cluster("c").times_ms[ms] += n
    assert 'envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="c"} 104866771428.571441650390625\n' in high.render()


def test_bucket_bounds_are_envoys_defaults() -> None:
    assert ENVOY_BUCKETS_MS == (
        0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
    )  # fmt: skip


def test_canaryd_default_cluster_pattern_finds_these_names() -> None:
    template = PrometheusSettings().envoy_cluster_pattern
    want = cluster_pattern(template, namespace="demo", service="whoami-v2", port=80, parent="whoami")
    assert re.fullmatch(want, cluster_name("demo", "whoami", "whoami-v2", 80))
    assert re.fullmatch(want, "demo/whoami/demo:whoami-v2:80")  # Cilium's own cluster name, unsanitized
    for other in (
        cluster_name("demo", "whoami", "whoami-v3", 80),
        cluster_name("demo", "whoami", "whoami-v2", 8080),
        cluster_name("demo", gateway_parent("default-gateway"), "whoami-v2", 80),  # north-south: not GAMMA
        cluster_name("other", "whoami", "whoami-v2", 80),
    ):
        assert not re.fullmatch(want, other), other
