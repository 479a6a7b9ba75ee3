"""``canaryd demo``: two rollouts end to end on one machine, through the reference setup's request path.

Plays the cluster's data plane and the user; canaryd itself runs unmodified as ``python -m canaryd
run`` in a subprocess and only sees the apiserver and Prometheus. The flow:

1. the devstack: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (one fake
   Node) and Prometheus at a 1 s scrape, built or reused;
2. the seed's manifests from config/samples/, applied with kubectl: the ``whoami`` Service, the
   Deployments and Services ``whoami-v1``/``-v2``/``-v3``, the GAMMA HTTPRoute
   ``whoami-route-service`` (v1 100 / v2 0, no canaryd annotation yet) and, from
   config/samples/ingress/, the Gateway ``default-gateway`` with the Dapr-ized ingress route
   (URLRewrite to ``/v1.0/invoke/whoami.default/method/``, backend ``ingress-dapr:3500``). The
   real controllers make the Pods, kwok runs them to Ready, the EndpointSlice controller lists them;
3. the local data plane (devkit.demo.dataplane): the Gateway listener, the GAMMA split of the
   whoami Service, Envoy's metrics, and one local whoami process per Pod (the pod runner);
4. real Dapr (devkit.devstack.dapr): Sentry and two daprds with mTLS, ``ingress`` (behind the
   ``ingress-dapr`` Service) and ``whoami`` in Dapr-shared style, its app channel pointing at the
   data plane's listener for the whoami Service; Prometheus scrapes both daprds and the data plane;
5. ``canaryd run`` (leader election off, this namespace only) and fixed-rate load at the Gateway;
6. rollout 1: annotate the route for canary whoami-v2 (healthy) → Promoted;
7. rollout 2: swap the rule to v2 100 / v3 0 and make whoami-v3 the canary → RolledBack. v3 is
   the seed's bad release: its container listens on 8080 while its Service targets 80, so every
   request it is sent ends in Envoy's upstream connect error (503) — seen per version by the
   ``envoy`` signal and, for the whole service, by the ``dapr`` signal on the daprds' real series.

A request: load → Gateway listener (rewrite) → ingress daprd → (mTLS) → whoami daprd → the
whoami Service's GAMMA split → the local process standing in for one of the Pods the
EndpointSlice lists. Progress comes from a watch on the route (one line per change of phase,
step, weights or analysis round). Every process started here is stopped in ``finally`` (also on
Ctrl-C); the namespace's objects stay for a look (``--keep`` keeps the whole stack).

Statistics. A round is judged only with ``min_requests`` canary requests in the window; the
analysis window is sized so the first step collects ``min_requests`` at the demo's request rate
(``DemoConfig.window_s``).

Must not: import the controller (engine, judge, routes); it reads the state annotation through
the public codec ``canaryd.core.state`` only. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from kubernetes_asyncio import client

from canaryd.core.state import AnalysisRecord, Phase, RolloutState
from canaryd.errors import CanarydError
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, Api, new_client
from canaryd.kube.api import lister
from canaryd.kube.informer import Informer
from devkit.demo.dataplane import apply_local_daprd
from devkit.demo.loadgen import NO_BACKEND, Result, run_load
from devkit.devstack.controllers import NODE_NAME
from devkit.devstack.dapr import DaprApp, DaprMesh, start_mesh
from devkit.devstack.prometheus import PrometheusServer, free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "config" / "samples"
SEED_MANIFESTS = (
    SAMPLES / "whoami.yaml",
    SAMPLES / "httproute-whoami-route-service.yaml",
    SAMPLES / "ingress" / "gateway.yaml",
)
ROUTE = "whoami-route-service"
PARENT = "whoami"
GATEWAY_LISTENER = "default-gateway/http"
APP_ID = "whoami"
CALLER_APP_ID = "ingress"
VERSIONS = ("whoami-v1", "whoami-v2", "whoami-v3")
STATE_ANNOTATION = "canaryd.io/state"
_JSON_PATCH: dict[str, Any] = {"_content_type": "application/json-patch+json"}
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}
SIGMAS = 4.0  # binomial tolerance of the per-step shares (a false alarm ≈ 1 in 15,000 per check)


class DemoError(CanarydError):
    """The demo could not run or did not end as it should; the message says where to look."""


@dataclass(frozen=True)
class DemoConfig:
    namespace: str = "default"  # the seed's (its rewrite names whoami.default)
    interval_s: float = 3.0
    rate: float = 50.0  # requests per second from the load generator
    steps: tuple[int, ...] = (20, 50, 80, 100)
    min_requests: int = 150
    success_rate_min: float = 95.0
    failure_threshold: int = 2
    baseline_s: float = 3.0  # load before the first rollout starts (Prometheus gets a history)
    hold_s: float | None = None  # how long to keep each final state visible (default: interval)
    settle_s: float = 1.0  # excluded around each weight change when measuring shares
    timeout_s: float = 240.0  # bound of each rollout, and so of the load generator
    chunk_s: float = 2.0  # the load runs in back-to-back chunks so it can stop between them
    log_dir: Path | None = None  # process logs; default: a temporary directory

    @property
    def window_s(self) -> float:
        """Long enough for ``min_requests`` at the first step's share of ``rate``: +20 %, +2 s
        for the scrape interval and the reconcile delay."""
        per_s = self.rate * self.steps[0] / 100.0
        return float(math.ceil(self.min_requests / per_s * 1.2 + 2.0))

    @property
    def max_inconclusive(self) -> int:
        """Rounds that may lack data while the window fills, plus slack (then canaryd pauses)."""
        return math.ceil(self.window_s / self.interval_s) + 3

    def annotations(self, canary: str) -> dict[str, str]:
        return {
            "canaryd.io/canary": canary,
            "canaryd.io/steps": ",".join(str(s) for s in self.steps),
            "canaryd.io/interval": f"{self.interval_s:g}s",
            "canaryd.io/analysis": "envoy,dapr",
            "canaryd.io/analysis-window": f"{self.window_s:g}s",
            "canaryd.io/app-id": APP_ID,
            "canaryd.io/caller-app-id": CALLER_APP_ID,
            "canaryd.io/success-rate-min": f"{self.success_rate_min:g}",
            "canaryd.io/min-requests": str(self.min_requests),
            "canaryd.io/failure-threshold": str(self.failure_threshold),
            "canaryd.io/max-inconclusive": str(self.max_inconclusive),
        }


@dataclass(frozen=True)
class Request:
    sent: float  # seconds since the demo's t0 (monotonic)
    received: float
    backend: str
    status: str

    @property
    def answered(self) -> bool:
        return not self.status.startswith("error:")


@dataclass
class Segment:
    """A stretch of constant route weights, as the route watch saw it."""

    label: str
    weights: dict[str, int]
    start: float
    end: float = math.inf
    served: Counter[str] = field(default_factory=Counter)  # inside the settled window only

    @property
    def held_s(self) -> float:
        return self.end - self.start

    @property
    def n(self) -> int:
        return sum(self.served.values())

    def expected(self, backend: str) -> float:
        total = sum(self.weights.values())
        return self.weights.get(backend, 0) / total if total else 0.0

    def observed(self, backend: str) -> float:
        return self.served[backend] / self.n if self.n else 0.0

    def tolerance(self, backend: str) -> float:
        p = self.expected(backend)
        return SIGMAS * math.sqrt(p * (1 - p) / self.n) if self.n else math.inf

    def within(self, backend: str) -> bool:
        return abs(self.observed(backend) - self.expected(backend)) <= self.tolerance(backend)


@dataclass
class DemoResult:
    phases: dict[str, str] = field(default_factory=dict)  # canary -> final phase
    rollout_s: dict[str, float] = field(default_factory=dict)  # canary -> start..terminal
    segments: list[Segment] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    first_bad_at: float | None = None  # first 5xx response received (s since t0)
    rollback_at: float | None = None  # the RolledBack patch seen by the route watch
    lines: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # every process the demo started
    mtls_certs: int | None = None  # certificates Dapr Sentry signed (one per daprd with mTLS on)
    rollback_round: dict[str, AnalysisRecord] = field(default_factory=dict)  # signal -> the last round

    @property
    def detection_s(self) -> float | None:
        if self.first_bad_at is None or self.rollback_at is None:
            return None
        return self.rollback_at - self.first_bad_at

    @property
    def unanswered(self) -> list[Request]:
        """Requests the data plane did not answer (no HTTP answer, or no backend header)."""
        return [r for r in self.requests if not r.answered or r.backend == NO_BACKEND]


# --------------------------------------------------------------------------- processes


class Processes:
    """Subprocesses in their own sessions (Ctrl-C reaches only us); stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_line: bool = True,
        timeout: float = 90.0,
    ) -> dict[str, Any]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as errf:  # noqa: ASYNC230 - opened once per process
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if ready_line else errf,
                stderr=errf,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        if not ready_line:
            return {}
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError:
            raise DemoError(f"{name} printed no ready line within {timeout:g}s; see {log_path}") from None
        if not line:
            await asyncio.wait_for(proc.wait(), 10)
            raise DemoError(f"{name} exited with code {proc.returncode} before it was ready:\n{_tail(log_path)}")
        ready: dict[str, Any] = json.loads(line)
        return ready

    def alive(self, name: str) -> bool:
        return any(n == name and p.returncode is None for n, p in self.procs)

    def log_of(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    async def stop_all(self, grace: float = 10.0) -> None:
        for _name, proc in reversed(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for _name, proc in reversed(self.procs):
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
        self.procs.clear()

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- route watch


@dataclass(frozen=True)
class View:
    """What one progress line shows; a new line is printed when it changes."""

    canary: str
    phase: str
    step: str
    weights: tuple[tuple[str, int], ...]
    round_at: str
    round_text: str


def _weights(route: Mapping[str, Any]) -> dict[str, int]:
    rules = route.get("spec", {}).get("rules") or [{}]
    return {str(b["name"]): int(b.get("weight", 1)) for b in rules[0].get("backendRefs") or []}


def _short(backend: str) -> str:
    return backend.removeprefix("whoami-")


def _weights_text(weights: Mapping[str, int]) -> str:
    return " / ".join(f"{_short(b)} {w}" for b, w in weights.items())


def _view(route: Mapping[str, Any]) -> View:
    ann = route.get("metadata", {}).get("annotations") or {}
    weights = _weights(route)
    canary = str(ann.get("canaryd.io/canary", "-"))
    raw = ann.get(STATE_ANNOTATION)
    st = RolloutState.from_annotation(raw) if raw else None
    if st is None or st.canary != canary:
        return View(canary, "-", "-", tuple(weights.items()), "", "")
    step = f"step {st.step + 1}/{len(st.steps)}" if st.step >= 0 else "step 0"
    last_at = st.history[-1].at if st.history else ""
    rnd = [h for h in st.history if h.at == last_at]
    parts: list[str] = []
    for h in rnd:
        if h.canary_success is not None:
            what = f"{h.canary_success:.1f}% of {h.canary_requests or 0:,.0f}"
        else:
            what = f"{h.canary_requests or 0:,.0f} req"
        if h.signal == "envoy" and h.stable_success is not None:
            what += f" (stable {h.stable_success:.1f}%)"
        if h.signal == "dapr":
            what += " (whole service)"
        parts.append(f"{h.signal} {h.verdict}: {what}")
    return View(st.canary, st.phase.value, step, tuple(weights.items()), last_at, ", ".join(parts))


class RouteWatch:
    """Watches the demo route; keeps the latest object, prints progress, records weight changes."""

    def __init__(self, api: Api, namespace: str, t0: float, emit: Callable[[str], None]) -> None:
        self.api = api
        self.namespace = namespace
        self.t0 = t0
        self.emit = emit
        self.route: dict[str, Any] | None = None
        self.changed = asyncio.Event()
        self.segments: list[Segment] = []
        self.phase_at: dict[tuple[str, str], float] = {}  # (canary, phase) -> first seen
        self._view: View | None = None
        self.failure: BaseException | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _on(self, route: dict[str, Any]) -> None:
        self.route = route
        t = self.now()
        view = _view(route)
        weights = dict(view.weights)
        label = f"{_short(view.canary)} {view.step}" if view.phase != "-" else "before the rollout"
        if view.phase in (Phase.PROMOTED.value, Phase.ROLLED_BACK.value):
            label = f"{_short(view.canary)} {view.phase}"
        if not self.segments or self.segments[-1].weights != weights:
            if self.segments:
                self.segments[-1].end = t
            self.segments.append(Segment(label=label, weights=weights, start=t))
        self.phase_at.setdefault((view.canary, view.phase), t)
        if view != self._view:
            old = self._view
            self._view = view
            rnd = view.round_text if old is None or old.round_at != view.round_at else ""
            self.emit(
                f"{t:6.1f}s  {view.canary:<10} {view.phase:<12} {view.step:<9} "
                f"{_weights_text(weights):<16}{'  ' + rnd if rnd else ''}"
            )
        self.changed.set()

    async def run(self, deadline: float) -> None:
        """The controller's own informer on the demo route (list, watch, relist), until ``deadline``."""
        fn, args = lister(self.api, "httproutes", self.namespace)
        informer = Informer(
            "demo-route",
            fn,
            args,
            field_selector=f"metadata.name={ROUTE}",
            timeout_s=30,
            on_change=lambda _key, obj: None if obj is None else self._on(obj),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(informer.run(), max(0.0, deadline - time.monotonic()))

    async def wait(self, what: str, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:  # bounded by the deadline
            self.changed.clear()
            if self.failure is not None:
                raise DemoError(f"the route watch failed: {self.failure!r}")
            if self.route is not None and pred(self.route):
                return self.route
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


def _state(route: Mapping[str, Any]) -> RolloutState | None:
    raw = (route.get("metadata", {}).get("annotations") or {}).get(STATE_ANNOTATION)
    return RolloutState.from_annotation(raw) if raw else None


def _terminal_for(canary: str) -> Callable[[dict[str, Any]], bool]:
    def pred(route: dict[str, Any]) -> bool:
        st = _state(route)
        return st is not None and st.canary == canary and (st.phase.terminal or st.phase == Phase.PAUSED)

    return pred


# --------------------------------------------------------------------------- load


class Load:
    """Fixed-rate load in back-to-back chunks of ``run_load`` (so it can stop between chunks)."""

    def __init__(self, url: str, rate: float, t0: float, chunk_s: float) -> None:
        self.url = url
        self.rate = rate
        self.t0 = t0
        self.chunk_s = chunk_s
        self.requests: list[Request] = []
        self.stop = asyncio.Event()

    async def run(self, max_s: float) -> None:
        deadline = time.monotonic() + max_s
        while not self.stop.is_set() and time.monotonic() < deadline:  # bounded
            start = time.monotonic() - self.t0

            def on_result(r: Result, start: float = start) -> None:
                self.requests.append(
                    Request(sent=start + r.t, received=time.monotonic() - self.t0, backend=r.backend, status=r.status)
                )

            await run_load(
                self.url, rate=self.rate, duration_s=self.chunk_s, concurrency=32, timeout_s=10.0, on_result=on_result
            )


# --------------------------------------------------------------------------- the demo


async def _kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    """The devstack's kubectl, as a user would run it; its error is the demo's error."""
    from devkit.devstack.binaries import binaries

    proc = await asyncio.create_subprocess_exec(
        str(binaries().kubectl),
        "--kubeconfig",
        kubeconfig,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin else None)
    if proc.returncode != 0:
        raise DemoError(f"kubectl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


async def _ensure_namespace(kubeconfig: str, namespace: str) -> None:
    ns = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    await _kubectl(kubeconfig, "apply", "--server-side", "-f", "-", stdin=ns)
    phase = await _kubectl(kubeconfig, "get", "namespace", namespace, "-o", "jsonpath={.status.phase}")
    if phase == "Terminating":
        raise DemoError(f"namespace {namespace} is being deleted; wait or use another --namespace")


async def _apply_seed(kubeconfig: str, namespace: str) -> None:
    """The seed's manifests as a user applies them; the route afresh (no state of an earlier demo)."""
    await _kubectl(kubeconfig, "delete", "httproute", ROUTE, "-n", namespace, "--ignore-not-found", "--wait")
    args = [a for m in SEED_MANIFESTS for a in ("-f", str(m))]
    await _kubectl(kubeconfig, "apply", "--server-side", "-n", namespace, *args)
    deployments = [f"deployment/{v}" for v in VERSIONS]
    await _kubectl(kubeconfig, "wait", "-n", namespace, "--for=condition=Available", "--timeout=90s", *deployments)


async def _cluster_facts(kubeconfig: str, namespace: str) -> tuple[int, int]:
    """Ready Pods (kwok's work) and the ready endpoints the EndpointSlice controller lists for them."""
    pods = json.loads(await _kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "json"))["items"]
    ready = sum(
        1
        for p in pods
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in p["status"].get("conditions") or [])
    )
    selector = "endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io"
    slices = json.loads(
        await _kubectl(kubeconfig, "get", "endpointslices", "-n", namespace, "-l", selector, "-o", "json")
    )["items"]
    endpoints = sum(
        1
        for sl in slices
        if sl["metadata"]["labels"].get("kubernetes.io/service-name") in VERSIONS
        for e in sl.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready")
    )
    return ready, endpoints


async def _patch(api: client.ApiClient, namespace: str, ops: list[dict[str, Any]]) -> None:
    await client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, ROUTE, ops, **_JSON_PATCH
    )


def _ann_path(key: str) -> str:
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


async def _wait_http_ok(url: str, procs: Processes, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() < deadline:  # bounded
            if not procs.alive(name):
                raise DemoError(f"{name} exited:\n{_tail(procs.log_of(name))}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise DemoError(f"{name} not ready at {url} after {timeout:g}s; see {procs.log_of(name)}")


def canaryd_env(kubeconfig: str, prometheus_url: str, namespace: str, http_port: int) -> dict[str, str]:
    """The environment of the ``canaryd run`` subprocess (inherited CANARYD_* are dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYD_")}
    env.update(
        {
            "CANARYD_KUBECONFIG": kubeconfig,
            "CANARYD_PROMETHEUS__URL": prometheus_url,
            "CANARYD_NAMESPACES": json.dumps([namespace]),
            "CANARYD_LEADER_ELECTION": "false",
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(http_port),
            "CANARYD_LOG_FORMAT": "json",
        }
    )
    return env


class World:
    """What the demo starts around canaryd: the seed's objects, the data plane, the Dapr mesh."""

    def __init__(self, procs: Processes, prometheus: PrometheusServer) -> None:
        self.procs = procs
        self.prometheus = prometheus
        self.mesh: DaprMesh | None = None
        self.jobs: list[str] = []

    async def start(
        self, cfg: DemoConfig, api: client.ApiClient, kubeconfig: str, log_dir: Path, say: Callable[[str], None]
    ) -> str:
        """Everything up to a ready ``canaryd run``; returns the Gateway URL the load goes to."""
        await _ensure_namespace(kubeconfig, cfg.namespace)
        await _apply_seed(kubeconfig, cfg.namespace)
        pods, endpoints = await _cluster_facts(kubeconfig, cfg.namespace)
        say(
            f"applied {', '.join(m.name for m in SEED_MANIFESTS)}: {pods} Pods Ready on kwok's Node, "
            f"{endpoints} ready endpoints from the EndpointSlice controller"
        )
        ready = await self.procs.start("dataplane", _dataplane_argv(kubeconfig, cfg.namespace, log_dir))
        url = f"http://127.0.0.1:{int(ready['gateway_listeners'][GATEWAY_LISTENER])}/hello"
        apps = [
            DaprApp(CALLER_APP_ID, cfg.namespace),
            DaprApp(APP_ID, cfg.namespace, app_port=int(ready["listeners"][PARENT])),
        ]
        self.mesh = await asyncio.to_thread(start_mesh, log_dir / "dapr-mesh", apps, mtls=True)
        await apply_local_daprd(api, cfg.namespace, self.mesh.daprds[CALLER_APP_ID].http_port)
        self.jobs = [f"demo-dataplane-{cfg.namespace}", *self.mesh.scrape_jobs]
        self.prometheus.add_target(self.jobs[0], f"127.0.0.1:{int(ready['admin_port'])}")
        self.mesh.add_scrape_targets(self.prometheus)
        for job in self.jobs:
            await self.prometheus.wait_target_up(job, timeout=60)
        http_port = free_port()
        env = canaryd_env(kubeconfig, self.prometheus.url, cfg.namespace, http_port)
        await self.procs.start("canaryd", [sys.executable, "-m", "canaryd", "run"], ready_line=False, env=env)
        await _wait_http_ok(f"http://127.0.0.1:{http_port}/readyz", self.procs, "canaryd", 90)
        say(
            f"ready: data plane (Gateway {url}), Dapr Sentry + daprds {CALLER_APP_ID}/{APP_ID} with mTLS, "
            f"canaryd (pid {self.procs.pids['canaryd']}), Prometheus {self.prometheus.url}"
        )
        return url

    async def stop(self) -> None:
        for job in self.jobs:
            self.prometheus.remove_target(job)
        if self.mesh is not None:
            await asyncio.to_thread(self.mesh.stop)
        await self.procs.stop_all()


def _stamped(say: Callable[[str], None], t0: float, text: str) -> None:
    say(f"{time.monotonic() - t0:6.1f}s  {text}")


def _dataplane_argv(kubeconfig: str, namespace: str, log_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "devkit.demo.dataplane",
        "--kubeconfig",
        kubeconfig,
        "--namespace",
        namespace,
        "--listen",
        f"{PARENT}=0",
        "--gateway-listen",
        f"{GATEWAY_LISTENER}=0",
        "--admin-port",
        "0",
        "--no-dapr-metrics",  # the real daprds have the real series
        "--pod-node",
        NODE_NAME,
        "--pod-log-dir",
        str(log_dir),
    ]


async def run_demo(
    cfg: DemoConfig,
    *,
    kubeconfig: str,
    prometheus: PrometheusServer,
    emit: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run both rollouts against a running apiserver and Prometheus; stop what it started."""
    result = DemoResult()

    def say(line: str) -> None:
        result.lines.append(line)
        (emit or print)(line)

    if cfg.namespace != "default":
        raise DemoError(
            f"the demo runs in namespace default, not {cfg.namespace}: the seed's ingress route invokes "
            "whoami.default, and Dapr's mTLS checks the callee's namespace (its SPIFFE ID)"
        )
    t0 = time.monotonic()
    log_dir = cfg.log_dir or Path(prometheus.targets_dir).parent.parent / "demo-logs"
    procs = Processes(log_dir)
    world = World(procs, prometheus)
    api = await new_client(kubeconfig)
    tasks: list[asyncio.Task[None]] = []
    load: Load | None = None
    try:
        url = await world.start(
            cfg, api, kubeconfig, log_dir, lambda text: say(f"{time.monotonic() - t0:6.1f}s  {text}")
        )
        say(
            f"        load {cfg.rate:g} rps through the Gateway; steps {','.join(map(str, cfg.steps))} every "
            f"{cfg.interval_s:g}s; analysis envoy+dapr over {cfg.window_s:g}s, >= {cfg.min_requests} canary "
            f"requests, success >= {cfg.success_rate_min:g}%"
        )

        t_run = time.monotonic()
        watcher = RouteWatch(api, cfg.namespace, t0, say)
        bound = 2 * cfg.timeout_s + 60
        tasks.append(asyncio.create_task(_guard(watcher.run(t_run + bound), watcher), name="demo-route-watch"))
        load = Load(url, cfg.rate, t0, cfg.chunk_s)
        tasks.append(asyncio.create_task(load.run(bound), name="demo-load"))
        await asyncio.sleep(cfg.baseline_s)
        hold = cfg.interval_s if cfg.hold_s is None else cfg.hold_s

        # Rollout 1: whoami-v2, healthy.
        say(f"{watcher.now():6.1f}s  annotate route {cfg.namespace}/{ROUTE}: canary whoami-v2")
        await client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GATEWAY_GROUP,
            GATEWAY_VERSION,
            cfg.namespace,
            HTTPROUTES,
            ROUTE,
            {"metadata": {"annotations": cfg.annotations("whoami-v2")}},
            **_MERGE_PATCH,
        )
        start = watcher.now()
        route = await watcher.wait("rollout of whoami-v2", _terminal_for("whoami-v2"), cfg.timeout_s)
        st = _state(route)
        assert st is not None
        result.phases["whoami-v2"] = st.phase.value
        result.rollout_s["whoami-v2"] = watcher.now() - start
        if st.phase != Phase.PROMOTED:
            raise DemoError(
                f"whoami-v2 ended {st.phase.value}, not Promoted: {st.message}; see {procs.log_of('canaryd')}"
            )
        await asyncio.sleep(hold)

        # Rollout 2: whoami-v3 over whoami-v2; the seed's bad release (listens on the wrong port).
        say(f"{watcher.now():6.1f}s  annotate route: canary whoami-v3 (rule: v2 100 / v3 0)")
        route = watcher.route or route
        await _patch(
            api,
            cfg.namespace,
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": route["metadata"]["resourceVersion"]},
                {
                    "op": "replace",
                    "path": "/spec/rules/0/backendRefs",
                    "value": [
                        {"name": "whoami-v2", "port": 80, "weight": 100},
                        {"name": "whoami-v3", "port": 80, "weight": 0},
                    ],
                },
                {"op": "replace", "path": _ann_path("canaryd.io/canary"), "value": "whoami-v3"},
            ],
        )
        start = watcher.now()
        route = await watcher.wait("rollout of whoami-v3", _terminal_for("whoami-v3"), cfg.timeout_s)
        st = _state(route)
        assert st is not None
        result.phases["whoami-v3"] = st.phase.value
        result.rollout_s["whoami-v3"] = watcher.now() - start
        result.rollback_at = watcher.phase_at.get(("whoami-v3", Phase.ROLLED_BACK.value))
        last_at = st.history[-1].at if st.history else ""
        result.rollback_round = {h.signal: h for h in st.history if h.at == last_at}
        if st.phase == Phase.ROLLED_BACK:
            say(f"{watcher.now():6.1f}s  {st.message}")
        await asyncio.sleep(hold)
        load.stop.set()
        await asyncio.wait_for(tasks[1], cfg.chunk_s + 15)
        watcher.segments[-1].end = watcher.now()
        result.segments = watcher.segments
        if st.phase != Phase.ROLLED_BACK:
            raise DemoError(
                f"whoami-v3 ended {st.phase.value}, not RolledBack: {st.message}; see {procs.log_of('canaryd')}"
            )
    finally:
        if load is not None:
            load.stop.set()
            result.requests = sorted(load.requests, key=lambda r: r.sent)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        result.pids = procs.pids
        if world.mesh is not None:
            result.mtls_certs = _sentry_signed(world.mesh)
            result.pids.update(world.mesh.pids)
        await world.stop()
        await api.close()
    _account(result, cfg)
    for line in summary_lines(result, cfg):
        say(line)
    return result


def _sentry_signed(mesh: DaprMesh) -> int | None:
    """How many workload certificates Sentry signed, from its own metrics (mTLS evidence)."""
    if mesh.sentry is None:
        return None
    url = f"http://{mesh.sentry.metrics_address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("dapr_sentry_cert_sign_success_total")
    )


async def _guard(coro: Any, watcher: RouteWatch) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        watcher.failure = exc


def _account(result: DemoResult, cfg: DemoConfig) -> None:
    """Attribute each answered request to the segment it was sent in (minus the settle margin)."""
    segs = result.segments
    for r in result.requests:
        if r.status.startswith("5") and r.backend != NO_BACKEND and result.first_bad_at is None:
            result.first_bad_at = r.received
        if not r.answered:
            continue
        for s in segs:
            if s.start + cfg.settle_s <= r.sent < s.end - cfg.settle_s:
                s.served[r.backend] += 1
                break


def _round_text(h: AnalysisRecord) -> str:
    what = f"{h.canary_success:.1f}% of {h.canary_requests or 0:,.0f}" if h.canary_success is not None else "no data"
    if h.signal == "dapr":
        return f"dapr {h.verdict} (whole service via the daprds: {what})"
    stable = f", stable {h.stable_success:.1f}%" if h.stable_success is not None else ""
    return f"{h.signal} {h.verdict} (canary {what}{stable})"


def summary_lines(result: DemoResult, cfg: DemoConfig) -> list[str]:
    out = ["", "summary"]
    for canary, phase in result.phases.items():
        out.append(f"  rollout {canary}: {phase} after {result.rollout_s.get(canary, 0):.1f}s")
    if result.rollback_round:
        out.append("  whoami-v3's last round: " + "; ".join(_round_text(h) for h in result.rollback_round.values()))
    if result.mtls_certs is not None:
        out.append(f"  Dapr mTLS: Sentry signed {result.mtls_certs} workload certificates (one per daprd)")
    if result.detection_s is not None:
        out.append(
            f"  first bad response (503 from whoami-v3) -> rollback patch: {result.detection_s:.1f}s "
            f"(rounds every {cfg.interval_s:g}s, judged once {cfg.min_requests} canary requests are in)"
        )
    backends = [v for v in VERSIONS if any(v in s.weights for s in result.segments)]
    out.append(
        f"  share served per step (requests sent >= {cfg.settle_s:g}s away from a weight change; "
        f"expected ± {SIGMAS:g} sigma):"
    )
    out.append(f"    {'step':<22}{'held':>7}{'requests':>10}  " + "".join(f"{_short(b):>21}" for b in backends))
    for s in result.segments:
        cells = []
        for b in backends:
            if b not in s.weights or s.n == 0:
                cells.append(f"{'' if b not in s.weights else '-':>21}")
                continue
            mark = "" if s.within(b) else " !"
            tol = s.tolerance(b)
            tol_text = f"±{100 * tol:.1f}" if math.isfinite(tol) else "±-"
            cells.append(f"{100 * s.observed(b):6.1f}% ({100 * s.expected(b):3.0f}{tol_text}){mark}".rjust(21))
        out.append(f"    {s.label:<22}{s.held_s:>6.1f}s{s.n:>10}  " + "".join(cells))
    answered = sum(1 for r in result.requests if r.answered)
    statuses = Counter((r.backend, r.status) for r in result.requests if r.answered and r.status != "200")
    bad = ", ".join(f"{n} x {st} from {b}" for (b, st), n in sorted(statuses.items())) or "none"
    out.append(
        f"  requests: {len(result.requests):,} sent, {answered:,} answered by the data plane, "
        f"{len(result.unanswered)} without an answer; non-200: {bad}"
    )
    return out


# --------------------------------------------------------------------------- CLI entry


def run_with_stack(cfg: DemoConfig, directory: Path, *, keep: bool, out: TextIO = sys.stdout) -> DemoResult:
    """Build or reuse the devstack in ``directory``, run the demo, stop what was started."""
    from devkit.devstack import controlplane, stack

    def emit(line: str) -> None:
        print(line, file=out, flush=True)

    directory = directory.resolve()
    # Until the event loop runs (stack.up is synchronous), SIGTERM interrupts like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = False
    info: controlplane.StackInfo | None = None
    if (directory / controlplane.STATE_FILE).exists():
        status = stack.status(directory)
        procs = status["processes"]
        if procs and all(p["running"] for p in procs.values()) and status["prometheus_url"]:
            info = controlplane.StackInfo.load(directory)
            emit(f"reusing the devstack in {directory}: apiserver {info.server}, Prometheus {info.prometheus_url}")
        elif any(p["running"] for p in procs.values()):
            raise DemoError(
                f"the devstack in {directory} runs only partly (or without Prometheus); "
                f"'canaryd devstack down --dir {directory}' first"
            )
    t0 = time.monotonic()
    try:
        if info is None:
            emit(
                f"starting the devstack in {directory} (etcd, kube-apiserver, controller-manager, scheduler, "
                "kwok, Prometheus at a 1 s scrape)..."
            )
            started = True
            info = stack.up(directory, prometheus=True)
            emit(
                f"devstack ready in {time.monotonic() - t0:.1f}s: apiserver {info.server}, "
                f"Prometheus {info.prometheus_url}"
            )
        assert info.prometheus_url is not None
        prom = PrometheusServer(directory / "prometheus")
        prom.port = urlsplit(info.prometheus_url).port
        cfg = DemoConfig(**{**cfg.__dict__, "log_dir": cfg.log_dir or directory / "demo-logs"})
        kubeconfig = info.kubeconfig

        async def main() -> DemoResult:
            # SIGTERM cancels the demo like Ctrl-C does, so its finally blocks stop everything.
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await run_demo(cfg, kubeconfig=kubeconfig, prometheus=prom, emit=emit)

        try:
            result = asyncio.run(main())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        emit(f"  total {time.monotonic() - t0:.1f}s; process logs in {cfg.log_dir}")
        return result
    finally:
        if started and not keep:
            stack.down(directory)
            emit(f"devstack in {directory} stopped")
        elif info is not None:
            emit(
                f"devstack left running in {directory}: source {directory / 'env'}; "
                f"'canaryd devstack down --dir {directory}' stops it"
            )
