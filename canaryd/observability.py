"""canaryd's own /metrics, /healthz and /readyz (aiohttp), on a registry passed in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from canaryd.core.state import Phase


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
    last_transition: Gauge
    leader: Gauge
    patches: Counter

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
            last_transition=Gauge(
                "canaryd_rollout_last_transition_timestamp_seconds",
                "Unix time of the last transition",
                ["namespace", "route"],
                registry=r,
            ),
            leader=Gauge("canaryd_leader", "1 when this replica leads", registry=r),
            patches=Counter("canaryd_route_patches", "Route patches written", registry=r),
        )

    def set_phase(self, namespace: str, route: str, phase: str) -> None:
        for p in Phase:
            self.phase.labels(namespace, route, p.value).set(1 if p.value == phase else 0)

    def forget(self, namespace: str, route: str) -> None:
        for p in Phase:
            with contextlib.suppress(KeyError):
                self.phase.remove(namespace, route, p.value)
        for g in (self.canary_weight, self.step, self.last_transition):
            with contextlib.suppress(KeyError):
                g.remove(namespace, route)


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
