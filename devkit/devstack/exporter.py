"""A fake metrics endpoint serving Envoy- and Dapr-shaped series with controllable traffic.

Counters advance with real (monotonic) time at the configured rates, so ``rate()`` and
``increase()`` in Prometheus behave as with real proxies. Used by the tests, the demo and the
benchmark::

    exp = MetricsExporter()
    await exp.start()
    exp.set_backend("ns/whoami/ns_whoami-v2_80", rps=50, error_ratio=0.05, latency_ms=40)
    exp.set_dapr("ingress", "whoami", rps=20)
    prometheus.add_target("fake", exp.address)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

# Envoy's default histogram buckets (ms) and Dapr's default latency distribution (ms).
ENVOY_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_K = TypeVar("_K")

DAPR_BUCKETS_MS = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    13,
    16,
    20,
    25,
    30,
    40,
    50,
    65,
    80,
    100,
    130,
    160,
    200,
    250,
    300,
    400,
    500,
    650,
    800,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
    100000,
)


@dataclass
class _Traffic:
    """Accumulated counts of one stream of requests; all requests take ``latency_ms``."""

    rps: float
    error_ratio: float
    latency_ms: float
    lost_ratio: float = 0.0  # Dapr only: sent but no response (transport failure)
    ok: float = 0.0
    errors: float = 0.0
    lost: float = 0.0
    latency_sum: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    last: float = field(default_factory=time.monotonic)

    def advance(self, now: float, bucket_bounds: Iterable[float]) -> None:
        dt = max(0.0, now - self.last)
        self.last = now
        n = self.rps * dt
        lost = n * self.lost_ratio
        answered = n - lost
        errors = answered * self.error_ratio
        self.lost += lost
        self.errors += errors
        self.ok += answered - errors
        self.latency_sum += answered * self.latency_ms
        for le in bucket_bounds:
            if self.latency_ms <= le:
                self.buckets[le] = self.buckets.get(le, 0.0) + answered
            else:
                self.buckets.setdefault(le, 0.0)

    @property
    def answered(self) -> float:
        return self.ok + self.errors


def _validate(rps: float, error_ratio: float, latency_ms: float, lost_ratio: float = 0.0) -> None:
    if rps < 0 or latency_ms < 0:
        raise ValueError("rps and latency_ms must be >= 0")
    if not (0 <= error_ratio <= 1 and 0 <= lost_ratio <= 1):
        raise ValueError("error_ratio and lost_ratio must be within 0..1")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


class MetricsExporter:
    """aiohttp server on 127.0.0.1 serving ``/metrics`` (and ``/`` like daprd)."""

    def __init__(self) -> None:
        self._envoy: dict[str, _Traffic] = {}
        self._dapr: dict[tuple[str, str], _Traffic] = {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self.scrapes = 0

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("exporter is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> MetricsExporter:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        app.router.add_get("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only here
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self._port = int(sockets[0].getsockname()[1]) if sockets else port
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- traffic control ---------------------------------------------------------------------

    def set_backend(self, cluster_name: str, *, rps: float, error_ratio: float = 0.0, latency_ms: float = 10.0) -> None:
        """Traffic Envoy sends to one upstream cluster (counted from now on)."""
        _validate(rps, error_ratio, latency_ms)
        self._set(self._envoy, cluster_name, ENVOY_BUCKETS_MS, rps, error_ratio, latency_ms, 0.0)

    def set_dapr(
        self,
        caller_app_id: str,
        callee_app_id: str,
        *,
        rps: float,
        error_ratio: float = 0.0,
        latency_ms: float = 10.0,
        lost_ratio: float = 0.0,
    ) -> None:
        """Service invocation from ``caller`` to ``callee`` as seen by the caller's daprd:
        ``error_ratio`` of the answers are HTTP 500, ``lost_ratio`` of the requests get none."""
        _validate(rps, error_ratio, latency_ms, lost_ratio)
        key = (caller_app_id, callee_app_id)
        self._set(self._dapr, key, DAPR_BUCKETS_MS, rps, error_ratio, latency_ms, lost_ratio)

    def remove_backend(self, cluster_name: str) -> None:
        self._envoy.pop(cluster_name, None)

    def _set(
        self,
        table: dict[_K, _Traffic],
        key: _K,
        bounds: Iterable[float],
        rps: float,
        error_ratio: float,
        latency_ms: float,
        lost_ratio: float,
    ) -> None:
        now = time.monotonic()
        current = table.get(key)
        if current is None:
            table[key] = _Traffic(rps, error_ratio, latency_ms, lost_ratio, last=now)
            return
        current.advance(now, bounds)  # settle the old rates up to now, then switch
        current.rps, current.error_ratio = rps, error_ratio
        current.latency_ms, current.lost_ratio = latency_ms, lost_ratio

    # -- exposition ------------------------------------------------------------------------------

    async def _handle(self, _request: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(text=self.render(), content_type="text/plain")

    def render(self) -> str:
        now = time.monotonic()
        lines: list[str] = []
        lines += [
            "# TYPE envoy_cluster_upstream_rq counter",
            "# TYPE envoy_cluster_upstream_rq_total counter",
            "# TYPE envoy_cluster_upstream_rq_time histogram",
        ]
        for name, t in sorted(self._envoy.items()):
            t.advance(now, ENVOY_BUCKETS_MS)
            lines.append(
                f"envoy_cluster_upstream_rq{_labels(envoy_cluster_name=name, envoy_response_code='200')} {t.ok:.3f}"
            )
            lines.append(
                f"envoy_cluster_upstream_rq{_labels(envoy_cluster_name=name, envoy_response_code='503')} {t.errors:.3f}"
            )
            lines.append(f"envoy_cluster_upstream_rq_total{_labels(envoy_cluster_name=name)} {t.answered:.3f}")
            lines += self._histogram(
                "envoy_cluster_upstream_rq_time", {"envoy_cluster_name": name}, t, ENVOY_BUCKETS_MS
            )
        prefix = "dapr_runtime_service_invocation"
        lines += [
            f"# TYPE {prefix}_req_sent_total counter",
            f"# TYPE {prefix}_res_recv_total counter",
            f"# TYPE {prefix}_res_recv_latency_ms histogram",
        ]
        for (caller, callee), t in sorted(self._dapr.items()):
            t.advance(now, DAPR_BUCKETS_MS)
            sent = t.answered + t.lost
            lines.append(f"{prefix}_req_sent_total{_labels(app_id=caller, dst_app_id=callee, type='unary')} {sent:.3f}")
            for status, value in (("200", t.ok), ("500", t.errors)):
                lbl = _labels(app_id=caller, src_app_id=callee, status=status, type="unary")
                lines.append(f"{prefix}_res_recv_total{lbl} {value:.3f}")
            lines += self._histogram(
                f"{prefix}_res_recv_latency_ms",
                {"app_id": caller, "src_app_id": callee, "status": "200"},
                t,
                DAPR_BUCKETS_MS,
            )
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(name: str, labels: dict[str, str], t: _Traffic, bounds: Iterable[float]) -> list[str]:
        out = []
        for le in bounds:
            out.append(f"{name}_bucket{_labels(**labels, le=_le(le))} {t.buckets.get(le, 0.0):.3f}")
        out.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {t.answered:.3f}")
        out.append(f"{name}_sum{_labels(**labels)} {t.latency_sum:.3f}")
        out.append(f"{name}_count{_labels(**labels)} {t.answered:.3f}")
        return out
