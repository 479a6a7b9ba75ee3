"""Pieces the scenarios share: object builders, a route recorder (watch), the daemon process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import parse_ts
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, new_client
from canaryd.kube.informer import Informer, Key, raw
from devkit.devstack import controlplane
from devkit.devstack.controlplane import StackInfo, free_port
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer

REPO = Path(__file__).resolve().parents[1]
CHECKOUT = REPO.parent


@dataclass
class BenchStack:
    """What every bench runs on: a fresh control plane, one Prometheus scraping the synthetic exporter."""

    work: Path
    info: StackInfo
    prometheus: PrometheusServer
    exporter: MetricsExporter
    api: client.ApiClient
    prepared: Any = None  # what ``bench_stack``'s ``prepare`` returned

    @property
    def pids(self) -> dict[str, int]:
        """The processes whose CPU a bench reports beside the controller's."""
        return {**self.info.pids, "prometheus": self.prometheus.pid, "bench": os.getpid()}


@contextlib.asynccontextmanager
async def bench_stack(
    prefix: str, *, keep: bool = False, prepare: Callable[[StackInfo], Any] | None = None
) -> AsyncIterator[BenchStack]:
    """Start a bench's stack in a new work dir (Prometheus at a 1 s scrape, the exporter its target) and
    stop all of it afterwards, the work dir too unless ``keep``. ``prepare`` runs in a thread once the
    control plane is up, before anything else talks to it (its result is ``BenchStack.prepared``)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    prom = PrometheusServer(work / "prometheus", scrape_interval="1s")
    exporter = MetricsExporter()
    info = None
    try:
        info = await asyncio.to_thread(controlplane.start_control_plane, work / "stack")
        prepared = await asyncio.to_thread(prepare, info) if prepare is not None else None
        await asyncio.to_thread(prom.start, timeout=60)
        await exporter.start()
        prom.add_target("bench-exporter", exporter.address)
        await prom.wait_target_up("bench-exporter", timeout=30)
        api = await new_client(info.kubeconfig)
        try:
            yield BenchStack(work, info, prom, exporter, api, prepared)
        finally:
            await api.close()
    finally:
        await exporter.stop()
        prom.stop()
        controlplane.stop_stack(Path(info.dir) if info is not None else work / "stack")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def runtime_python() -> str:
    """An interpreter with canaryd's runtime dependencies only (what the image ships), none of the dev
    tools: the dev venv's extras change what the daemon imports (structlog loads rich when it is
    installed: 2.2 MB). Made once per pyproject.toml under ~/.cache/canaryd; canaryd itself comes
    from the checkout (``Daemon`` puts it on PYTHONPATH)."""
    import hashlib
    import tomllib

    pyproject = (CHECKOUT / "pyproject.toml").read_bytes()
    deps = tomllib.loads(pyproject.decode())["project"]["dependencies"]
    key = hashlib.sha256(json.dumps(deps).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "canaryd" / f"bench-runtime-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *deps], check=True)
        (venv / ".installed").write_text("\n".join(deps) + "\n")
    return str(python)


CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- statistics ----------------------------------------------------------------------------


def quantile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank quantile (no interpolation); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))
    return xs[k]


def summary(values: Iterable[float], digits: int = 4) -> dict[str, Any]:
    xs = list(values)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(xs),
        "p50": r(quantile(xs, 0.50)),
        "p95": r(quantile(xs, 0.95)),
        "p99": r(quantile(xs, 0.99)),
        "max": r(max(xs) if xs else None),
        "mean": r(sum(xs) / len(xs) if xs else None),
    }


# --- objects ---------------------------------------------------------------------------------


def cluster_name(ns: str, parent: str, backend: str, port: int = 80) -> str:
    """The Envoy cluster name Cilium gives a GAMMA backend (matches the default pattern)."""
    return f"{ns}/{parent}/{ns}_{backend}_{port}"


def route_body(name: str, stable: str, canary: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": {"bench": "canaryd"}},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"name": stable, "port": 80, "weight": 100},
                        {"name": canary, "port": 80, "weight": 0},
                    ],
                }
            ],
        },
    }


def service_body(name: str) -> dict[str, Any]:
    # Headless: devstack's service CIDR is a /24, too small for thousands of cluster IPs.
    return {"metadata": {"name": name}, "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}


def slice_body(service: str) -> dict[str, Any]:
    # The apiserver refuses loopback endpoint addresses; nothing dials this TEST-NET-1 address.
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-bench", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }


async def bounded(jobs: Iterable[Callable[[], Awaitable[Any]]], concurrency: int = 16) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


async def create_namespace(api: client.ApiClient, name: str) -> None:
    core: Any = client.CoreV1Api(api)  # plain dict bodies: typed as models in the stubs
    await core.create_namespace({"metadata": {"name": name}})


async def create_apps(
    api: client.ApiClient, ns: str, names: list[str], annotations: Callable[[str], dict[str, str]] | None = None
) -> None:
    """For each name: Services ``<name>-v1``/``-v2`` with a ready EndpointSlice each, and a
    route ``<name>`` splitting 100/0 between them (annotated when ``annotations`` is given)."""
    core: Any = client.CoreV1Api(api)
    disc: Any = client.DiscoveryV1Api(api)
    co: Any = client.CustomObjectsApi(api)
    backends = [f"{n}-{v}" for n in names for v in ("v1", "v2")]
    await bounded([partial(core.create_namespaced_service, ns, service_body(b)) for b in backends])
    await bounded([partial(disc.create_namespaced_endpoint_slice, ns, slice_body(b)) for b in backends])
    await bounded(
        [
            partial(
                co.create_namespaced_custom_object,
                GATEWAY_GROUP,
                GATEWAY_VERSION,
                ns,
                HTTPROUTES,
                route_body(n, f"{n}-v1", f"{n}-v2", annotations(n) if annotations else None),
            )
            for n in names
        ]
    )


async def annotate_route(api: client.ApiClient, ns: str, name: str, annotations: dict[str, str]) -> None:
    co: Any = client.CustomObjectsApi(api)
    await co.patch_namespaced_custom_object(
        GATEWAY_GROUP,
        GATEWAY_VERSION,
        ns,
        HTTPROUTES,
        name,
        {"metadata": {"annotations": annotations}},
        _content_type="application/merge-patch+json",
    )


# --- observing routes ------------------------------------------------------------------------


def canary_weight(obj: dict[str, Any]) -> int | None:
    rules = obj.get("spec", {}).get("rules") or []
    if not rules:
        return None
    for ref in rules[0].get("backendRefs") or []:
        if ref["name"].endswith("-v2"):
            return int(ref.get("weight", 1))
    return None


@dataclass
class Seen:
    """One route change as the recorder's watch delivered it."""

    at: float  # time.time() when delivered
    resource_version: str
    weight: int | None
    state: dict[str, Any] | None


