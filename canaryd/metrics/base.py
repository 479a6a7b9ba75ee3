"""Pieces shared by the signal modules: the batched-signal protocol and histogram maths."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

from canaryd.core.analysis import AnalysisTarget, Observation
from canaryd.metrics.prometheus import PrometheusClient

P = TypeVar("P")
I = TypeVar("I")  # noqa: E741 - the signal's compact answer ("index")


class BatchedSignal(Protocol, Generic[P, I]):
    """A signal whose queries can serve many routes at once.

    ``prepare`` validates one target (raising ``MetricsError`` before anything is queried) and
    returns what the signal needs. A batch is measured in two halves so the analyzer can share
    one answer between batches: ``scope`` names what the queries must cover for these items
    (namespaces, app-ids or cluster patterns; an answer for a superset serves them too),
    ``fetch`` issues a fixed number of queries for a scope and reduces the answers to a compact
    index (in the worker threads), and ``match`` returns one ``Observation`` per item, in order,
    from such an index.
    """

    name: str

    def prepare(self, target: AnalysisTarget) -> P: ...

    def scope(self, items: Sequence[P]) -> frozenset[str]: ...

    async def fetch(self, client: PrometheusClient, window_s: float, scope: frozenset[str]) -> I: ...

    def match(self, index: I, items: Sequence[P]) -> list[Observation]: ...


async def measure(
    signal: BatchedSignal[P, I], client: PrometheusClient, window_s: float, items: Sequence[P]
) -> list[Observation]:
    """One batch without sharing: fetch its scope, match its items."""
    return signal.match(await signal.fetch(client, window_s, signal.scope(items)), items)


def batch_key(signal: str, window_s: float) -> Hashable:
    # Windows are compared at millisecond resolution, the resolution of the PromQL range.
    return (signal, round(window_s * 1000))


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative bucket counts keyed by ``le``.

    Computed here (not in PromQL) so one batched bucket query serves routes asking for
    different quantiles, and so buckets of several cluster names can be summed first.
    Returns None when there is no observation (PromQL would return NaN).
    """
    if not buckets or math.inf not in buckets:
        return None
    les = sorted(buckets)
    counts: list[float] = []
    running = 0.0
    for le in les:
        # Rates of separately scraped buckets can be slightly non-monotonic; force it.
        running = max(running, buckets[le])
        counts.append(running)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, le in enumerate(les):
        if counts[i] >= rank:
            if math.isinf(le):
                return les[-2] if len(les) > 1 else None
            start = les[i - 1] if i > 0 else 0.0
            if i == 0 and le <= 0:
                return le
            below = counts[i - 1] if i > 0 else 0.0
            in_bucket = counts[i] - below
            if in_bucket <= 0:
                return le
            return start + (le - start) * (rank - below) / in_bucket
    return None


def slow_fraction(limit: float, buckets: Mapping[float, float]) -> float | None:
    """The fraction of observations slower than ``limit``, from cumulative buckets keyed by ``le``.

    The limit is rounded UP to the nearest bucket edge (a request is counted slow only when it
    is above an edge at or beyond the limit), so the count never blames the canary for requests
    a bucket cannot place; docs/analysis.md says how to align a limit with the buckets. None when
    there is no observation or no edge at or above the limit.
    """
    if not buckets or math.inf not in buckets:
        return None
    total = max(buckets.values())
    if total <= 0:
        return None
    edges = [le for le in sorted(buckets) if le >= limit]
    if not edges:
        return None
    # Cumulative counts are monotonic in ``le``; scraped rates may wobble, so take the largest below.
    at_edge = max(v for le, v in buckets.items() if le <= edges[0])
    return min(max((total - at_edge) / total, 0.0), 1.0)


def parse_le(raw: str) -> float | None:
    try:
        return float(raw)  # "+Inf" parses to inf
    except ValueError:
        return None
