"""Real Dapr: Sentry and two daprds (``ingress``, ``whoami`` in front of a local app) with mTLS,
scraped by the real Prometheus, measured by canaryd's ``dapr`` signal.

How the counts can be exact: Prometheus' ``increase()`` extrapolates the change it sees between
the first and last sample of the window to the window's edges. Every series compared here comes
from the same scrape of the ``ingress`` daprd (same timestamps), so they share one extrapolation
factor as long as the window starts after each series' first sample and no series' extrapolation
is cut at its zero point (``increase`` never extrapolates a counter below 0; with a warm-up as large
as the burst that cut lies farther than one scrape interval). Then the signal's error ratio equals
the sent ratio exactly, and its totals are the sent totals times that one factor (>= 1, bounded by
the window over the sampled span). The raw counters Prometheus scraped are compared exactly.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from canaryd.core.analysis import AnalysisTarget, Observation
from canaryd.metrics import PrometheusAnalyzer
from canaryd.metrics.dapr import RECEIVED, SENT
from canaryd.settings import PrometheusSettings
from devkit.devstack.dapr import WORKLOAD_TRUST_DOMAIN, DaprApp, DaprMesh, start_mesh
from devkit.devstack.prometheus import PrometheusServer
from tests.specs import analysis_spec

pytestmark = pytest.mark.integration

OK, FAILED = 30, 15  # per phase (warm-up, then the measured burst): 200s and 500s from the app


class StatusApp:
    """Answers ``/status/<code>`` with that code; records the Dapr headers of every request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, str | None]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(
            (
                request.method,
                request.path,
                request.headers.get("dapr-caller-app-id"),
                request.headers.get("dapr-callee-app-id"),
            )
        )
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"answered {code}\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/status/{code:[0-9]{3}}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def status_app() -> AsyncIterator[StatusApp]:
    app = StatusApp()
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def mesh_for(directory: Path, app: StatusApp, *, mtls: bool) -> DaprMesh:
    # In a thread: daprd calls the app (on this event loop) while start_mesh waits for it.
    apps = [DaprApp("ingress"), DaprApp("whoami", app_port=app.port)]
    return await asyncio.to_thread(start_mesh, directory, apps, mtls=mtls)


async def invoke(mesh: DaprMesh, session: aiohttp.ClientSession, ok: int, failed: int) -> Counter[int]:
    """``ok`` 200s and ``failed`` 500s through the ingress daprd, alternating GET and POST."""
    codes = [200] * ok + [500] * failed
    got: Counter[int] = Counter()
    ingress = mesh.daprds["ingress"]
    for i, code in enumerate(codes):
        method = "GET" if i % 2 else "POST"
        url = ingress.invoke_url("whoami", f"status/{code}", namespace="default")
        async with session.request(method, url, data=b"x" if method == "POST" else None) as resp:
            body = await resp.text()
            assert resp.status == code, f"{method} {url}: {resp.status} {body!r}"
            assert body == f"answered {code}\n"
            got[resp.status] += 1
    return got


def tls_identity(port: int, trust_anchors: Path | None) -> list[str]:
    """The URI SANs of the certificate served on 127.0.0.1:``port``, verified against the mesh's
    root CA (the daprd then refuses us for lack of a client certificate; the handshake is done)."""
    ctx = ssl.create_default_context(cafile=str(trust_anchors) if trust_anchors else None)
    ctx.check_hostname = False  # SPIFFE certificates carry a URI, no DNS name
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        cert = tls.getpeercert()
    sans: Any = cert.get("subjectAltName", ()) if cert else ()
    return [str(v) for k, v in sans if k == "URI"]


def samples(prometheus: PrometheusServer, selector: str) -> list[tuple[float, float]]:
    """The raw samples (timestamp, value) Prometheus holds for one series over the last minutes."""
    result = prometheus.query(f"{selector}[10m]")
    assert len(result) <= 1, f"{selector} matches {len(result)} series: {result}"
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