@dataclass
class RouteRecorder:
    """Watches the HTTPRoutes of one namespace (the same informer canaryd uses) and keeps
    every delivered version of every route, stamped with the wall clock on arrival."""

    api: client.ApiClient
    namespace: str
    history: dict[str, list[Seen]] = field(default_factory=dict)
    on_seen: Callable[[str, Seen], None] | None = None
    weight_of: Callable[[dict[str, Any]], int | None] = canary_weight  # which backendRef is "the canary"
    _task: asyncio.Task[None] | None = None
    _informer: Informer | None = None

    def _on_change(self, key: Key, obj: dict[str, Any] | None) -> None:
        if obj is None:
            return
        a = obj["metadata"].get("annotations") or {}
        state = json.loads(a[ann.STATE]) if ann.STATE in a else None
        seen = Seen(time.time(), obj["metadata"]["resourceVersion"], self.weight_of(obj), state)
        runs = self.history.setdefault(key[1], [])
        if runs and runs[-1].resource_version == seen.resource_version:
            return
        runs.append(seen)
        if self.on_seen is not None:
            self.on_seen(key[1], seen)

    async def start(self) -> None:
        co = client.CustomObjectsApi(self.api)
        self._informer = Informer(
            f"bench-httproutes/{self.namespace}",
            raw(co.list_namespaced_custom_object),
            (GATEWAY_GROUP, GATEWAY_VERSION, self.namespace, HTTPROUTES),
            on_change=self._on_change,
        )
        self._task = asyncio.create_task(self._informer.run(), name="bench-recorder")
        await asyncio.wait_for(self._informer.synced.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            await asyncio.sleep(0.1)


def step_jitter(runs: list[Seen]) -> list[float]:
    """Seconds between a step's planned time (the previous state's ``next_at``) and the moment
    the watch delivered the write that took the step (or promoted)."""
    out: list[float] = []
    prev: dict[str, Any] | None = None
    for s in runs:
        st = s.state
        if st is not None and prev is not None and prev.get("next_at"):
            moved = (st.get("step"), st.get("phase")) != (prev.get("step"), prev.get("phase"))
            if moved:
                due = parse_ts(prev["next_at"])
                assert due is not None
                out.append(s.at - due.timestamp())
        if st is not None:
            prev = st
    return out


def step_writes(runs: list[Seen]) -> tuple[int, int]:
    """(route writes after creation, state transitions that moved step or phase)."""
    writes = max(0, len(runs) - 1)
    moves = 0
    prev: tuple[Any, Any] | None = (None, None)
    for s in runs:
        key = (s.state.get("step"), s.state.get("phase")) if s.state else (None, None)
        if s.state is not None and key != prev:
            moves += 1
        prev = key
    return writes, moves


def classify_writes(runs: list[Seen]) -> dict[str, int]:
    """Route writes after creation by cause: ``step`` (moved step or phase, the write a step
    needs), ``analysis_hold`` (same step and phase, an analysis counter moved: an inconclusive,
    error or failed round recorded while holding), ``other`` (anything else: a duplicate).
    ``step`` over the expected transitions is the "one write per step" figure; the holds are
    legitimate extra writes and are reported apart."""
    out = {"step": 0, "analysis_hold": 0, "other": 0}
    prev: dict[str, Any] | None = None
    for i, s in enumerate(runs):
        st = s.state
        if i > 0:
            key = (st.get("step"), st.get("phase")) if st else (None, None)
            pkey = (prev.get("step"), prev.get("phase")) if prev else (None, None)
            if st is not None and key != pkey:
                out["step"] += 1
            elif (
                st is not None
                and prev is not None
                and any(st.get(k, 0) != prev.get(k, 0) for k in ("errors", "inconclusive", "failures"))
            ):
                out["analysis_hold"] += 1
            else:
                out["other"] += 1
        prev = st
    return out


def pid_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the daemon ------------------------------------------------------------------------------


@dataclass
class StepTally:
    """The recorder's view of a run's routes: step jitter samples and route writes by cause."""

    jitter: list[float] = field(default_factory=list)
    writes: int = 0
    moves: int = 0
    by_cause: dict[str, int] = field(default_factory=lambda: {"step": 0, "analysis_hold": 0, "other": 0})


def tally_steps(history: dict[str, list[Seen]], names: Iterable[str]) -> StepTally:
    """``step_jitter``, ``step_writes`` and ``classify_writes`` summed over ``names``."""
    t = StepTally()
    for n in names:
        runs = history.get(n, [])
        t.jitter += step_jitter(runs)
        w, m = step_writes(runs)
        t.writes += w
        t.moves += m
        for k, v in classify_writes(runs).items():
            t.by_cause[k] += v
    return t


def prom_text_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` (exact metric name) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, lbl = head.partition("{")
        if metric != name:
            continue
        if labels and not all(f'{k}="{v}"' in lbl for k, v in labels.items()):
            continue
        total += float(value)
    return total


def prom_histogram(text: str, name: str, labels: dict[str, str] | None = None) -> dict[str, float]:
    """The cumulative buckets of histogram ``name`` (``{le: count}``, "+Inf" included) for ``labels``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(f"{name}_bucket{{"):
            continue
        head, _, value = line.rpartition(" ")
        lbl = head.partition("{")[2]
        if labels and not all(f'{k}="{v}"' in lbl for k, v in labels.items()):
            continue
        le = lbl.split('le="', 1)[1].split('"', 1)[0]
        out[le] = out.get(le, 0.0) + float(value)
    return out


def share_within(buckets: dict[str, float], le: str) -> float | None:
    """Share of a histogram's observations at or under the bucket bound ``le`` (None when empty)."""
    total = buckets.get("+Inf", 0.0)
    return None if not total else round(buckets.get(le, 0.0) / total, 4)


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one ``event`` in a daemon's log (other lines are skipped)."""
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for raw in f:
            if f'"{event}"'.encode() not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == event:
                out.append(line)
    return out


async def event_reasons(api: client.ApiClient, namespace: str) -> dict[str, int]:
    """core/v1 Events in ``namespace`` by reason (what ``kubectl describe`` would list)."""
    core: Any = client.CoreV1Api(api)
    resp = await core.list_namespaced_event(namespace, _preload_content=False)
    try:
        items = json.loads(await resp.read()).get("items") or []
    finally:
        resp.release()
    out: dict[str, int] = {}
    for ev in items:
        out[ev.get("reason", "")] = out.get(ev.get("reason", ""), 0) + 1
    return out


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body.decode()


class Daemon:
    """``canaryd run --no-leader-election`` as a subprocess, scoped to one namespace."""

    name = "canaryd"
    ready_path = "/readyz"  # served once the process is ready

    def __init__(
        self,
        kubeconfig: str,
        namespace: str,
        prometheus_url: str,
        log_path: Path,
        *,
        profile_to: Path | None = None,
        memtrace_to: Path | None = None,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.profile_to = profile_to
        argv = [python or sys.executable]  # another interpreter: e.g. a venv with only canaryd's own dependencies
        if profile_to is not None:
            argv += ["-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(profile_to), "-m", "canaryd"]
        elif memtrace_to is not None:
            argv += ["-m", "devkit.bench.memtrace", str(memtrace_to), "--"]
        else:
            argv += ["-m", "canaryd"]
        argv += ["run", "--no-leader-election", "--kubeconfig", kubeconfig]
        full_env = {
            **os.environ,
            "CANARYD_NAMESPACES": json.dumps([namespace]),
            "CANARYD_PROMETHEUS__URL": prometheus_url,
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(self.port),
            "CANARYD_LOG_FORMAT": "json",
            "CANARYD_IDENTITY": f"bench-{namespace}",
            **({"PYTHONPATH": str(CHECKOUT)} if python else {}),  # another venv: canaryd from this checkout
            **(env or {}),
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, cwd=REPO
        )
        self.started = time.monotonic()
        self._cpu0 = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.port}/metrics")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}")
            try:
                await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.port}{self.ready_path}", 2.0)
                self.started = time.monotonic()
                self._cpu0 = self.cpu_seconds()
                return
            except (urllib.error.URLError, OSError):
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout:g}s; log {self.log_path}")

    def cpu_seconds(self) -> float:
        # utime and stime are fields 14 and 15 of stat(5); after ')' the list starts at field 3.
        cpu = pid_cpu_seconds(self.pid)
        if cpu is None:
            raise ProcessLookupError(self.pid)
        return cpu

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def usage(self) -> dict[str, float]:
        """Peak RSS and CPU use since ready (call while the process still runs)."""
        minutes = max(1e-9, (time.monotonic() - self.started) / 60)
        cpu = self.cpu_seconds() - self._cpu0
        return {
            "peak_rss_mb": round(self.peak_rss_mb(), 1),
            "cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_minute": round(cpu / minutes, 2),
            "wall_seconds": round(minutes * 60, 1),
        }

    def stop(self, timeout: float = 30.0) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=10)
        finally:
            self._log.close()
