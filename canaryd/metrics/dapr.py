"""The ``dapr`` signal: caller-side service-invocation success and latency per callee app-id.

Series (daprd, caller side; ``src_app_id`` on a *received response* is the callee):
``dapr_runtime_service_invocation_req_sent_total{app_id, dst_app_id}``,
``dapr_runtime_service_invocation_res_recv_total{app_id, src_app_id, status}``,
``dapr_runtime_service_invocation_res_recv_latency_ms_bucket{app_id, src_app_id, status, le}``.
Errors = sent - successful responses (status ``2..`` for HTTP apps, ``0`` for gRPC), so
transport failures, which record no response, count as errors.

With ``stable-app-id`` the canary (``app-id``) is compared to the stable app-id; otherwise
the whole service is measured (canary = the app-id, stable = None): with a shared daprd the
GAMMA split happens after Dapr, so Dapr cannot tell the versions apart.
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

SENT = "dapr_runtime_service_invocation_req_sent_total"
RECEIVED = "dapr_runtime_service_invocation_res_recv_total"
LATENCY_BUCKET = "dapr_runtime_service_invocation_res_recv_latency_ms_bucket"
_SUCCESS = re.compile(r"2..|0")


@dataclass(frozen=True)
class DaprTarget:
    canary: str  # callee app-id
    stable: str | None
    caller: str | None  # only responses seen by this caller app-id; None = all callers
    quantile: float


@dataclass
class _Acc:
    sent: float = 0.0
    ok: float = 0.0


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
        )

    async def measure(
        self, client: PrometheusClient, window_s: float, items: Sequence[DaprTarget]
    ) -> list[Observation]:
        ids = sorted({a for t in items for a in (t.canary, t.stable) if a})
        union = promql.string_literal(promql.regex_union(promql.regex_escape(a) for a in ids))
        w = promql.duration(window_s)
        # Grouped by caller too, so routes with and without caller-app-id share the queries.
        queries = (
            f"sum by (app_id, dst_app_id) (increase({SENT}{{dst_app_id=~{union}}}[{w}]))",
            f"sum by (app_id, src_app_id, status) (increase({RECEIVED}{{src_app_id=~{union}}}[{w}]))",
            f"sum by (app_id, src_app_id, le) (rate({LATENCY_BUCKET}{{src_app_id=~{union}}}[{w}]))",
        )
        sent, received, latency = await asyncio.gather(*(client.query(q) for q in queries))

        acc: dict[tuple[str, str], _Acc] = defaultdict(_Acc)  # (caller, callee)
        for s in sent:
            acc[(s.labels.get("app_id", ""), s.labels.get("dst_app_id", ""))].sent += s.value
        for s in received:
            if _SUCCESS.fullmatch(s.labels.get("status", "")):
                acc[(s.labels.get("app_id", ""), s.labels.get("src_app_id", ""))].ok += s.value
        buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for s in latency:
            le = parse_le(s.labels.get("le", ""))
            if le is not None and math.isfinite(s.value):
                buckets[(s.labels.get("app_id", ""), s.labels.get("src_app_id", ""))][le] += s.value

        def stats(callee: str, caller: str | None, quantile: float) -> BackendStats:
            sent_n = ok_n = 0.0
            merged: dict[float, float] = defaultdict(float)
            for (src, dst), a in acc.items():
                if dst == callee and (caller is None or src == caller):
                    sent_n += a.sent
                    ok_n += a.ok
            for (src, dst), b in buckets.items():
                if dst == callee and (caller is None or src == caller):
                    for le, v in b.items():
                        merged[le] += v
            # In-flight requests at the window edges can make ok > sent by a little.
            errors = max(sent_n - ok_n, 0.0)
            return BackendStats(sent_n, errors, histogram_quantile(quantile, merged))

        return [
            Observation(
                self.name,
                canary=stats(t.canary, t.caller, t.quantile),
                stable=stats(t.stable, t.caller, t.quantile) if t.stable else None,
            )
            for t in items
        ]
