"""canaryd's own /metrics, /healthz and /readyz (aiohttp), on a registry passed in.

Per-route series are labelled by namespace and route only (plus the phase, the signal of the route's
analysis and the backend role, canary or stable: a few values each), and removed when the route is
deleted or stops being managed; the analysis series also when its rollout ends (Promoted, RolledBack,
Failed), so a dashboard shows what is being judged now, not the last round of every past rollout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from canaryd.core.state import AnalysisRecord, Phase

ROLES = ("canary", "stable")
STEP_DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    registry: CollectorRegistry
    phase: Gauge
    canary_weight: Gauge
    step: Gauge
    transitions: Counter
    rollbacks: Counter
    analysis: Counter
    reconcile_seconds: Histogram
    patch_seconds: Histogram
    step_delay: Histogram
    last_transition: Gauge
    leader: Gauge
    patches: Counter
    overwrites: Counter
    success_ratio: Gauge
    request_rate: Gauge
    requests: Gauge
    latency: Gauge
    evidence: Gauge
    evidence_threshold: Gauge
    _signals: dict[tuple[str, str], set[str]] = field(default_factory=dict, init=False)  # shown, per route

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry or CollectorRegistry()
        return cls(
            registry=r,
            phase=Gauge(
                "canaryd_rollout_phase",
                "1 for the rollout's current phase",
                ["namespace", "route", "phase"],
                registry=r,
            ),
            canary_weight=Gauge(
                "canaryd_rollout_canary_weight", "Canary weight in percent", ["namespace", "route"], registry=r
            ),
            step=Gauge("canaryd_rollout_step", "Current step (1-based; 0 = none)", ["namespace", "route"], registry=r),
            transitions=Counter("canaryd_transitions", "Phase transitions", ["namespace", "route", "to"], registry=r),
            rollbacks=Counter("canaryd_rollbacks", "Rollbacks", ["namespace", "route"], registry=r),
            analysis=Counter("canaryd_analysis", "Analysis verdicts", ["verdict", "signal"], registry=r),
            reconcile_seconds=Histogram("canaryd_reconcile_seconds", "Time to reconcile one route", registry=r),
            patch_seconds=Histogram("canaryd_patch_seconds", "Time of one route patch", registry=r),
            step_delay=Histogram(
                "canaryd_step_delay_seconds",
                "How late a scheduled step was, from the state's next_at: stage=analysed (its last analysis round "
                "answered), sent (its patch sent: the daemon's share) or acknowledged (the apiserver answered)",
                ["stage"],
                buckets=STEP_DELAY_BUCKETS,
                registry=r,
            ),
            last_transition=Gauge(
                "canaryd_rollout_last_transition_timestamp_seconds",
                "Unix time of the last transition",
                ["namespace", "route"],
                registry=r,
            ),
            leader=Gauge("canaryd_leader", "Leases held: 1 when leading; with shards, shards held", registry=r),
            patches=Counter("canaryd_route_patches", "Route patches written", registry=r),
            overwrites=Counter(
                "canaryd_weight_overwrites",
                "Times someone else overwrote the managed weights mid-rollout (docs/gitops.md)",
                ["namespace", "route"],
                registry=r,
            ),
            **_analysis_gauges(r),
        )

    def set_analysis(self, namespace: str, route: str, records: Sequence[AnalysisRecord], window_s: float) -> None:
        """Show one analysis round (its records, one per signal); counts cover the ``window_s`` judged."""
        key = (namespace, route)
        shown: set[str] = set()
        for rec in records:
            labels = (namespace, route, rec.signal)
            for role, n, success, latency_ms in (
                ("canary", rec.canary_requests, rec.canary_success, rec.canary_latency_ms),
                ("stable", rec.stable_requests, rec.stable_success, rec.stable_latency_ms),
            ):
                _show(self.requests, (*labels, role), n)
                _show(self.request_rate, (*labels, role), None if n is None else n / max(window_s, 1.0))
                _show(self.success_ratio, (*labels, role), None if success is None else success / 100.0)
                _show(self.latency, (*labels, role), None if latency_ms is None else latency_ms / 1000.0)
            _show(self.evidence, labels, rec.evidence)
            _show(self.evidence_threshold, labels, rec.threshold)
            shown.add(rec.signal)
        for signal in self._signals.get(key, set()) - shown:
            self._forget_signal(namespace, route, signal)
        self._signals[key] = shown

    def forget_analysis(self, namespace: str, route: str) -> None:
        for signal in self._signals.pop((namespace, route), set()):
            self._forget_signal(namespace, route, signal)

    def _forget_signal(self, namespace: str, route: str, signal: str) -> None:
        for g in (self.requests, self.request_rate, self.success_ratio, self.latency):
            for role in ROLES:
                _show(g, (namespace, route, signal, role), None)
        for g in (self.evidence, self.evidence_threshold):
            _show(g, (namespace, route, signal), None)

    def set_phase(self, namespace: str, route: str, phase: str) -> None:
        for p in Phase:
            self.phase.labels(namespace, route, p.value).set(1 if p.value == phase else 0)

    def forget(self, namespace: str, route: str) -> None:
        for p in Phase:
            with contextlib.suppress(KeyError):
                self.phase.remove(namespace, route, p.value)
        for g in (self.canary_weight, self.step, self.last_transition, self.overwrites):
            with contextlib.suppress(KeyError):
                g.remove(namespace, route)
        self.forget_analysis(namespace, route)


def _analysis_gauges(r: CollectorRegistry) -> dict[str, Gauge]:
    per_role = ["namespace", "route", "signal", "role"]
    per_signal = ["namespace", "route", "signal"]
    return {
        "success_ratio": Gauge(
            "canaryd_analysis_success_ratio",
            "Success ratio (0..1) of the backend's requests the last round judged, since the rollout's counts started",
            per_role,
            registry=r,
        ),
        "request_rate": Gauge(
            "canaryd_analysis_request_rate",
            "Requests per second the backend served over the stretch the last round judged",
            per_role,
            registry=r,
        ),
        "requests": Gauge(
            "canaryd_analysis_requests",
            "Requests of the backend the last round judged (counted since the rollout's counts started)",
            per_role,
            registry=r,
        ),
        "latency": Gauge(
            "canaryd_analysis_latency_seconds",
            "The backend's latency at the configured quantile in the last round (when measured)",
            per_role,
            registry=r,
        ),
        "evidence": Gauge(
            "canaryd_analysis_evidence",
            "The judge's cumulative evidence of harm (an e-value) after the last round; rollback at the threshold",
            per_signal,
            registry=r,
        ),
        "evidence_threshold": Gauge(
            "canaryd_analysis_evidence_threshold",
            "The evidence at which the judge rolls back (1 / its share of 1 - confidence)",
            per_signal,
            registry=r,
        ),
    }


def _show(g: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    """Set the series, or remove it when there is no value (a missing sample, not a NaN)."""
    if value is None:
        with contextlib.suppress(KeyError):
            g.remove(*labels)
        return
    g.labels(*labels).set(value)


async def serve(metrics: Metrics, host: str, port: int, ready: Callable[[], bool]) -> web.AppRunner:
    async def metrics_handler(_req: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_req: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_req: web.Request) -> web.Response:
        return web.Response(text="ok") if ready() else web.Response(status=503, text="not ready")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
