"""The three measurements: reaction, time to rollback, scale. Each runs its own ``canaryd run``
in its own namespace against the shared control plane, Prometheus and exporter."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from devkit.bench.harness import (
    Daemon,
    RouteRecorder,
    Seen,
    annotate_route,
    cluster_name,
    create_apps,
    create_namespace,
    event_reasons,
    http_get,
    log_events,
    pid_cpu_seconds,
    prom_histogram,
    prom_text_value,
    share_within,
    summary,
    tally_steps,
)
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer


@dataclass
class Env:
    api: client.ApiClient
    kubeconfig: str
    prometheus: PrometheusServer
    exporter: MetricsExporter
    work: Path
    pids: dict[str, int] = field(default_factory=dict)  # etcd, kube-apiserver, prometheus, bench
    daemon_env: dict[str, str] = field(default_factory=dict)  # extra CANARYD_* for the scale daemons
    memtrace_dir: Path | None = None  # run the scale daemons under tracemalloc, reports here
    daemon_python: str | None = None  # the scale daemons' interpreter (default: the bench's own)


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        cpu = pid_cpu_seconds(pid)
        if cpu is not None:
            out[name] = cpu
    return out


def _ns(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def prometheus_queries(prom: PrometheusServer) -> float:
    """Instant queries Prometheus has answered, from its own /metrics (not itself a query)."""
    text = http_get(f"{prom.url}/metrics")
    return prom_text_value(text, "prometheus_http_requests_total", {"handler": "/api/v1/query"})


def _patched(rec: RouteRecorder, name: str) -> bool:
    return any((s.weight or 0) > 0 for s in rec.history.get(name, []))


# --- 1. reaction -----------------------------------------------------------------------------


async def reaction(env: Env, routes: int, *, timeout_s: float = 15.0) -> dict[str, Any]:
    """Annotate one route at a time and time until the watch shows the first weight patch."""
    ns = _ns("react")
    await create_namespace(env.api, ns)
    names = [f"r{i:04d}" for i in range(routes)]
    await create_apps(env.api, ns, names)
    rec = RouteRecorder(env.api, ns)
    await rec.start()
    daemon = Daemon(env.kubeconfig, ns, env.prometheus.url, env.work / f"canaryd-{ns}.log")
    latencies: list[float] = []
    acked: list[float] = []
    try:
        await daemon.wait_ready()
        for n in names:
            t0 = time.time()
            await annotate_route(env.api, ns, n, {ann.CANARY: f"{n}-v2", ann.STEPS: "10,50,100", ann.INTERVAL: "1h"})
            t_ack = time.time()
            await rec.wait_for(partial(_patched, rec, n), timeout_s, f"{ns}/{n} patched")
            first = next(s for s in rec.history[n] if (s.weight or 0) > 0)
            latencies.append(first.at - t0)
            acked.append(first.at - t_ack)
        usage = daemon.usage()
    finally:
        daemon.stop()
        await rec.stop()
    return {
        "routes": routes,
        "mode": "subprocess `canaryd run --no-leader-election`, one route annotated at a time",
        "seconds_from_annotation_sent": summary(latencies),
        "seconds_from_annotation_acknowledged": summary(acked),
        "daemon": usage,
    }


# --- 2. time to rollback ---------------------------------------------------------------------


@dataclass
class _RollbackRoute:
    name: str
    interval_s: float
    threshold: int
    stable: str  # exporter cluster names
    canary: str
    bad_at: float = 0.0  # t0: when the canary starts failing (0 = not yet)
    error_ratio: float = 0.0
    weight: int = 0
    segments: list[tuple[float, float]] = field(default_factory=list)  # (since, canary rps)
    rolled_back_at: float = 0.0
    outcome: str = ""


async def rollback(  # noqa: C901 - a bench scenario script, read top to bottom
    env: Env,
    scenarios: list[tuple[float, int]],
    routes_per_scenario: int,
    *,
    rps: float = 100.0,
    bad_error_ratio: float = 0.2,
) -> dict[str, Any]:
    """Per (interval, failure-threshold): canaries that start failing at a time spread over one
    interval, measured from the first bad response to the watch seeing the rollback patch."""
    ns = _ns("rollback")
    await create_namespace(env.api, ns)
    exp = env.exporter
    routes: dict[str, _RollbackRoute] = {}
    for si, (interval, threshold) in enumerate(scenarios):
        for k in range(routes_per_scenario):
            n = f"s{si}-r{k:02d}"
            routes[n] = _RollbackRoute(
                n, interval, threshold, cluster_name(ns, n, f"{n}-v1"), cluster_name(ns, n, f"{n}-v2")
            )
    for r in routes.values():
        exp.set_backend(r.stable, rps=rps, error_ratio=0.0, latency_ms=20)
        exp.set_backend(r.canary, rps=0.0, error_ratio=0.0, latency_ms=20)

    def on_seen(name: str, s: Seen) -> None:
        r = routes.get(name)
        if r is None:
            return
        if s.weight is not None and s.weight != r.weight:
            # The mesh follows the weights: shift the synthetic traffic the same way.
            r.weight = s.weight
            canary_rps = rps * s.weight / 100
            exp.set_backend(r.stable, rps=rps - canary_rps, error_ratio=0.0, latency_ms=20)
            exp.set_backend(r.canary, rps=canary_rps, error_ratio=r.error_ratio, latency_ms=20)
            r.segments.append((s.at, canary_rps))
        phase = (s.state or {}).get("phase")
        if phase in ("RolledBack", "Promoted", "Failed") and not r.outcome:
            r.outcome = phase
            r.rolled_back_at = s.at

    rec = RouteRecorder(env.api, ns, on_seen=on_seen)
    await rec.start()

    def annotations(n: str) -> dict[str, str]:
        r = routes[n]
        return {
            ann.CANARY: f"{n}-v2",
            ann.STEPS: "10,20,30,40,50,60,70,80,90",
            ann.INTERVAL: f"{r.interval_s:g}s",
            ann.FAILURE_THRESHOLD: str(r.threshold),
            ann.ANALYSIS: "envoy",
            ann.MIN_REQUESTS: "10",
        }

    daemon = Daemon(env.kubeconfig, ns, env.prometheus.url, env.work / f"canaryd-{ns}.log")
    try:
        await daemon.wait_ready()
        await create_apps(env.api, ns, list(routes), annotations)
        await rec.wait_for(lambda: all(r.weight > 0 for r in routes.values()), 60, "every rollout started")
        started = {n: next(s.at for s in rec.history[n] if (s.weight or 0) > 0) for n in routes}
        # Go bad somewhere inside the second interval, spread evenly across the routes of a scenario.
        plan = []
        by_scenario: dict[tuple[float, int], list[_RollbackRoute]] = {}
        for r in routes.values():
            by_scenario.setdefault((r.interval_s, r.threshold), []).append(r)
        for rs in by_scenario.values():
            for k, r in enumerate(rs):
                plan.append((started[r.name] + r.interval_s * (1 + (k + 0.5) / len(rs)), r))
        plan.sort(key=lambda p: p[0])
        for at, r in plan:
            await asyncio.sleep(max(0.0, at - time.time()))
            r.error_ratio = bad_error_ratio
            r.bad_at = time.time()
            canary_rps = rps * r.weight / 100
            exp.set_backend(r.canary, rps=canary_rps, error_ratio=bad_error_ratio, latency_ms=20)
            r.segments.append((r.bad_at, canary_rps))
        longest = max(i * (t + 2) for i, t in scenarios) + 30
        await rec.wait_for(lambda: all(r.outcome for r in routes.values()), longest, "every rollout ended")
        usage = daemon.usage()
    finally:
        daemon.stop()
        await rec.stop()
        for r in routes.values():
            exp.remove_backend(r.stable)
            exp.remove_backend(r.canary)

    out = []
    for (interval, threshold), rs in by_scenario.items():
        ttr = [r.rolled_back_at - r.bad_at for r in rs if r.outcome == "RolledBack"]
        bad_requests, shares = [], []
        for r in rs:
            if r.outcome != "RolledBack":
                continue
            served = _integrate(r.segments, r.bad_at, r.rolled_back_at)
            bad_requests.append(served)
            shares.append(served / (rps * (r.rolled_back_at - r.bad_at)))
        out.append(
            {
                "interval_s": interval,
                "failure_threshold": threshold,
                "analysis_window_s": interval,
                "routes": len(rs),
                "rolled_back": len(ttr),
                "outcomes": sorted({r.outcome for r in rs}),
                "seconds_to_rollback": summary(ttr, 3),
                "bad_version_requests": summary(bad_requests, 1),
                "bad_version_share": summary(shares, 4),
            }
        )
    return {
        "signal": "envoy (synthetic exporter, Prometheus scrape 1s)",
        "total_rps_per_route": rps,
        "bad_error_ratio": bad_error_ratio,
        "steps": "10,20,...,90",
        "scenarios": out,
        "daemon": usage,
    }


def _own_delay(log_path: Path, metrics: str) -> dict[str, Any]:
    """The daemon's own account of each step write (``route_patched``'s ``due_to_*`` fields, exact) and its
    ``canaryd_step_delay_seconds`` histogram (share within 1 s), from the step's ``next_at`` to: its last
    analysis answering (Prometheus), its patch sent (the daemon's share), the apiserver acknowledging it.
    ``step_jitter_seconds`` (the bench's watch) adds the apiserver's watch fan-out to the recorder."""
    lines = log_events(log_path, "route_patched")
    out: dict[str, Any] = {}
    for stage in ("analysed", "sent", "acknowledged"):
        key = f"due_to_{stage}_s"
        out[f"due_to_{stage}_seconds"] = summary([x[key] for x in lines if key in x], 3)
        buckets = prom_histogram(metrics, "canaryd_step_delay_seconds", {"stage": stage})
        out[f"step_delay_histogram_{stage}"] = {
            "count": buckets.get("+Inf", 0.0),
            "share_within_1s": share_within(buckets, "1.0"),
        }
    return out


def _integrate(segments: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Requests sent to the canary between t0 and t1 given (since, rps) segments."""
    total = 0.0
    segs = sorted(segments)
    for i, (since, rate) in enumerate(segs):
        until = segs[i + 1][0] if i + 1 < len(segs) else t1
        lo, hi = max(since, t0), min(until, t1)
        if hi > lo:
            total += rate * (hi - lo)
    return total


# --- 3. scale ----------------------------------------------------------------------------------


async def scale(
    env: Env,
    routes: int,
    *,
    interval_s: float = 10.0,
    steps: str = "25,50,75",
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """``routes`` rollouts started together, analysed with the envoy signal each interval."""
    ns = _ns(f"scale{routes}")
    await create_namespace(env.api, ns)
    names = [f"r{i:04d}" for i in range(routes)]
    exp = env.exporter
    clusters = [cluster_name(ns, n, f"{n}-{v}") for n in names for v in ("v1", "v2")]
    for c in clusters:
        exp.set_backend(c, rps=10.0, error_ratio=0.0, latency_ms=20)
    rec = RouteRecorder(env.api, ns)
    await rec.start()
    annotations = {
        ann.STEPS: steps,
        ann.INTERVAL: f"{interval_s:g}s",
        ann.ANALYSIS: "envoy",
        ann.MIN_REQUESTS: "10",
    }
    t_setup = time.monotonic()
    await create_apps(env.api, ns, names, lambda n: {ann.CANARY: f"{n}-v2", **annotations})
    setup_s = time.monotonic() - t_setup
    n_steps = len(steps.split(",")) + 1  # + the promotion to 100
    q0 = prometheus_queries(env.prometheus)
    daemon = Daemon(
        env.kubeconfig,
        ns,
        env.prometheus.url,
        env.work / f"canaryd-{ns}.log",
        profile_to=profile_to,
        memtrace_to=None if env.memtrace_dir is None else env.memtrace_dir / f"tracemalloc-{routes}.txt",
        python=env.daemon_python,
        env=env.daemon_env or None,
    )
    try:
        await daemon.wait_ready(timeout=120)
        others0 = _cpu(env.pids)
        budget = interval_s * n_steps + 60 + routes * 0.05

        def done() -> bool:
            return all(
                (rec.history.get(n) or [Seen(0, "", None, None)])[-1].state is not None
                and rec.history[n][-1].state.get("phase") == "Promoted"  # type: ignore[union-attr]
                for n in names
            )

        try:
            await rec.wait_for(done, budget, f"{routes} rollouts promoted")
            timed_out = False
        except TimeoutError:
            timed_out = True  # report what happened instead of losing the run
        usage = daemon.usage()
        others1 = _cpu(env.pids)
        metrics = daemon.metrics()
    finally:
        daemon.stop(timeout=60)
        await rec.stop()
        for c in clusters:
            exp.remove_backend(c)
    q1 = prometheus_queries(env.prometheus)
    events = await event_reasons(env.api, ns)  # after the daemon's shutdown flush

    t = tally_steps(rec.history, names)
    jitter, writes, moves, by_cause = t.jitter, t.writes, t.moves, t.by_cause
    patches = prom_text_value(metrics, "canaryd_route_patches_total")
    rounds = prom_text_value(metrics, "canaryd_analysis_total")
    queries = q1 - q0
    rounds_per_route = rounds / routes
    return {
        **_own_delay(daemon.log_path, metrics),
        "events_created": sum(events.values()),
        "events_by_reason": events,
        "events_per_step_per_route": round(sum(events.values()) / moves, 3) if moves else None,
        "routes": routes,
        "all_promoted": not timed_out,
        "interval_s": interval_s,
        "steps": steps + ",100",
        "objects_created": routes * 5,
        "setup_seconds": round(setup_s, 1),
        "step_jitter_seconds": summary(jitter, 3),
        "daemon": usage,
        "route_writes": writes,
        "route_patches_metric": patches,
        "step_transitions": moves,
        "writes_per_step_per_route": round(writes / moves, 3) if moves else None,
        "writes_by_cause": by_cause,
        "step_writes_per_step_per_route": round(by_cause["step"] / moves, 3) if moves else None,
        "expected_transitions": routes * n_steps,
        "analysis_judgements": rounds,
        "analysis_rounds_per_route": round(rounds_per_route, 2),
        "prometheus_queries": queries,
        "prometheus_queries_per_round": round(queries / rounds_per_route, 2) if rounds_per_route else None,
        "profile": str(profile_to) if profile_to else None,
        "daemon_env": dict(env.daemon_env),
        "daemon_python": env.daemon_python,
        # CPU seconds the rest of the machine spent over the same span as the daemon's figures
        # (the bench process includes the exporter rendering every cluster each scrape).
        "other_cpu_seconds": {k: round(others1[k] - v, 2) for k, v in others0.items() if k in others1},
    }
