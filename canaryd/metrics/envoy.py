"""The ``envoy`` signal: per-backend requests, 5xx and latency from Cilium's Envoy.

Series (Envoy cluster stats, Prometheus format, summed across cilium-envoy pods):
``envoy_cluster_upstream_rq{envoy_cluster_name, envoy_response_code}`` (counter) and
``envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name, le}`` (milliseconds).
A backend's clusters are found with ``PrometheusSettings.envoy_cluster_pattern``.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from canaryd.analysis import AnalysisTarget, BackendStats, Observation
from canaryd.errors import MetricsError
from canaryd.metrics import promql
from canaryd.metrics.base import histogram_quantile, parse_le
from canaryd.metrics.prometheus import PrometheusClient
from canaryd.settings import PrometheusSettings

REQUESTS = "envoy_cluster_upstream_rq"
LATENCY_BUCKET = "envoy_cluster_upstream_rq_time_bucket"
CODE_LABEL = "envoy_response_code"
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class EnvoyTarget:
    stable: str  # RE2/Python regex for the stable backend's cluster names
    canary: str
    quantile: float
    namespace: str
    stable_name: str  # literal backend names: a cheap pre-filter before the regex
    canary_name: str


def cluster_pattern(template: str, *, namespace: str, service: str, port: int, parent: str) -> str:
    """Fill ``{namespace}``, ``{service}`` (the backend), ``{port}``, ``{parent}`` into the
    configured regex, validated and regex-escaped so a value can only match itself."""
    values = {
        "{namespace}": promql.regex_escape(promql.safe_label("namespace", namespace)),
        "{service}": promql.regex_escape(promql.safe_label("service", service)),
        "{port}": promql.safe_port("port", port),
        "{parent}": promql.regex_escape(promql.safe_label("parent service", parent)),
    }
    out = template
    for token, value in values.items():
        out = out.replace(token, value)
    return out


class EnvoySignal:
    name = "envoy"

    def __init__(self, settings: PrometheusSettings) -> None:
        if not _LABEL_NAME.match(settings.envoy_cluster_label):
            raise MetricsError(f"envoy_cluster_label {settings.envoy_cluster_label!r} is not a label name")
        self._template = settings.envoy_cluster_pattern
        self._label = settings.envoy_cluster_label
        self._named = "{service}" in self._template  # cluster names then hold the backend name
        try:
            re.compile(cluster_pattern(self._template, namespace="a", service="b", port=1, parent="c"))
        except re.error as exc:
            raise MetricsError(f"envoy_cluster_pattern {self._template!r} is not a regex: {exc}") from exc

    def prepare(self, target: AnalysisTarget) -> EnvoyTarget:
        def pattern(backend: str, what: str) -> str:
            return cluster_pattern(
                self._template,
                namespace=target.namespace,
                service=promql.safe_label(what, backend),
                port=target.port,
                parent=target.service,
            )

        return EnvoyTarget(
            stable=pattern(target.stable, "stable"),
            canary=pattern(target.canary, "canary"),
            quantile=target.spec.latency_quantile,
            namespace=promql.safe_label("namespace", target.namespace),
            stable_name=target.stable,
            canary_name=target.canary,
        )

    def _selector(self, items: Sequence[EnvoyTarget]) -> str:
        """A coarse matcher: the batch's namespaces when the pattern names them, else every pattern.

        A union of hundreds of ``.*``-led patterns costs Prometheus seconds per query; a few
        namespace substrings cost milliseconds. Each route's exact pattern is applied here.
        """
        if "{namespace}" in self._template:
            namespaces = sorted({t.namespace for t in items})
            union = ".*(?:" + "|".join(promql.regex_escape(ns) for ns in namespaces) + ").*"
        else:
            union = promql.regex_union(p for t in items for p in (t.stable, t.canary))
        return f"{self._label}=~{promql.string_literal(union)}"

    async def measure(
        self, client: PrometheusClient, window_s: float, items: Sequence[EnvoyTarget]
    ) -> list[Observation]:
        selector = self._selector(items)
        w = promql.duration(window_s)
        q_requests = f"sum by ({self._label}, {CODE_LABEL}) (increase({REQUESTS}{{{selector}}}[{w}]))"
        q_latency = f"sum by ({self._label}, le) (rate({LATENCY_BUCKET}{{{selector}}}[{w}]))"
        requests, latency = await asyncio.gather(client.query(q_requests), client.query(q_latency))

        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for s in requests:
            name = s.labels.get(self._label, "")
            totals[name][0] += s.value
            if s.labels.get(CODE_LABEL, "").startswith("5"):
                totals[name][1] += s.value
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for s in latency:
            le = parse_le(s.labels.get("le", ""))
            if le is not None and math.isfinite(s.value):
                buckets[s.labels.get(self._label, "")][le] += s.value

        names = set(totals) | set(buckets)
        cache: dict[str, BackendStats] = {}

        def stats(pattern: str, literal: str, quantile: float) -> BackendStats:
            key = f"{quantile}\0{pattern}"
            if key not in cache:
                rx = re.compile(pattern)
                matched = [n for n in names if literal in n and rx.fullmatch(n)]
                req = sum(totals[n][0] for n in matched if n in totals)
                err = sum(totals[n][1] for n in matched if n in totals)
                merged: dict[float, float] = defaultdict(float)
                for n in matched:
                    for le, v in buckets.get(n, {}).items():
                        merged[le] += v
                cache[key] = BackendStats(req, err, histogram_quantile(quantile, merged))
            return cache[key]

        return [
            Observation(
                self.name,
                canary=stats(t.canary, t.canary_name if self._named else "", t.quantile),
                stable=stats(t.stable, t.stable_name if self._named else "", t.quantile),
            )
            for t in items
        ]
