"""``canaryd demo``: two rollouts end to end on one machine, with live progress and a summary.

Plays the cluster and the user; canaryd itself runs unmodified as ``python -m canaryd run`` in a
subprocess and only sees the apiserver and Prometheus. The flow:

1. the devstack (etcd + kube-apiserver + Prometheus at a 1 s scrape), built or reused;
2. namespace ``demo``: a selector-less parent Service ``whoami``, local ``whoami`` processes
   v1, v2 and v3 (v3 answers ``bad_error_ratio`` of its requests with 500) behind FQDN
   EndpointSlices, the HTTPRoute ``whoami`` (v1 100 / v2 0) and the local data plane, which
   Prometheus scrapes through a file_sd target;
3. ``canaryd run`` (leader election off, namespace ``demo`` only) and fixed-rate load;
4. rollout 1: annotate the route for canary whoami-v2 (healthy) → Promoted;
5. rollout 2: swap the rule to v2 100 / v3 0 and make whoami-v3 the canary → RolledBack.

Progress comes from a watch on the route (one line per change of phase, step, weights or
analysis round). Every process started here is stopped in ``finally`` (also on Ctrl-C).

Statistics. A round is judged only with ``min_requests`` canary requests in the window, and
fails below ``success_rate_min`` percent (or on the judge's relative z-test against the
stable). With 150 and 95 %: a canary failing 10 % of requests (binomially) passes a round
with p ≈ 1.4 %; a canary failing 1 % fails a round with p ≈ 0.015 % (and rollback needs
``failure_threshold`` failed rounds in a row). The analysis window is sized so the first step
collects ``min_requests`` at the demo's request rate (``DemoConfig.window_s``).

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
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.core.state import Phase, RolloutState
from canaryd.errors import CanarydError
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, new_client
from canaryd.kube.api import lister
from canaryd.kube.informer import Informer
from devkit.demo.dataplane import apply_local_backend
from devkit.demo.loadgen import NO_BACKEND, Result, run_load
from devkit.devstack.prometheus import PrometheusServer, free_port

ROUTE = "whoami"
PARENT = "whoami"
APP_ID = "whoami"
VERSIONS = ("whoami-v1", "whoami-v2", "whoami-v3")
STATE_ANNOTATION = "canaryd.io/state"
_JSON_PATCH: dict[str, Any] = {"_content_type": "application/json-patch+json"}
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}
SIGMAS = 4.0  # binomial tolerance of the per-step shares (a false alarm ≈ 1 in 15,000 per check)


class DemoError(CanarydError):
    """The demo could not run or did not end as it should; the message says where to look."""


@dataclass(frozen=True)
class DemoConfig:
    namespace: str = "demo"
    interval_s: float = 3.0
    rate: float = 50.0  # requests per second from the load generator
    steps: tuple[int, ...] = (20, 50, 80, 100)
    min_requests: int = 150
    success_rate_min: float = 95.0
    failure_threshold: int = 2
    bad_error_ratio: float = 0.1
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
            "canaryd.io/caller-app-id": "ingress",
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

    def __init__(self, api: client.ApiClient, namespace: str, t0: float, emit: Callable[[str], None]) -> None:
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


def _route_body(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": ROUTE, "namespace": namespace},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": PARENT, "port": 80}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": "whoami-v1", "port": 80, "weight": 100},
                        {"name": "whoami-v2", "port": 80, "weight": 0},
                    ]
                }
            ],
        },
    }


async def _ensure_namespace(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    try:
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    ns = await core.read_namespace(namespace)
    if ns.status and ns.status.phase == "Terminating":
        raise DemoError(
            f"namespace {namespace} is Terminating (no namespace controller runs in "
            "devstack); use another --namespace or a fresh --dir"
        )
    try:
        await core.create_namespaced_service(
            namespace,
            client.V1Service(
                metadata=client.V1ObjectMeta(name=PARENT),
                spec=client.V1ServiceSpec(ports=[client.V1ServicePort(name="http", port=80)]),
            ),
        )
    except ApiException as exc:
        if exc.status != 409:
            raise


async def _reset_route(api: client.ApiClient, namespace: str) -> None:
    """A fresh route each run: the state of an earlier demo must not carry over."""
    co = client.CustomObjectsApi(api)
    with contextlib.suppress(ApiException):
        await co.delete_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, ROUTE)
    for _ in range(50):  # bounded: no finalizers, so deletion is immediate
        try:
            await co.get_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, ROUTE)
        except ApiException as exc:
            if exc.status == 404:
                break
            raise
        await asyncio.sleep(0.1)
    await co.create_namespaced_custom_object(
        GATEWAY_GROUP, GATEWAY_VERSION, namespace, HTTPROUTES, _route_body(namespace)
    )


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

    t0 = time.monotonic()
    log_dir = cfg.log_dir or Path(prometheus.targets_dir).parent.parent / "demo-logs"
    procs = Processes(log_dir)
    job = f"demo-dataplane-{cfg.namespace}"
    api = await new_client(kubeconfig)
    tasks: list[asyncio.Task[None]] = []
    load: Load | None = None
    try:
        py = sys.executable
        await _ensure_namespace(api, cfg.namespace)
        await _reset_route(api, cfg.namespace)
        ports: dict[str, int] = {}
        for v in VERSIONS:
            argv = [py, "-m", "devkit.demo.whoami", "--name", _short(v), "--port", "0"]
            if v == "whoami-v3":
                argv += ["--error-ratio", f"{cfg.bad_error_ratio:g}"]
            ready = await procs.start(v, argv)
            ports[v] = int(ready["port"])
            await apply_local_backend(api, cfg.namespace, v, [ports[v]])
        ready = await procs.start(
            "dataplane",
            [
                py,
                "-m",
                "devkit.demo.dataplane",
                "--kubeconfig",
                kubeconfig,
                "--namespace",
                cfg.namespace,
                "--listen",
                f"{PARENT}=0",
                "--admin-port",
                "0",
            ],
        )
        url = f"http://127.0.0.1:{int(ready['listeners'][PARENT])}/"
        prometheus.add_target(job, f"127.0.0.1:{int(ready['admin_port'])}")
        await prometheus.wait_target_up(job, timeout=60)
        http_port = free_port()
        await procs.start(
            "canaryd",
            [py, "-m", "canaryd", "run"],
            ready_line=False,
            env=canaryd_env(kubeconfig, prometheus.url, cfg.namespace, http_port),
        )
        await _wait_http_ok(f"http://127.0.0.1:{http_port}/readyz", procs, "canaryd", 90)
        say(
            f"{time.monotonic() - t0:6.1f}s  ready: whoami v1/v2/v3 (v3 fails {cfg.bad_error_ratio:.0%}), "
            f"data plane {url}, canaryd (pid {procs.pids['canaryd']}), Prometheus {prometheus.url}"
        )
        say(
            f"        load {cfg.rate:g} rps; steps {','.join(map(str, cfg.steps))} every {cfg.interval_s:g}s; "
            f"analysis envoy+dapr over {cfg.window_s:g}s, >= {cfg.min_requests} canary requests, "
            f"success >= {cfg.success_rate_min:g}%, rollback after {cfg.failure_threshold} failed rounds"
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

        # Rollout 2: whoami-v3 over whoami-v2, answers bad_error_ratio of requests with 500.
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
        prometheus.remove_target(job)
        await procs.stop_all()
        await api.close()
    _account(result, cfg)
    for line in summary_lines(result, cfg):
        say(line)
    return result


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


def summary_lines(result: DemoResult, cfg: DemoConfig) -> list[str]:
    out = ["", "summary"]
    for canary, phase in result.phases.items():
        out.append(f"  rollout {canary}: {phase} after {result.rollout_s.get(canary, 0):.1f}s")
    if result.detection_s is not None:
        out.append(
            f"  first bad response (5xx from whoami-v3) -> rollback patch: {result.detection_s:.1f}s "
            f"(needs {cfg.min_requests} canary requests in the window, then "
            f"{cfg.failure_threshold} failed rounds {cfg.interval_s:g}s apart)"
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
            emit(f"starting the devstack in {directory} (etcd, kube-apiserver, Prometheus at a 1 s scrape)...")
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