async def wait_scraped(prometheus: PrometheusServer, want: Mapping[str, float], plateau: int = 1) -> None:
    """Until every selector's latest sample equals its wanted value, ``plateau`` samples in a row."""
    deadline = time.monotonic() + 60
    last: dict[str, list[tuple[float, float]]] = {}
    while time.monotonic() < deadline:
        last = {sel: await asyncio.to_thread(samples, prometheus, sel) for sel in want}
        if all(len(s) >= plateau and all(v == want[sel] for _, v in s[-plateau:]) for sel, s in last.items()):
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"Prometheus never scraped {want} ({plateau} samples in a row): {last}")


def dapr_target(window_s: float, caller: str | None) -> AnalysisTarget:
    spec = analysis_spec(signals=("dapr",), window_s=window_s, app_id="whoami", caller_app_id=caller)
    return AnalysisTarget("default", "whoami", "whoami", 80, "whoami-v1", "whoami-v2", spec)


@dataclass(frozen=True)
class Series:
    """The selectors of one mesh's series, pinned to its scrape targets (the session Prometheus
    may hold other meshes' series with the same app-ids)."""

    ingress: str  # the caller daprd's metrics address (instance label)
    whoami: str

    def sent(self) -> str:
        return f'{SENT}{{instance="{self.ingress}",app_id="ingress",dst_app_id="whoami"}}'

    def received(self, status: int) -> str:
        return f'{RECEIVED}{{instance="{self.ingress}",app_id="ingress",src_app_id="whoami",status="{status}"}}'

    def callee_received(self) -> str:
        return f'dapr_runtime_service_invocation_req_recv_total{{instance="{self.whoami}",src_app_id="ingress"}}'

    def callee_authenticated(self) -> str:
        """The callee's ACL check labels each call with the SPIFFE ID of the caller's client certificate."""
        return (
            f'dapr_runtime_acl_global_policy_action_allowed_total{{instance="{self.whoami}",'
            f'app_id="ingress",namespace="default",trustDomain="{WORKLOAD_TRUST_DOMAIN}"}}'
        )


def extrapolation_factors(stamps: list[float], window_s: float, evaluated: tuple[float, float]) -> set[float]:
    """Prometheus' ``increase()`` factor for samples at ``stamps``, evaluated at either end of
    ``evaluated``: both edges lie within one scrape interval of a sample, so it extrapolates to
    both, i.e. ``window / (last - first sample in the window)`` (Prometheus 2.x: closed range)."""
    out = set()
    for at in evaluated:
        inside = [t for t in stamps if at - window_s <= t <= at]
        out.add(window_s / (inside[-1] - inside[0]))
    return out


async def test_invocation_through_real_daprds_with_mtls_measured_by_the_dapr_signal(
    tmp_path: Path, prometheus: PrometheusServer, status_app: StatusApp
) -> None:
    mesh = await mesh_for(tmp_path, status_app, mtls=True)
    try:
        mesh.add_scrape_targets(prometheus)
        for job in mesh.scrape_jobs:
            await prometheus.wait_target_up(job)
        await check_mtls(mesh, prometheus)
        await check_counts(mesh, prometheus, status_app)
    finally:
        for job in mesh.scrape_jobs:
            prometheus.remove_target(job)
        await asyncio.to_thread(mesh.stop)


async def check_mtls(mesh: DaprMesh, prometheus: PrometheusServer) -> None:
    """mTLS, from the processes themselves (the callee's side is in ``check_counts``)."""
    assert mesh.sentry is not None
    # Sentry signed both daprds' certificates (its own is not requested over gRPC)...
    sentry = mesh.sentry.metrics_address
    signed = ("cert_sign_request_received", "cert_sign_success")
    await wait_scraped(prometheus, {f'dapr_sentry_{m}_total{{instance="{sentry}"}}': 2 for m in signed})
    # ...and each internal gRPC port (the daprd-to-daprd hop) serves the daprd's SPIFFE identity,
    # chained to the mesh's root CA.
    for app_id, d in mesh.daprds.items():
        want = f"spiffe://{WORKLOAD_TRUST_DOMAIN}/ns/default/{app_id}"
        assert await asyncio.to_thread(tls_identity, d.internal_grpc_port, mesh.sentry.trust_anchors) == [want]
        assert "mTLS is disabled" not in d.log_file.read_text()


