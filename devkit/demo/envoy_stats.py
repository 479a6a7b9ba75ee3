"""Envoy's upstream cluster stats, as Cilium's Envoy exposes them on ``/stats/prometheus``. Pure.

The demo data plane counts what Envoy's router counts for a cluster and renders the same bytes
Envoy's admin handler would for those series. The shape follows envoyproxy/envoy
``source/server/admin/prometheus_stats.cc`` (the text format of ``statsAsPrometheusText``) and
its expectations in ``test/server/admin/prometheus_stats_test.cc`` (``OutputWithAllMetricTypes``,
``OutputSortedByMetricName``, ``HistogramWithHighCounts``) of recent Envoy releases:

* **Names.** A stat ``cluster.<cluster>.upstream_rq_503`` is tag-extracted into the name
  ``cluster.upstream_rq`` with the tags ``envoy_response_code="503"`` (the extractor without a
  name prefix runs first) and ``envoy_cluster_name="<cluster>"``; the Prometheus name is
  ``envoy_`` + the name with every character outside ``[a-zA-Z0-9_]`` turned into ``_``.
  ``upstream_rq_5xx`` becomes ``envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",…}``.
* **Clusters.** Cilium names a GAMMA cluster ``<ns>:<svc>:<port>`` and qualifies it with the
  CiliumEnvoyConfig's ``<namespace>/<name>`` (the parent Service for GAMMA, ``cilium-gateway-<gw>``
  for a Gateway); Envoy's stat names turn ``:`` into ``_`` and keep ``/``:
  ``demo/whoami/demo_whoami-v2_80`` (:func:`cluster_name`).
* **Order and layout.** Counters first, then histograms (gauges and text readouts would sit in
  between; none are served here). Families sorted by their tag-extracted name; within a family
  the series sorted by the full stat name (cluster, then the stat's own suffix). Every family is
  one ``# TYPE <name> <counter|histogram>`` line followed by its samples, no ``# HELP`` and no
  blank line between families. Counter values are integers.
* **Histograms** (``upstream_rq_time``, milliseconds, recorded as whole milliseconds like Envoy's
  ``duration_cast<milliseconds>``): Envoy's default bounds (:data:`ENVOY_BUCKETS_MS`, from
  ``source/common/stats/histogram_impl.cc``) printed with ``{:.32g}``, then ``le="+Inf"``, ``_sum``
  and ``_count``. Envoy keeps samples in a log-linear histogram (circllhist: bins of two
  significant digits, e.g. [3, 3.1), [42, 43), [250, 260)); a bucket counts every bin whose lower
  edge is <= its bound, and ``_sum`` adds up ``2·lo·hi/(lo+hi)`` per sample of a bin ``[lo, hi)``,
  printed with ``{:.32g}`` — this reproduces Envoy's test figures to the last digit
  (``5531.1160155998386471765115857124`` for 20, 30, 50, 70, 100, 200, 5000 ms).

Not modelled: the other stats of a cluster (``upstream_cx_*``, ``internal``/``external`` twins),
and that Envoy refreshes histograms on its stats flush (every 5 s) while counters are live.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

# Envoy's default histogram bucket bounds (Stats::HistogramSettingsImpl::defaultBuckets()).
ENVOY_BUCKETS_MS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
CLUSTER_TAG = "envoy_cluster_name"
CODE_TAG = "envoy_response_code"
CLASS_TAG = "envoy_response_code_class"
GATEWAY_PREFIX = "cilium-gateway-"
CONTENT_TYPE = "text/plain; charset=UTF-8"

_PROM_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def cluster_name(namespace: str, parent: str, service: str, port: int) -> str:
    """Envoy's stat name of Cilium's cluster for ``service:port`` under ``parent`` (a Service for
    GAMMA, ``cilium-gateway-<gw>`` for a Gateway): ``<ns>/<parent>/<ns>_<svc>_<port>``."""
    return f"{namespace}/{parent}/{namespace}_{service}_{port}"


def gateway_parent(gateway: str) -> str:
    """The CiliumEnvoyConfig name Cilium gives a Gateway's resources."""
    return GATEWAY_PREFIX + gateway


@dataclass
class ClusterStats:
    """What Envoy's router charged to one cluster. Mutable; only ever counts up."""

    codes: Counter[int] = field(default_factory=Counter)  # upstream_rq_<code>
    total: int = 0  # upstream_rq_total: requests sent on an upstream connection
    times_ms: Counter[int] = field(default_factory=Counter)  # upstream_rq_time samples, whole ms

    def charge(self, code: int, *, sent: bool, upstream_ms: int | None) -> None:
        """One answered request: ``code`` (also for a locally made 503), ``sent`` when it went out on
        a connection, ``upstream_ms`` when an upstream response came back (timed from the attempt)."""
        self.codes[code] += 1
        if sent:
            self.total += 1
        if upstream_ms is not None:
            self.times_ms[max(0, upstream_ms)] += 1


