"""The ``dapr`` signal: caller-side service-invocation success and latency per callee app-id.

Series (daprd, caller side; ``src_app_id`` on a *received response* is the callee):
``dapr_runtime_service_invocation_req_sent_total{app_id, dst_app_id}``,
``dapr_runtime_service_invocation_res_recv_total{app_id, src_app_id, status}``,
``dapr_runtime_service_invocation_res_recv_latency_ms_bucket{app_id, src_app_id, status, le}``.
Errors = sent - good responses, so transport failures, which record no response, count as errors.
The one error policy (as for envoy): an error is an HTTP status that is neither 2xx nor 4xx, or a
non-OK gRPC code; 4xx responses are the caller's fault and count as good unless the route (or the
cluster default) sets ``count-4xx``.

What a real daprd 1.14 records, and what follows:
- with gRPC proxying the callee's own daprd records sent/received with ``app_id`` = the callee
  itself: those series are excluded from the callee's counts (they would count every call twice);
- a dead callee daprd makes the caller send up to 4 times per request (1 try + 3 retries), so
  "sent" — and the error count — can be inflated up to 4x while it is down;
- an app-id that does not resolve records nothing at all: no traffic, so the verdict stays
  inconclusive (it never passes on no data).

With ``stable-app-id`` the canary (``app-id``) is compared to the stable app-id; otherwise
the whole service is measured (canary = the app-id, stable = None): with a shared daprd the
GAMMA split happens after Dapr, so Dapr cannot tell the versions apart.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from canaryd.core.analysis import AnalysisTarget, BackendStats, Observation
from canaryd.errors import MetricsError
from canaryd.metrics import promql
from canaryd.metrics.base import histogram_quantile, parse_le, slow_fraction
from canaryd.metrics.prometheus import PrometheusClient

SENT = "dapr_runtime_service_invocation_req_sent_total"
RECEIVED = "dapr_runtime_service_invocation_res_recv_total"
LATENCY_BUCKET = "dapr_runtime_service_invocation_res_recv_latency_ms_bucket"
_GOOD = re.compile(r"2..|0")  # HTTP 2xx, gRPC OK
_CLIENT_ERROR = re.compile(r"4..")


@dataclass(frozen=True)
class DaprTarget:
    canary: str  # callee app-id
    stable: str | None
    caller: str | None  # only responses seen by this caller app-id; None = all callers
    quantile: float
    latency_max_ms: float | None = None
    count_4xx: bool = False


Pairs = Iterator[tuple[Mapping[str, str], float]]


@dataclass
class DaprIndex:
    """The three dapr answers reduced, per callee app-id then per caller app-id."""

    sent: dict[str, dict[str, float]]  # callee -> caller -> requests sent
    ok: dict[str, dict[str, float]]  # callee -> caller -> good responses (2xx, gRPC OK)
    client_errors: dict[str, dict[str, float]]  # callee -> caller -> 4xx responses
    buckets: dict[str, dict[str, dict[float, float]]]  # callee -> caller -> {le: rate}


def _reduce_counts(callee_label: str, status: re.Pattern[str] | None) -> Callable[[Pairs], dict[str, dict[str, float]]]:
    """Sum by callee then caller; with ``status``, only series whose status label matches it."""

    def reduce(pairs: Pairs) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for labels, value in pairs:
            if status is not None and not status.fullmatch(labels.get("status", "")):
                continue
            by_caller = out.setdefault(labels.get(callee_label, ""), {})
            caller = labels.get("app_id", "")
            by_caller[caller] = by_caller.get(caller, 0.0) + value
        return out

    return reduce


def _split_received(pairs: Pairs) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    rows = list(pairs)
    return _reduce_counts("src_app_id", _GOOD)(iter(rows)), _reduce_counts("src_app_id", _CLIENT_ERROR)(iter(rows))


def _reduce_buckets(pairs: Pairs) -> dict[str, dict[str, dict[float, float]]]:
    out: dict[str, dict[str, dict[float, float]]] = {}
    for labels, value in pairs:
        le = parse_le(labels.get("le", ""))
        if le is not None and math.isfinite(value):
            b = out.setdefault(labels.get("src_app_id", ""), {}).setdefault(labels.get("app_id", ""), {})
            b[le] = b.get(le, 0.0) + value
    return out


class DaprSignal:
    name = "dapr"

    def prepare(self, target: AnalysisTarget) -> DaprTarget:
        spec = target.spec
        # Not placed in the queries today, but refused anyway so every signal treats a bad
        # namespace the same way.
        promql.safe_label("namespace", target.namespace)
        if spec.app_id is None:
            raise MetricsError("the dapr signal needs canaryd.io/app-id (the callee's Dapr app-id)")
        return DaprTarget(
            canary=promql.safe_label("app_id", spec.app_id),
            stable=promql.safe_label("stable_app_id", spec.stable_app_id) if spec.stable_app_id else None,
            caller=promql.safe_label("caller_app_id", spec.caller_app_id) if spec.caller_app_id else None,
            quantile=spec.latency_quantile,
            latency_max_ms=spec.latency_max_ms,
            count_4xx=spec.count_4xx,
        )

    def scope(self, items: Sequence[DaprTarget]) -> frozenset[str]:
        """The callee app-ids of the batch (an answer for more app-ids serves it too)."""
        return frozenset(a for t in items for a in (t.canary, t.stable) if a)

    async def fetch(self, client: PrometheusClient, window_s: float, scope: frozenset[str]) -> DaprIndex:
        union = promql.string_literal(promql.regex_union(promql.regex_escape(a) for a in sorted(scope)))
        w = promql.duration(window_s)
        # Grouped by caller too, so routes with and without caller-app-id share the queries.
        sent, (ok, client_errors), buckets = await asyncio.gather(
            client.query_reduce(
                f"sum by (app_id, dst_app_id) (increase({SENT}{{dst_app_id=~{union}}}[{w}]))",
                _reduce_counts("dst_app_id", None),
            ),
            client.query_reduce(
                f"sum by (app_id, src_app_id, status) (increase({RECEIVED}{{src_app_id=~{union}}}[{w}]))",
                _split_received,
            ),
            client.query_reduce(
                f"sum by (app_id, src_app_id, le) (rate({LATENCY_BUCKET}{{src_app_id=~{union}}}[{w}]))",
                _reduce_buckets,
            ),
        )
        return DaprIndex(sent, ok, client_errors, buckets)

    async def measure(
        self, client: PrometheusClient, window_s: float, items: Sequence[DaprTarget]
    ) -> list[Observation]:
        """One batch on its own (no sharing)."""
        return self.match(await self.fetch(client, window_s, self.scope(items)), items)

    def match(self, index: DaprIndex, items: Sequence[DaprTarget]) -> list[Observation]:
        def series(t: DaprTarget, callee: str | None) -> int:
            """Callers with sent or received series for ``callee`` (as ``stats`` counts them)."""
            if callee is None:
                return 0
            callers = {*index.sent.get(callee, {}), *index.ok.get(callee, {}), *index.client_errors.get(callee, {})}
            return len({t.caller} & callers if t.caller is not None else callers - {callee})

        def stats(t: DaprTarget, callee: str) -> BackendStats:
            caller = t.caller

            def pick(by_caller: dict[str, float]) -> float:
                if caller is None:  # every caller but the callee's own daprd (its gRPC proxy series)
                    return sum(v for app, v in by_caller.items() if app != callee)
                return by_caller.get(caller, 0.0)

            sent_n = pick(index.sent.get(callee, {}))
            ok_n = pick(index.ok.get(callee, {}))
            if not t.count_4xx:
                ok_n += pick(index.client_errors.get(callee, {}))
            merged: dict[float, float] = {}
            for src, b in index.buckets.get(callee, {}).items():
                if (caller is None and src != callee) or src == caller:
                    for le, v in b.items():
                        merged[le] = merged.get(le, 0.0) + v
            # In-flight requests at the window edges can make ok > sent by a little.
            errors = max(sent_n - ok_n, 0.0)
            frac = None if t.latency_max_ms is None else slow_fraction(t.latency_max_ms, merged)
            slow = None if frac is None else frac * sent_n
            return BackendStats(sent_n, errors, histogram_quantile(t.quantile, merged), slow)

        return [
            Observation(
                self.name,
                canary=stats(t, t.canary),
                stable=stats(t, t.stable) if t.stable else None,
                series=series(t, t.canary) + series(t, t.stable),
            )
            for t in items
        ]