async def check_counts(mesh: DaprMesh, prometheus: PrometheusServer, app: StatusApp) -> None:
    series = Series(mesh.daprds["ingress"].metrics_address, mesh.daprds["whoami"].metrics_address)
    burst = OK + FAILED
    async with aiohttp.ClientSession() as session:
        # Warm-up: the series exist, and stay flat for 4 scrapes, before the measured burst.
        assert await invoke(mesh, session, OK, FAILED) == Counter({200: OK, 500: FAILED})
        await wait_scraped(prometheus, {series.sent(): burst, series.received(500): FAILED}, plateau=4)
        burst_start = time.time()
        assert await invoke(mesh, session, OK, FAILED) == Counter({200: OK, 500: FAILED})

    # The app saw every request once, with Dapr's caller/callee headers: no retry on a 500.
    assert len(app.seen) == 2 * burst
    assert {(caller, callee) for _, _, caller, callee in app.seen} == {("ingress", "whoami")}
    assert Counter(path for _, path, _, _ in app.seen) == {"/status/200": 2 * OK, "/status/500": 2 * FAILED}

    # The raw counters Prometheus scraped are the exact counts, caller and callee side, and the
    # callee authenticated every call as spiffe://public/ns/default/ingress.
    exact = {
        series.sent(): 2 * burst,
        series.received(200): 2 * OK,
        series.received(500): 2 * FAILED,
        series.callee_received(): 2 * burst,
        series.callee_authenticated(): 2 * burst,
    }
    await wait_scraped(prometheus, exact)

    # canaryd's dapr signal, over a window that starts on the flat stretch before the burst
    # (window in whole milliseconds, as canaryd renders it).
    stamps = [t for t, _ in samples(prometheus, series.sent())]
    flat = [t for t, v in samples(prometheus, series.sent()) if v == burst and t < burst_start]
    before = time.time()
    window_s = round(before - (flat[0] + flat[-1]) / 2, 3)
    observed = await dapr_signal(prometheus, window_s)
    factors = extrapolation_factors(stamps, window_s, (before, time.time()))
    for obs in observed:
        assert obs.error is None and obs.canary is not None, obs
        c = obs.canary
        # Exactly the burst, extrapolated like every increase(); 500s are the errors, 200s the rest.
        assert any(c.requests == pytest.approx(burst * f, rel=1e-6) for f in factors), (c, factors, window_s)
        assert c.errors == pytest.approx(FAILED * c.requests / burst, rel=1e-9), c
        assert c.success_rate == pytest.approx(100.0 * OK / burst, rel=1e-9), c
        assert c.latency_ms is not None and c.latency_ms > 0


async def dapr_signal(prometheus: PrometheusServer, window_s: float) -> list[Observation]:
    """The whoami app-id as seen by the ingress caller, and by every caller."""
    analyzer = PrometheusAnalyzer(PrometheusSettings(url=prometheus.url, timeout_s=5.0))
    try:
        answers = await asyncio.gather(*(analyzer.analyze(dapr_target(window_s, c)) for c in ("ingress", None)))
    finally:
        await analyzer.aclose()
    return [obs for (obs,) in answers]


async def test_without_mtls_the_daprd_hop_is_plaintext(tmp_path: Path, status_app: StatusApp) -> None:
    mesh = await mesh_for(tmp_path, status_app, mtls=False)
    try:
        assert mesh.sentry is None and "dapr-sentry" not in mesh.pids
        async with aiohttp.ClientSession() as session:
            assert await invoke(mesh, session, 2, 1) == Counter({200: 2, 500: 1})
        whoami = mesh.daprds["whoami"]
        assert "mTLS is disabled" in whoami.log_file.read_text()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # gRPC in clear text: no TLS handshake
            tls_identity(whoami.internal_grpc_port, None)
    finally:
        await asyncio.to_thread(mesh.stop)