@dataclass
class EnvoyStats:
    """The clusters of one Envoy; a cluster exists (all zeros) from the moment it is configured."""

    clusters: dict[str, ClusterStats] = field(default_factory=dict)

    def ensure(self, names: Iterable[str]) -> None:
        for name in names:
            self.clusters.setdefault(name, ClusterStats())

    def cluster(self, name: str) -> ClusterStats:
        return self.clusters.setdefault(name, ClusterStats())

    def render(self) -> str:
        return render(self.clusters)


# --------------------------------------------------------------------------- exposition


def render(clusters: Mapping[str, ClusterStats]) -> str:
    """The ``/stats/prometheus`` text of these clusters' request stats."""
    names = sorted(clusters)
    out: list[str] = []
    _family(out, "cluster.upstream_rq", "counter", _codes(clusters, names))
    _family(out, "cluster.upstream_rq_total", "counter", _totals(clusters, names))
    _family(out, "cluster.upstream_rq_xx", "counter", _classes(clusters, names))
    hist = [_histogram_lines(prom_name("cluster.upstream_rq_time"), n, clusters[n]) for n in names]
    if hist:
        out.append(f"# TYPE {prom_name('cluster.upstream_rq_time')} histogram\n")
        out.extend(line for lines in hist for line in lines)
    return "".join(out)


def prom_name(tag_extracted: str) -> str:
    return "envoy_" + _PROM_UNSAFE.sub("_", tag_extracted)


def format_tags(tags: Iterable[tuple[str, str]]) -> str:
    """``name="value"`` pairs in the given order; values escaped as Envoy escapes them."""
    return ",".join(f'{_PROM_UNSAFE.sub("_", k)}="{_escape(v)}"' for k, v in tags)


def format_double(x: float) -> str:
    """fmt's ``{:.32g}``: up to 32 significant digits, no trailing zeros."""
    return format(x, ".32g")


Series = tuple[tuple[tuple[str, str], ...], int]


def _family(out: list[str], tag_extracted: str, kind: str, series: list[Series]) -> None:
    if not series:
        return
    name = prom_name(tag_extracted)
    out.append(f"# TYPE {name} {kind}\n")
    out.extend(f"{name}{{{format_tags(tags)}}} {value}\n" for tags, value in series)


def _codes(clusters: Mapping[str, ClusterStats], names: list[str]) -> list[Series]:
    # Sorted by stat name: cluster, then "upstream_rq_<code>" as a string.
    return [
        (((CODE_TAG, code), (CLUSTER_TAG, n)), v)
        for n in names
        for code, v in sorted((str(c), v) for c, v in clusters[n].codes.items())
    ]


def _totals(clusters: Mapping[str, ClusterStats], names: list[str]) -> list[Series]:
    return [(((CLUSTER_TAG, n),), clusters[n].total) for n in names]


def _classes(clusters: Mapping[str, ClusterStats], names: list[str]) -> list[Series]:
    out: list[Series] = []
    for n in names:
        by_class: Counter[str] = Counter()
        for code, v in clusters[n].codes.items():
            by_class[str(code // 100)] += v
        out.extend((((CLASS_TAG, cls), (CLUSTER_TAG, n)), v) for cls, v in sorted(by_class.items()))
    return out


def _histogram_lines(name: str, cluster: str, stats: ClusterStats) -> Iterator[str]:
    tags = format_tags([(CLUSTER_TAG, cluster)])
    merged: Counter[tuple[float, float]] = Counter()
    for ms, n in stats.times_ms.items():
        merged[_bin(ms)] += n
    bins = sorted(merged.items())
    count = sum(n for _, n in bins)
    for bound in ENVOY_BUCKETS_MS:
        below = sum(n for (lo, _hi), n in bins if lo <= bound)
        yield f'{name}_bucket{{{tags},le="{format_double(bound)}"}} {below}\n'
    yield f'{name}_bucket{{{tags},le="+Inf"}} {count}\n'
    yield f"{name}_sum{{{tags}}} {format_double(_approx_sum(bins))}\n"
    yield f"{name}_count{{{tags}}} {count}\n"


def _bin(ms: int) -> tuple[float, float]:
    """circllhist's bin of a whole number: two significant digits, ``val/10 · 10^exp`` wide 10^exp/10."""
    if ms <= 0:
        return (0.0, 0.0)
    exp = len(str(ms)) - 1
    val = ms * 10 // 10**exp
    power = float(10**exp)
    lo = (val / 10.0) * power
    return (lo, lo + power / 10.0)


def _approx_sum(bins: list[tuple[tuple[float, float], int]]) -> float:
    total = 0.0
    for (lo, hi), n in bins:
        mid = 0.0 if hi == 0.0 else 2.0 * lo * hi / (lo + hi)
        total += mid * float(n)
    return total


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
