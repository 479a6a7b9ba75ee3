"""The ``envoy`` signal: per-backend requests, 5xx and latency from Cilium's Envoy.

Series (Envoy cluster stats, Prometheus format, summed across cilium-envoy pods):
``envoy_cluster_upstream_rq{envoy_cluster_name, envoy_response_code}`` (counter) and
``envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name, le}`` (milliseconds).
A backend's clusters are found with ``PrometheusSettings.envoy_cluster_pattern``.

A batch is answered by a requests query and a latency query whose selector depends only on the
batch's namespaces (``scope``), so one answer can serve every batch of a round (see
``PrometheusAnalyzer``). The latency query returns the buckets (16 samples per cluster) only when a
route of the batch judges latency (``latency-max``: the slow count needs them); otherwise
Prometheus computes the quantile shown in the history, one sample per cluster. At 1,000 routes
that is 2,000 samples instead of 32,000 to transfer and decode (docs/benchmarks.md). The
answers are reduced in the worker thread to per-cluster totals and buckets (``EnvoyIndex``);
routes are then matched through a token index of the cluster names, each backend pattern
compiled once and kept on the signal.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from canaryd.core.analysis import AnalysisTarget, BackendStats, Observation
from canaryd.errors import MetricsError
from canaryd.metrics import promql
from canaryd.metrics.base import histogram_quantile, parse_le, slow_fraction
from canaryd.metrics.prometheus import PrometheusClient
from canaryd.settings import PrometheusSettings

REQUESTS = "envoy_cluster_upstream_rq"
LATENCY_BUCKET = "envoy_cluster_upstream_rq_time_bucket"
CODE_LABEL = "envoy_response_code"
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Backend names are DNS labels: a cluster name splits into candidate backend names at any
# other character.
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
# What may stand right before / after ``{service}`` in the pattern so that the backend is a
# whole DNS-label run of every matching cluster name: the pattern's edge, an anchor, a literal
# non-DNS character, an escaped one, or a plain class of such characters (e.g. ``[:_/]``).
_EDGE = r"(?:[/:_@,;=!~%&#<>'\x22 ]|\\[./|@:_#&~%=,;!<>]|\[[^\]\\a-z0-9^-]+\])"
_BOUNDED_BEFORE = re.compile(rf"(?:^|\^|{_EDGE})\{{service\}}")
_BOUNDED_AFTER = re.compile(rf"\{{service\}}(?=$|\$|{_EDGE}(?![?*]|\{{\d))")  # not optional
_COMPILED_MAX = 8192
# Scope markers for the latency query (NUL never occurs in a namespace or a cluster pattern).
_BUCKETS = "\0buckets"
_QUANTILE = "\0q="


@dataclass(frozen=True)
class EnvoyTarget:
    stable: str  # RE2/Python regex for the stable backend's cluster names
    canary: str
    quantile: float
    namespace: str
    stable_name: str  # literal backend names: a cheap pre-filter before the regex
    canary_name: str
    latency_max_ms: float | None = None
    count_4xx: bool = False  # the one error policy: 5xx are errors; 4xx only when the route says so


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


@dataclass
class EnvoyIndex:
    """One answer of both envoy queries, reduced: what ``match`` needs and nothing else."""

    totals: dict[str, list[float]]  # cluster name -> [requests, 5xx, 4xx]
    buckets: dict[str, dict[float, float]]  # cluster name -> {le: rate}; only for latency-max batches
    quantiles: dict[float, dict[str, float]] = field(default_factory=dict)  # q -> cluster name -> ms
    names: list[str] = field(default_factory=list)
    by_run: dict[str, list[str]] = field(default_factory=dict)  # DNS-label run -> cluster names

    def __post_init__(self) -> None:
        shown = (n for per_cluster in self.quantiles.values() for n in per_cluster)
        self.names = list(dict.fromkeys([*self.totals, *self.buckets, *shown]))
        by_run: dict[str, list[str]] = {}
        for name in self.names:
            for run in set(_NOT_DNS.split(name)):
                if run:
                    by_run.setdefault(run, []).append(name)
        self.by_run = by_run


def pattern_bounds_service(template: str) -> bool:
    """True when every ``{service}`` in ``template`` is delimited by non-DNS characters, so a
    cluster name matching the filled pattern holds the backend as a whole ``[a-z0-9-]`` run
    (and the run index finds every candidate). Conservative: anything unusual is False."""
    n = template.count("{service}")
    return n > 0 and len(_BOUNDED_BEFORE.findall(template)) == n and len(_BOUNDED_AFTER.findall(template)) == n


Pairs = Iterator[tuple[Mapping[str, str], float]]


def _reduce_requests(label: str) -> Callable[[Pairs], dict[str, list[float]]]:
    def reduce(pairs: Pairs) -> dict[str, list[float]]:
        totals: dict[str, list[float]] = {}
        for labels, value in pairs:
            name = labels.get(label, "")
            acc = totals.get(name)
            if acc is None:
                acc = totals[name] = [0.0, 0.0, 0.0]
            acc[0] += value
            code = str(labels.get(CODE_LABEL, ""))
            if code.startswith("5"):
                acc[1] += value
            elif code.startswith("4"):
                acc[2] += value
        return totals

    return reduce


def _reduce_values(label: str) -> Callable[[Pairs], dict[str, float]]:
    def reduce(pairs: Pairs) -> dict[str, float]:
        return {labels.get(label, ""): value for labels, value in pairs if math.isfinite(value)}

    return reduce


def _reduce_buckets(label: str) -> Callable[[Pairs], dict[str, dict[float, float]]]:
    def reduce(pairs: Pairs) -> dict[str, dict[float, float]]:
        buckets: dict[str, dict[float, float]] = {}
        for labels, value in pairs:
            le = parse_le(labels.get("le", ""))
            if le is not None and math.isfinite(value):
                name = labels.get(label, "")
                b = buckets.get(name)
                if b is None:
                    b = buckets[name] = {}
                b[le] = b.get(le, 0.0) + value
        return buckets

    return reduce


class EnvoySignal:
    name = "envoy"

    def __init__(self, settings: PrometheusSettings) -> None:
        if not _LABEL_NAME.match(settings.envoy_cluster_label):
            raise MetricsError(f"envoy_cluster_label {settings.envoy_cluster_label!r} is not a label name")
        self._template = settings.envoy_cluster_pattern
        self._label = settings.envoy_cluster_label
        self._named = "{service}" in self._template  # cluster names then hold the backend name
        self._indexed = pattern_bounds_service(self._template)  # ... as a whole DNS-label run
        self._by_namespace = "{namespace}" in self._template
        self._compiled: dict[str, re.Pattern[str]] = {}
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
            latency_max_ms=target.spec.latency_max_ms,
            count_4xx=target.spec.count_4xx,
        )

    def scope(self, items: Sequence[EnvoyTarget]) -> frozenset[str]:
        """The batch's namespaces when the pattern names them, else every backend pattern; plus
        what the latency query must answer: the buckets, or the quantiles the routes show."""
        by_ns = self._by_namespace
        where = {t.namespace for t in items} if by_ns else {p for t in items for p in (t.stable, t.canary)}
        latency = {_BUCKETS if t.latency_max_ms is not None else f"{_QUANTILE}{t.quantile!r}" for t in items}
        return frozenset(where | latency)

    def _selector(self, scope: frozenset[str]) -> str:
        """A coarse matcher: a few namespace substrings, else the union of the patterns.

        A union of hundreds of ``.*``-led patterns costs Prometheus seconds per query; a few
        namespace substrings cost milliseconds. Each route's exact pattern is applied in ``match``.
        """
        where = sorted(x for x in scope if not x.startswith("\0"))
        if self._by_namespace:
            union = ".*(?:" + "|".join(promql.regex_escape(ns) for ns in where) + ").*"
        else:
            union = promql.regex_union(where)
        return f"{self._label}=~{promql.string_literal(union)}"

    async def fetch(self, client: PrometheusClient, window_s: float, scope: frozenset[str]) -> EnvoyIndex:
        selector = self._selector(scope)
        w = promql.duration(window_s)
        q_requests = f"sum by ({self._label}, {CODE_LABEL}) (increase({REQUESTS}{{{selector}}}[{w}]))"
        q_buckets = f"sum by ({self._label}, le) (rate({LATENCY_BUCKET}{{{selector}}}[{w}]))"
        wanted = sorted(float(x.removeprefix(_QUANTILE)) for x in scope if x.startswith(_QUANTILE))
        totals, buckets, shown = await asyncio.gather(
            client.query_reduce(q_requests, _reduce_requests(self._label)),
            client.query_reduce(q_buckets, _reduce_buckets(self._label)) if _BUCKETS in scope else _no_buckets(),
            asyncio.gather(
                *(
                    client.query_reduce(f"histogram_quantile({q!r}, {q_buckets})", _reduce_values(self._label))
                    for q in wanted
                )
            ),
        )
        return EnvoyIndex(totals, buckets, dict(zip(wanted, shown, strict=True)))

    async def measure(
        self, client: PrometheusClient, window_s: float, items: Sequence[EnvoyTarget]
    ) -> list[Observation]:
        """One batch on its own (no sharing)."""
        return self.match(await self.fetch(client, window_s, self.scope(items)), items)

    def _compile(self, pattern: str) -> re.Pattern[str]:
        rx = self._compiled.get(pattern)
        if rx is None:
            if len(self._compiled) >= _COMPILED_MAX:
                del self._compiled[next(iter(self._compiled))]  # oldest first
            rx = self._compiled[pattern] = re.compile(pattern)
        return rx

    def _candidates(self, index: EnvoyIndex, literal: str) -> list[str]:
        if self._indexed and literal:
            return index.by_run.get(literal, [])
        if literal:
            return [n for n in index.names if literal in n]
        return index.names

    def match(self, index: EnvoyIndex, items: Sequence[EnvoyTarget]) -> list[Observation]:
        cache: dict[tuple[float, float | None, bool, str], tuple[BackendStats, int]] = {}

        def stats(
            pattern: str, literal: str, quantile: float, limit: float | None, count_4xx: bool
        ) -> tuple[BackendStats, int]:
            """The backend's counts and how many of its clusters have request series."""
            key = (quantile, limit, count_4xx, pattern)
            hit = cache.get(key)
            if hit is not None:
                return hit
            fullmatch = self._compile(pattern).fullmatch
            matched = [n for n in self._candidates(index, literal) if fullmatch(n)]
            req = err = 0.0
            series = 0
            for n in matched:
                t = index.totals.get(n)
                if t is not None:
                    series += 1
                    req += t[0]
                    err += t[1] + (t[2] if count_4xx else 0.0)
            if limit is None and quantile in index.quantiles:
                latency, frac = _shown_quantile(index.quantiles[quantile], matched), None
            else:
                merged = _merged(index.buckets, matched)
                latency = histogram_quantile(quantile, merged)
                frac = None if limit is None else slow_fraction(limit, merged)
            out = cache[key] = (BackendStats(req, err, latency, None if frac is None else frac * req), series)
            return out

        def observation(t: EnvoyTarget) -> Observation:
            canary, c_series = stats(
                t.canary, t.canary_name if self._named else "", t.quantile, t.latency_max_ms, t.count_4xx
            )
            stable, s_series = stats(
                t.stable, t.stable_name if self._named else "", t.quantile, t.latency_max_ms, t.count_4xx
            )
            return Observation(self.name, canary=canary, stable=stable, series=c_series + s_series)

        return [observation(t) for t in items]


async def _no_buckets() -> dict[str, dict[float, float]]:
    return {}


def _merged(buckets: Mapping[str, dict[float, float]], names: Sequence[str]) -> Mapping[float, float]:
    if len(names) == 1:
        return buckets.get(names[0], {})
    merged: dict[float, float] = {}
    for n in names:
        for le, v in buckets.get(n, {}).items():
            merged[le] = merged.get(le, 0.0) + v
    return merged


def _shown_quantile(per_cluster: Mapping[str, float], names: Sequence[str]) -> float | None:
    """The backend's quantile from Prometheus' per-cluster answers: the largest, when a backend spans
    several clusters (a mixture's quantile is never above its parts' largest). Shown, never judged."""
    values = [per_cluster[n] for n in names if n in per_cluster]
    return max(values) if values else None
