"""``python -m devkit.bench.vs_flagger [--sizes 1,100,1000] [--keep]``: canaryd and Flagger, same stack, same rollouts.

One fresh devstack (etcd, kube-apiserver with a write-only audit log, kube-controller-manager,
kube-scheduler, kwok), one Prometheus (1 s scrape) and the synthetic Envoy exporter. For each size N,
first canaryd, then Flagger (built from its Go module, ``hack/build-flagger.sh``), each alone on the
stack in its own namespace (the other's namespace is deleted first), each as a subprocess measured
from outside:

1. **promote**: N releases at once with a healthy canary, to the end (canaryd Promoted,
   Flagger Succeeded): trigger → first canary weight on the HTTPRoute (the watch's arrival stamp);
2. **rollback**: N more releases; each canary starts answering ``BAD_ERROR_RATIO`` 5xx at t0, a
   known instant spread over the second step; t0 → the route's canary weight back to 0.

Triggers: canaryd, the ``canaryd.io/canary`` annotation on the route; Flagger, a change of the
target Deployment's pod template. Same interval, steps (10..90, then each its promotion), failure
threshold and minimum success rate; both judge the same exporter series through the same Prometheus.
Writes come from the apiserver's audit log (devkit/bench/audit.py): made = the controller's own
accepted write requests; caused = those of kube-controller-manager, kube-scheduler and kwok in the
namespace over the same span, less what the trigger alone causes (measured once, without a
controller). Peak RSS (VmHWM) and CPU from /proc. Results: devkit/bench/results/vs-flagger.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.core import spec as ann
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from devkit.bench import audit
from devkit.bench import flagger as fl
from devkit.bench.flagger import Analysis, CanaryWatch, FlaggerProcess, backend_weight
from devkit.bench.harness import (
    Daemon,
    RouteRecorder,
    Seen,
    annotate_route,
    bench_stack,
    bounded,
    cluster_name,
    create_namespace,
    route_body,
    runtime_python,
    summary,
)
from devkit.bench.run import RESULTS, machine
from devkit.bench.scenarios import _cpu as cpu_of
from devkit.bench.scenarios import prometheus_queries
from devkit.devstack import controllers, controlplane
from devkit.devstack.controlplane import StackInfo
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer

ANALYSIS = Analysis(interval_s=10.0, step_weight=10, max_weight=90, threshold=2, success_rate_min=95.0)
RPS = 100.0  # per app, split by the route's weights
BAD_ERROR_RATIO = 0.2
REVISION = "bench.canaryd.io/revision"
BENCH_NODE_PODS = 12000
PHASES = ("promote", "rollback")


# --- the stack -------------------------------------------------------------------------------


def prepare_stack(info: StackInfo, flagger_crds: Path) -> Path:
    """Audit on, kwok holding its Node's Lease, room for thousands of Pods, Flagger's CRDs."""
    log = audit.enable_audit(info)
    # kwok without --node-lease-duration-seconds renews no Lease, so ~50 s after start the node
    # lifecycle controller marks the Node NotReady and its Pods NotReady, for good (see the report).
    controlplane.kill(info, "kwok")
    info.argv["kwok"] = [a for a in info.argv["kwok"] if not a.startswith("--node-lease")]
    info.argv["kwok"].append("--node-lease-duration-seconds=40")
    controlplane.restart(info, "kwok")
    info.save()
    node = json.loads(controllers.node_manifest())
    node["metadata"]["name"] = node["metadata"]["labels"]["kubernetes.io/hostname"] = "kwok-bench-0"
    node["status"]["allocatable"]["pods"] = node["status"]["capacity"]["pods"] = str(BENCH_NODE_PODS)
    controlplane.kubectl(info, "apply", "--server-side", "-f", "-", input=json.dumps(node))
    controlplane.kubectl(info, "wait", "--for", "condition=Ready", "--timeout", "60s", "node/kwok-bench-0")
    controlplane.kubectl(info, "apply", "--server-side", "-f", str(flagger_crds))
    controlplane.kubectl(info, "wait", "--for", "condition=Established", "--timeout", "60s", "crd", "--all")
    return log


@dataclass
class Bench:
    api: client.ApiClient
    info: StackInfo
    prometheus: PrometheusServer
    exporter: MetricsExporter
    audit: audit.AuditLog
    work: Path
    flagger_dir: Path
    analysis: Analysis
    pids: dict[str, int] = field(default_factory=dict)
    python: str | None = None  # canaryd's interpreter (None: this one)


# --- objects both sides use ------------------------------------------------------------------


def deployment_body(name: str, labels: dict[str, str], revision: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {REVISION: revision}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": "example.invalid/app:1",
                            "ports": [{"name": "http", "containerPort": 80}],
                        }
                    ]
                },
            },
        },
    }


def service_body(name: str, selector: dict[str, str]) -> dict[str, Any]:
    """Headless, with the one port Flagger gives its Services. Headless because the apiserver's
    ClusterIP allocator stalls on this machine past a few thousand Services (create → 504; see
    docs/benchmarks.md), and nothing here dials a Service."""
    port = {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}
    return {"metadata": {"name": name}, "spec": {"clusterIP": "None", "selector": selector, "ports": [port]}}


async def wait_until(pred: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)


async def deployments_available(api: client.ApiClient, ns: str) -> bool:
    apps: Any = client.AppsV1Api(api)
    items = (await apps.list_namespaced_deployment(ns)).items
    return all(
        (d.status.available_replicas or 0) >= (d.spec.replicas or 0)
        and (d.status.observed_generation or 0) >= d.metadata.generation
        for d in items
    )


async def ready_slices(api: client.ApiClient, ns: str) -> int:
    """Services of ``ns`` with at least one ready endpoint in their EndpointSlices."""
    disc: Any = client.DiscoveryV1Api(api)
    ready = set()
    for s in (await disc.list_namespaced_endpoint_slice(ns)).items:
        if any(e.conditions and e.conditions.ready for e in s.endpoints or []):
            ready.add((s.metadata.labels or {}).get("kubernetes.io/service-name"))
    return len(ready)


async def delete_namespace(api: client.ApiClient, ns: str, timeout: float) -> float | None:
    """Delete ``ns`` and wait until it is gone; seconds taken, None when it outlived ``timeout``."""
    core: Any = client.CoreV1Api(api)
    t0 = time.monotonic()
    await core.delete_namespace(ns)

    async def gone() -> bool:
        try:
            await core.read_namespace(ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    try:
        await wait_until(gone, timeout, f"namespace {ns} deleted", every=2.0)
    except TimeoutError:
        return None
    return round(time.monotonic() - t0, 1)


# --- one side: the rollouts of one controller ------------------------------------------------


@dataclass
class App:
    name: str
    stable: str  # exporter cluster names
    canary: str
    weight: int = 0
    error_ratio: float = 0.0
    triggered_at: float = 0.0
    first_weight_at: float | None = None
    bad_at: float | None = None
    rolled_back_at: float | None = None
    done_at: float | None = None
    outcome: str = ""

    def reset(self) -> None:
        self.error_ratio, self.triggered_at = 0.0, 0.0
        self.first_weight_at = self.bad_at = self.rolled_back_at = self.done_at = None
        self.outcome = ""


class Side:
    """What both controllers share: the apps, the traffic following the weights, the timings."""

    label = ""
    weight_of: Callable[[dict[str, Any]], int | None] = staticmethod(lambda _o: None)

    def __init__(self, bench: Bench, n: int) -> None:
        self.b = bench
        self.n = n
        self.ns = f"{self.label}-{n}-{os.urandom(2).hex()}"
        self.apps: dict[str, App] = {}
        self.proc: Daemon | None = None
        self.marks: dict[str, float] = {}  # wall-clock phase boundaries
        self.cpu_marks: dict[str, dict[str, float]] = {}
        self.ready = True  # False when the controller never got ready for the rollouts
        self.rec: RouteRecorder | None = None

    def names(self) -> list[str]:
        return [f"a{i:04d}" for i in range(self.n)]

    def traffic(self, app: App) -> None:
        canary_rps = RPS * app.weight / 100
        self.b.exporter.set_backend(app.stable, rps=RPS - canary_rps, error_ratio=0.0, latency_ms=20)
        self.b.exporter.set_backend(app.canary, rps=canary_rps, error_ratio=app.error_ratio, latency_ms=20)

    def on_seen(self, name: str, s: Seen) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        if s.weight is not None and s.weight != app.weight:
            app.weight = s.weight
            self.traffic(app)  # the mesh follows the weights
        if app.triggered_at and s.at >= app.triggered_at and (s.weight or 0) > 0 and app.first_weight_at is None:
            app.first_weight_at = s.at
        if app.bad_at is not None and s.weight == 0 and app.rolled_back_at is None:
            app.rolled_back_at = s.at
        self.seen_state(app, s)

    def seen_state(self, app: App, s: Seen) -> None:
        """canaryd: the route's state says when a rollout ended."""

    def finished(self, app: App) -> bool:
        return app.done_at is not None

    def mark(self, what: str) -> None:
        self.marks[what] = time.time()
        cpu = cpu_of(self.b.pids)
        if self.proc is not None:
            cpu[self.label] = self.proc.cpu_seconds()
        cpu["prometheus_queries"] = prometheus_queries(self.b.prometheus)
        self.cpu_marks[what] = cpu

    # the per-controller parts
    async def setup(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    def prepare(self, phase: str) -> None:
        for app in self.apps.values():
            app.reset()

    async def trigger(self, app: App, phase: str) -> None:
        raise NotImplementedError


def canaryd_canary_weight(route: dict[str, Any]) -> int | None:
    """The weight of the backendRef the route's ``canaryd.io/canary`` names."""
    canary = (route["metadata"].get("annotations") or {}).get(ann.CANARY)
    return backend_weight(route, canary) if canary else None


class CanarydSide(Side):
    label = "canaryd"
    weight_of = staticmethod(canaryd_canary_weight)

    async def setup(self) -> None:
        api, ns, names = self.b.api, self.ns, self.names()
        core: Any = client.CoreV1Api(api)
        apps: Any = client.AppsV1Api(api)
        co: Any = client.CustomObjectsApi(api)
        jobs: list[Callable[[], Awaitable[Any]]] = []
        for n in names:
            jobs.append(partial(core.create_namespaced_service, ns, service_body(n, {"app": n})))
            for v in ("v1", "v2"):
                labels = {"app": n, "version": v}
                jobs.append(partial(apps.create_namespaced_deployment, ns, deployment_body(f"{n}-{v}", labels)))
                jobs.append(partial(core.create_namespaced_service, ns, service_body(f"{n}-{v}", labels)))
            body = route_body(n, f"{n}-v1", f"{n}-v2")
            jobs.append(
                partial(co.create_namespaced_custom_object, GATEWAY_GROUP, GATEWAY_VERSION, ns, HTTPROUTES, body)
            )
        await bounded(jobs)
        await wait_until(partial(deployments_available, api, ns), 120 + self.n * 1.0, f"{ns}: Deployments available")

        async def slices() -> bool:
            return await ready_slices(api, ns) >= 3 * self.n

        await wait_until(slices, 120 + self.n * 0.5, f"{ns}: ready EndpointSlices")
        for n in names:
            self.apps[n] = App(n, cluster_name(ns, n, f"{n}-v1"), cluster_name(ns, n, f"{n}-v2"))
            self.traffic(self.apps[n])

    async def start(self) -> None:
        log_path = self.b.work / f"{self.ns}.log"
        self.proc = Daemon(self.b.info.kubeconfig, self.ns, self.b.prometheus.url, log_path, python=self.b.python)
        await self.proc.wait_ready(timeout=120)

    def prepare(self, phase: str) -> None:
        super().prepare(phase)
        if phase == "rollback":  # v2 was promoted: v1 is the next canary
            for app in self.apps.values():
                app.stable, app.canary = app.canary, app.stable
                app.weight = 0
                self.traffic(app)

    def annotations(self, app: App, phase: str) -> dict[str, str]:
        a = self.b.analysis
        return {
            ann.CANARY: f"{app.name}-{'v2' if phase == 'promote' else 'v1'}",
            ann.STEPS: ",".join(str(w) for w in a.steps),
            ann.INTERVAL: f"{a.interval_s:g}s",
            ann.FAILURE_THRESHOLD: str(a.threshold),
            ann.ANALYSIS: "envoy",
            ann.SUCCESS_RATE_MIN: f"{a.success_rate_min:g}",
            ann.MIN_REQUESTS: "10",
        }

    async def trigger(self, app: App, phase: str) -> None:
        app.triggered_at = time.time()
        await annotate_route(self.b.api, self.ns, app.name, self.annotations(app, phase))

    def seen_state(self, app: App, s: Seen) -> None:
        phase = (s.state or {}).get("phase")
        if app.first_weight_at is not None and app.done_at is None and phase in ("Promoted", "RolledBack", "Failed"):
            app.done_at, app.outcome = s.at, str(phase)


class FlaggerSide(Side):
    label = "flagger"
    weight_of = staticmethod(fl.flagger_canary_weight)

    def __init__(self, bench: Bench, n: int) -> None:
        super().__init__(bench, n)
        self.canaries = CanaryWatch(bench.api, self.ns)
        self.init_seconds: float | None = None
        self.init_budget_s = 0.0

    async def setup(self) -> None:
        api, ns = self.b.api, self.ns
        apps: Any = client.AppsV1Api(api)
        co: Any = client.CustomObjectsApi(api)
        await co.create_namespaced_custom_object(
            fl.GROUP, fl.VERSION, ns, "metrictemplates", fl.metric_template_body(self.b.prometheus.url)
        )
        jobs: list[Callable[[], Awaitable[Any]]] = []
        core: Any = client.CoreV1Api(api)
        for n in self.names():
            jobs.append(partial(apps.create_namespaced_deployment, ns, deployment_body(n, {"app": n})))
            # Flagger's three Services, as it would create them but headless; it adopts them unchanged.
            for svc, selector in ((f"{n}-canary", n), (f"{n}-primary", f"{n}-primary"), (n, f"{n}-primary")):
                jobs.append(partial(core.create_namespaced_service, ns, service_body(svc, {"app": selector})))
            body = fl.canary_body(n, self.b.analysis)
            jobs.append(partial(co.create_namespaced_custom_object, fl.GROUP, fl.VERSION, ns, "canaries", body))
            self.apps[n] = App(n, cluster_name(ns, n, f"{n}-primary"), cluster_name(ns, n, f"{n}-canary"))
            self.traffic(self.apps[n])
        await bounded(jobs)
        await wait_until(partial(deployments_available, api, ns), 120 + self.n * 1.0, f"{ns}: Deployments available")
        await self.canaries.start()

    async def start(self) -> None:
        binary = self.b.flagger_dir / "flagger"
        self.proc = FlaggerProcess(
            binary, self.b.info.kubeconfig, self.ns, self.b.prometheus.url, self.b.work / f"{self.ns}.log"
        )
        await self.proc.wait_ready(timeout=120)
        self.mark("init")
        t0 = time.monotonic()

        async def initialized() -> bool:
            return all(self.canaries.phase(n) == "Initialized" for n in self.apps)

        # Flagger creates the primary Deployments, Services and routes and waits for the primaries.
        self.init_budget_s = 180 + self.n * 0.6
        try:
            await wait_until(initialized, self.init_budget_s, f"{self.ns}: every Canary Initialized")
        except TimeoutError:
            self.ready = False  # reported: how many got there
        self.init_seconds = round(time.monotonic() - t0, 1)

    def init_result(self) -> dict[str, Any]:
        phases: dict[str, int] = {}
        for n in self.apps:
            phases[self.canaries.phase(n) or "none"] = phases.get(self.canaries.phase(n) or "none", 0) + 1
        return {
            "seconds": self.init_seconds,
            "timed_out": not self.ready,
            "budget_s": self.init_budget_s,
            "canary_phases_at_end": phases,
        }

    async def trigger(self, app: App, phase: str) -> None:
        apps: Any = client.AppsV1Api(self.b.api)
        patch = {"spec": {"template": {"metadata": {"annotations": {REVISION: f"{phase}-{time.time():.3f}"}}}}}
        app.triggered_at = time.time()
        await apps.patch_namespaced_deployment(app.name, self.ns, patch, _content_type="application/merge-patch+json")

    def finished(self, app: App) -> bool:
        if app.done_at is None and app.triggered_at:
            for outcome in ("Succeeded", "Failed"):
                at = self.canaries.reached(app.name, outcome, app.triggered_at)
                if at is not None:
                    app.done_at, app.outcome = at, outcome
                    break
        return app.done_at is not None


# --- measuring one side ----------------------------------------------------------------------


async def inject_failures(side: Side, stop: asyncio.Event) -> None:
    """Each canary goes bad at a known instant inside its second step, spread evenly over it."""
    interval = side.b.analysis.interval_s
    pending = list(enumerate(side.apps.values()))
    while pending and not stop.is_set():
        now = time.time()
        for item in list(pending):
            k, app = item
            if app.first_weight_at is not None and now >= app.first_weight_at + interval * (1 + (k + 0.5) / side.n):
                app.error_ratio, app.bad_at = BAD_ERROR_RATIO, now
                side.traffic(app)
                pending.remove(item)
        await asyncio.sleep(0.05)


def budget(side: Side, phase: str) -> float:
    a = side.b.analysis
    ticks = len(a.steps) + 8 if phase == "promote" else a.threshold + 6
    return a.interval_s * ticks + 60 + side.n * 0.6  # generous: a run that times out reports how far it got


async def run_phase(side: Side, phase: str) -> dict[str, Any]:
    side.prepare(phase)
    side.mark(phase)
    await bounded([partial(side.trigger, app, phase) for app in side.apps.values()])
    stop = asyncio.Event()
    injector = asyncio.create_task(inject_failures(side, stop)) if phase == "rollback" else None

    async def all_done() -> bool:
        return all(side.finished(app) for app in side.apps.values())

    try:
        await wait_until(all_done, budget(side, phase), f"{side.ns}: {phase} ended", every=0.5)
        timed_out = False
    except TimeoutError:
        timed_out = True
    finally:
        stop.set()
        if injector is not None:
            await injector
    await asyncio.sleep(3)  # trailing writes of the last rollouts (Events, status)
    return phase_result(side, phase, timed_out)


def phase_result(side: Side, phase: str, timed_out: bool) -> dict[str, Any]:
    apps = list(side.apps.values())
    outcomes: dict[str, int] = {}
    for a in apps:
        outcomes[a.outcome or "unfinished"] = outcomes.get(a.outcome or "unfinished", 0) + 1
    out: dict[str, Any] = {
        "rollouts": len(apps),
        "timed_out": timed_out,
        "outcomes": outcomes,
        "trigger_to_first_weight_s": summary([a.first_weight_at - a.triggered_at for a in apps if a.first_weight_at]),
        "trigger_to_end_s": summary([a.done_at - a.triggered_at for a in apps if a.done_at], 2),
        "step_spacing_s": summary(step_spacing(side), 2),
    }
    if phase == "rollback":
        out["bad_error_ratio"] = BAD_ERROR_RATIO
        out["t0_to_rollback_weight_s"] = summary(
            [a.rolled_back_at - a.bad_at for a in apps if a.rolled_back_at and a.bad_at], 3
        )
        out["rolled_back"] = sum(1 for a in apps if a.rolled_back_at)
    return out


def step_spacing(side: Side) -> list[float]:
    """Seconds between successive increases of a canary's weight within its rollout: the interval
    each controller actually keeps (10 s asked)."""
    out: list[float] = []
    for app in side.apps.values():
        runs = side.rec.history.get(app.name, []) if side.rec is not None else []
        end = app.done_at or float("inf")
        last_w, last_at = 0, None
        for s in runs:
            if s.at < app.triggered_at or s.at > end or s.weight is None:
                continue
            if s.weight > last_w > 0 and last_at is not None:
                out.append(s.at - last_at)
            if s.weight != last_w:
                last_w, last_at = s.weight, s.at
    return out


def writes_result(side: Side, t0: float, t1: float, baseline_per_trigger: float) -> dict[str, Any]:
    """Writes in the side's namespace over [t0, t1): made by the controller, caused in the cluster."""
    t = audit.tally(side.b.audit.between(side.ns, t0, t1))
    made = audit.accepted(t, [side.label])
    cluster = audit.accepted(t, audit.CLUSTER_ACTORS)
    trigger_only = baseline_per_trigger * side.n if side.label == "flagger" else 0.0
    return {
        "made": made,
        "made_per_rollout": round(made / side.n, 2),
        "refused": int(t.get(side.label, {}).get("refused", 0)),
        "cluster": cluster,
        "trigger_only_estimate": round(trigger_only, 1),
        "caused": round(cluster - trigger_only, 1),
        "caused_per_rollout": round((cluster - trigger_only) / side.n, 2),
        "by_actor": t,
    }


def span_cpu(side: Side, start: str, end: str) -> dict[str, float]:
    a, b = side.cpu_marks[start], side.cpu_marks[end]
    return {k: round(b[k] - v, 2) for k, v in a.items() if k in b}


async def measure(side: Side, baseline: float) -> dict[str, Any]:
    """One controller's N rollouts, start to finish; its namespace is deleted whatever happens."""
    result: dict[str, Any] = {"namespace": side.ns, "rollouts": side.n, "loadavg_start": loadavg()}
    await create_namespace(side.b.api, side.ns)
    try:
        await run_side(side, result, baseline)
    finally:
        result["loadavg_end"] = loadavg()
        for app in side.apps.values():
            side.b.exporter.remove_backend(app.stable)
            side.b.exporter.remove_backend(app.canary)
        result["namespace_deleted_seconds"] = await delete_namespace(side.b.api, side.ns, 300 + side.n * 0.5)
    return result


async def run_side(side: Side, result: dict[str, Any], baseline: float) -> None:
    t_setup = time.monotonic()
    await side.setup()
    result["setup_seconds"] = round(time.monotonic() - t_setup, 1)
    rec = side.rec = RouteRecorder(side.b.api, side.ns, on_seen=side.on_seen, weight_of=side.weight_of)
    await rec.start()
    try:
        await side.start()
        assert side.proc is not None
        result["argv"] = getattr(side.proc, "argv", ["canaryd", "run", "--no-leader-election"])
        for phase in PHASES if side.ready else ():
            if any(result.get(p, {}).get("timed_out") for p in PHASES):
                result[phase] = {"skipped": "an earlier phase timed out: its rollouts are still running"}
                continue
            result[phase] = await run_phase(side, phase)
        side.mark("end")
        result["usage"] = side.proc.usage()
    finally:
        if side.proc is not None:
            side.proc.stop(timeout=60)
        await rec.stop()
        if isinstance(side, FlaggerSide):
            await side.canaries.stop()
    account(side, result, baseline)


def account(side: Side, result: dict[str, Any], baseline: float) -> None:
    """Writes, CPU and wall time of each span between the marks (init, promote, rollback, end)."""
    marks = [m for m in ("init", *PHASES, "end") if m in side.marks]
    for start, end in itertools.pairwise(marks):
        part = result.setdefault(start, {})
        part["writes"] = writes_result(side, side.marks[start], side.marks[end], baseline)
        part["cpu_seconds"] = span_cpu(side, start, end)
        part["seconds"] = round(side.marks[end] - side.marks[start], 1)
    if isinstance(side, FlaggerSide):
        result.setdefault("init", {}).update(side.init_result())


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def trigger_baseline(b: Bench, count: int = 10) -> dict[str, Any]:
    """Cluster writes a pod-template change of a Deployment at 0 replicas causes with no controller
    watching: what Flagger's trigger costs by itself (its targets sit at 0 replicas between releases)."""
    ns = f"baseline-{os.urandom(2).hex()}"
    await create_namespace(b.api, ns)
    apps: Any = client.AppsV1Api(b.api)
    names = [f"a{i:04d}" for i in range(count)]
    for n in names:
        body = deployment_body(n, {"app": n})
        body["spec"]["replicas"] = 0
        await apps.create_namespaced_deployment(ns, body)
    await asyncio.sleep(5)
    t0 = time.time()
    patch = {"spec": {"template": {"metadata": {"annotations": {REVISION: "2"}}}}}
    for n in names:
        await apps.patch_namespaced_deployment(n, ns, patch, _content_type="application/merge-patch+json")
    await asyncio.sleep(10)
    t = audit.tally(b.audit.between(ns, t0, time.time()))
    per = audit.accepted(t, audit.CLUSTER_ACTORS) / count
    await delete_namespace(b.api, ns, 120)
    return {"deployments": count, "cluster_writes_per_trigger": per, "by_actor": t}


# --- the run ---------------------------------------------------------------------------------


def ratio(f: float | None, c: float | None) -> float | None:
    return round(f / c, 2) if f is not None and c else None


def ratios(c: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
    """Flagger ÷ canaryd for the headline figures (p50 unless said otherwise)."""

    def p(r: dict[str, Any], phase: str, key: str, q: str = "p50") -> float | None:
        v = r.get(phase, {}).get(key, {}).get(q)
        return float(v) if v is not None else None

    def w(r: dict[str, Any], key: str) -> float:
        return sum(float(r.get(ph, {}).get("writes", {}).get(key, 0)) for ph in PHASES)

    def cpu(r: dict[str, Any], who: str) -> float:
        return sum(float(r.get(ph, {}).get("cpu_seconds", {}).get(who, 0)) for ph in PHASES)

    return {
        "trigger_to_first_weight_p50": ratio(
            p(f, "promote", "trigger_to_first_weight_s"), p(c, "promote", "trigger_to_first_weight_s")
        ),
        "t0_to_rollback_p50": ratio(
            p(f, "rollback", "t0_to_rollback_weight_s"), p(c, "rollback", "t0_to_rollback_weight_s")
        ),
        "writes_made_per_release": ratio(w(f, "made"), w(c, "made")),
        "writes_caused": None if w(c, "caused") <= 0 else ratio(w(f, "caused"), w(c, "caused")),
        "peak_rss": ratio(f.get("usage", {}).get("peak_rss_mb"), c.get("usage", {}).get("peak_rss_mb")),
        "cpu_seconds_releases": ratio(cpu(f, "flagger"), cpu(c, "canaryd")),
    }


async def run(
    sizes: list[int], keep: bool, out: Path, analysis: Analysis = ANALYSIS, python: str | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "name": "vs-flagger",
        "command": " ".join(["python", "-m", "devkit.bench.vs_flagger", *sys.argv[1:]]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "flagger_version": fl.version(),
        "analysis": {
            "interval_s": analysis.interval_s,
            "steps": analysis.steps,
            "failure_threshold": analysis.threshold,
            "success_rate_min": analysis.success_rate_min,
            "rps_per_app": RPS,
            "flagger_query": fl.success_rate_query(),
        },
        "runs": [],
        "canaryd_python": python or sys.executable,
    }
    flagger_dir = await asyncio.to_thread(fl.flagger_dir)
    crd = flagger_dir / "crd.yaml"
    async with bench_stack("canaryd-vs-flagger-", keep=keep, prepare=lambda info: prepare_stack(info, crd)) as st:
        st.api.user_agent = audit.BENCH_AGENT
        b = Bench(
            st.api, st.info, st.prometheus, st.exporter, audit.AuditLog(st.prepared), st.work, flagger_dir, analysis
        )
        b.pids, b.python = st.pids, python
        result["trigger_baseline"] = base = await trigger_baseline(b)
        for n in sizes:
            entry: dict[str, Any] = {"rollouts": n}
            result["runs"].append(entry)
            for cls in (CanarydSide, FlaggerSide):
                side = cls(b, n)
                print(f"{n} rollouts: {side.label} in {side.ns}", flush=True)
                try:
                    entry[side.label] = await measure(side, base["cluster_writes_per_trigger"])
                except (TimeoutError, RuntimeError) as exc:  # report how far it got, go on
                    entry[side.label] = {"error": str(exc), "namespace": side.ns}
                    print(f"  {side.label}: {exc}", flush=True)
                out.write_text(json.dumps(result, indent=2) + "\n")  # noqa: ASYNC240 - keep what is measured so far
            if "error" not in entry.get("canaryd", {}) and "error" not in entry.get("flagger", {}):
                entry["flagger_over_canaryd"] = ratios(entry["canaryd"], entry["flagger"])
        work = st.work
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    result["work_dir"] = str(work) if keep else None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.vs_flagger", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,100,1000", help="concurrent rollouts per run, comma-separated")
    p.add_argument("--keep", action="store_true", help="keep the work dir (controller logs, audit log)")
    p.add_argument("--out", type=Path, default=RESULTS / "vs-flagger.json")
    p.add_argument(
        "--python",
        default="runtime",
        help="canaryd's interpreter: 'runtime' (a venv with its runtime dependencies only, as in the image), "
        "'current' (this one, with the dev tools) or a path",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=ANALYSIS.interval_s,
        help="seconds per step for both controllers (>= 10, Flagger's minimum)",
    )
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.interval < 10:  # Flagger raises any shorter interval to 10 s (Canary.GetAnalysisInterval)
        p.error("--interval below 10 s would not be equivalent: Flagger's shortest analysis interval is 10 s")
    analysis = dataclasses.replace(ANALYSIS, interval_s=args.interval)
    python = runtime_python() if args.python == "runtime" else None if args.python == "current" else str(args.python)
    result = asyncio.run(run(sizes, args.keep, args.out, analysis, python))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
