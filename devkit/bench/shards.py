"""``python -m devkit.bench.shards [--routes 2500 5000 10000] [--shards 4] [--interval 60]`` (``make bench-shards``).

Shards at scale, on one machine: for each size, ``--routes`` HTTPRoutes in a fresh namespace of one
devstack control plane, ``--shards`` daemons (``canaryd run --shards N``, identities ``canaryd-0`` …
so each prefers its own shard), the Envoy signal from the synthetic exporter through a real
Prometheus (1 s scrape). The rollouts start *staggered*: the bench creates the (annotated) routes
evenly over one interval, after the daemons are up, so every second about ``routes / interval`` of
them fall due — never in lockstep.

Backends are shared: route ``r<i>`` belongs to group ``i mod --groups`` and splits that group's
Services ``b<g>-v1``/``b<g>-v2`` under the GAMMA parent ``p<g>``. canaryd does not mind (each route's
state is its own), and it keeps the apiserver at ``routes + 4 × groups`` objects instead of
``5 × routes`` and the exporter/Prometheus at ``2 × groups`` Envoy clusters — so this measures the
daemons, not a Prometheus holding 20,000 clusters' histograms at a 1 s scrape on 2 cores.

Measured from outside, as ``devkit.bench.scenarios.scale`` does: the bench's own watch stamps every
route version (step jitter = watch arrival − the state's ``next_at``; writes per step), each daemon's
``/proc`` (peak and final RSS, CPU) and ``/metrics`` (analysis rounds, patches), and Prometheus's
own count of instant queries. Figures are reported, never asserted. Writes
``devkit/bench/results/shards.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.shards import shard_of
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from devkit.bench.harness import (
    REPO,
    BenchStack,
    Daemon,
    RouteRecorder,
    bench_stack,
    bounded,
    cluster_name,
    create_namespace,
    pid_cpu_seconds,
    prom_text_value,
    route_body,
    service_body,
    slice_body,
    summary,
    tally_steps,
)
from devkit.bench.run import RESULTS, machine
from devkit.bench.scenarios import prometheus_queries
from devkit.devstack.controlplane import free_port

SIZES = (2500, 5000, 10000)


class ShardDaemon(Daemon):
    """``canaryd run --shards N`` with leader election on, scoped to one namespace (its Leases there too)."""

    def __init__(
        self, kubeconfig: str, namespace: str, prometheus_url: str, log_path: Path, *, identity: str, shards: int
    ) -> None:
        import subprocess

        self.port = free_port()
        self.log_path = log_path
        self.profile_to = None
        self.identity = identity
        argv = [sys.executable, "-m", "canaryd", "run", "--shards", str(shards), "--kubeconfig", kubeconfig]
        full_env = {
            **os.environ,
            "CANARYD_NAMESPACES": json.dumps([namespace]),
            "CANARYD_LEASE_NAMESPACE": namespace,
            "CANARYD_PROMETHEUS__URL": prometheus_url,
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(self.port),
            "CANARYD_LOG_FORMAT": "json",
            "CANARYD_IDENTITY": identity,
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, cwd=REPO
        )
        self.started = time.monotonic()
        self._cpu0 = 0.0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


async def create_backends(api: client.ApiClient, ns: str, groups: int) -> None:
    """Per group: Services ``b<g>-v1``/``-v2``, each with a ready EndpointSlice."""
    core: Any = client.CoreV1Api(api)
    disc: Any = client.DiscoveryV1Api(api)
    backends = [f"b{g:03d}-{v}" for g in range(groups) for v in ("v1", "v2")]
    await bounded([partial(core.create_namespaced_service, ns, service_body(b)) for b in backends])
    await bounded([partial(disc.create_namespaced_endpoint_slice, ns, slice_body(b)) for b in backends])


def shared_route(i: int, name: str, groups: int, annotations: dict[str, str]) -> dict[str, Any]:
    """Route ``i``: under the parent ``p<g>``, 100/0 between its group's two Services, canary ``b<g>-v2``."""
    g = i % groups
    out = route_body(name, f"b{g:03d}-v1", f"b{g:03d}-v2", {**annotations, ann.CANARY: f"b{g:03d}-v2"})
    out["spec"]["parentRefs"][0]["name"] = f"p{g:03d}"
    return out


async def create_staggered(api: client.ApiClient, ns: str, bodies: list[dict[str, Any]], span_s: float) -> float:
    """Create the (annotated) routes evenly over ``span_s`` — route i at ``i × span / n`` — so the rollouts
    start spread over one interval; one write per route (annotating existing routes would be two). Returns
    the largest lag behind that plan: the bench's own pace, reported so that a late start is not read as
    canaryd's jitter (which is measured from each state's ``next_at``, not from this plan)."""
    co: Any = client.CustomObjectsApi(api)
    sem = asyncio.Semaphore(32)
    lag = 0.0
    t0 = time.monotonic()

    async def one(body: dict[str, Any]) -> None:
        async with sem:
            await co.create_namespaced_custom_object(GATEWAY_GROUP, GATEWAY_VERSION, ns, HTTPROUTES, body)

    tasks = []
    for i, body in enumerate(bodies):
        due = t0 + i * span_s / len(bodies)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        lag = max(lag, time.monotonic() - due)
        tasks.append(asyncio.create_task(one(body)))
    await asyncio.gather(*tasks)
    return lag


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu for name, pid in pids.items() if (cpu := pid_cpu_seconds(pid)) is not None}


def _promoted(rec: RouteRecorder, names: list[str]) -> bool:
    for n in names:
        runs = rec.history.get(n)
        if not runs or runs[-1].state is None or runs[-1].state.get("phase") != "Promoted":
            return False
    return True


async def _wait_own_shards(daemons: list[ShardDaemon], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = await asyncio.gather(*(asyncio.to_thread(d.metrics) for d in daemons))
        if all(prom_text_value(t, "canaryd_leader") >= 1 for t in texts):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("not every shard daemon holds a shard")


async def one_size(
    stack: BenchStack, routes: int, *, shards: int, groups: int, interval_s: float, steps: str
) -> dict[str, Any]:
    api, prom, exporter = stack.api, stack.prometheus, stack.exporter
    ns = f"shards{routes}"
    await create_namespace(api, ns)
    names = [f"r{i:05d}" for i in range(routes)]
    await create_backends(api, ns, groups)
    clusters = [cluster_name(ns, f"p{g:03d}", f"b{g:03d}-{v}") for g in range(groups) for v in ("v1", "v2")]
    for c in clusters:
        exporter.set_backend(c, rps=20.0, error_ratio=0.0, latency_ms=20)
    rec = RouteRecorder(api, ns)
    await rec.start()
    daemons = [
        ShardDaemon(
            stack.info.kubeconfig,
            ns,
            prom.url,
            stack.work / f"canaryd-{ns}-{i}.log",
            identity=f"canaryd-{i}",
            shards=shards,
        )
        for i in range(shards)
    ]
    annotations = {  # and canaryd.io/canary: the route's group's v2
        ann.STEPS: steps,
        ann.INTERVAL: f"{interval_s:g}s",
        # The default analysis-interval (10 s): six rounds per 60 s step, of which only the step's last is
        # written (quiet rounds are not: docs/analysis.md), so still one write per step.
        ann.ANALYSIS: "envoy",
        ann.MIN_REQUESTS: "10",
    }
    n_steps = len(steps.split(",")) + (0 if steps.split(",")[-1] == "100" else 1)
    try:
        await asyncio.gather(*(d.wait_ready(timeout=180) for d in daemons))
        await _wait_own_shards(daemons)
        q0, t0 = prometheus_queries(prom), time.monotonic()
        cpu0 = _cpu(stack.pids)
        load_start = [round(x, 2) for x in os.getloadavg()]
        bodies = [shared_route(i, n, groups, annotations) for i, n in enumerate(names)]
        lag = await create_staggered(api, ns, bodies, interval_s)
        budget = interval_s * (n_steps + 1) + 180
        try:
            await rec.wait_for(lambda: _promoted(rec, names), budget, f"{routes} rollouts promoted")
            timed_out = False
        except TimeoutError:
            timed_out = True
        wall = time.monotonic() - t0
        cpu1 = _cpu(stack.pids)
        usage = [{"identity": d.identity, **d.usage(), "rss_mb_end": round(d.rss_mb(), 1)} for d in daemons]
        metrics = [d.metrics() for d in daemons]
        load_end = [round(x, 2) for x in os.getloadavg()]
    finally:
        for d in daemons:
            d.stop(timeout=60)
        await rec.stop()
        for c in clusters:
            exporter.remove_backend(c)
    q1 = prometheus_queries(prom)

    t = tally_steps(rec.history, names)
    jitter, writes, moves, by_cause = t.jitter, t.writes, t.moves, t.by_cause
    rounds = sum(prom_text_value(t, "canaryd_analysis_total") for t in metrics)
    patches = [prom_text_value(t, "canaryd_route_patches_total") for t in metrics]
    queries = q1 - q0
    rounds_per_route = rounds / routes
    share = Counter(shard_of(ns, n, shards) for n in names)
    return {
        "routes": routes,
        "shards": shards,
        "groups": groups,
        "all_promoted": not timed_out,
        "interval_s": interval_s,
        "steps": steps,
        "objects_created": routes + 4 * groups,
        "creation_lag_max_s": round(lag, 3),
        "wall_seconds": round(wall, 1),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "routes_per_shard": [share[i] for i in range(shards)],
        "step_jitter_seconds": summary(jitter, 3),
        "route_writes": writes,
        "step_transitions": moves,
        "writes_by_cause": by_cause,
        "daemon_writes_per_step": round(sum(patches) / moves, 3) if moves else None,
        "patches_per_daemon": patches,
        "expected_transitions": routes * n_steps,
        "analysis_judgements": rounds,
        "analysis_rounds_per_route": round(rounds_per_route, 2),
        "prometheus_queries": queries,
        "prometheus_queries_per_second": round(queries / wall, 2) if wall else None,
        "prometheus_queries_per_round": round(queries / rounds_per_route, 2) if rounds_per_route else None,
        "daemons": usage,
        # CPU seconds the rest of the machine spent over the same span (apiserver, etcd, Prometheus,
        # the bench with its watch and exporter): where a 2-core machine runs out first.
        "other_cpu_seconds": {k: round(cpu1[k] - v, 1) for k, v in cpu0.items() if k in cpu1},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "name": "shards",
        "command": " ".join(["python", "-m", "devkit.bench.shards", *sys.argv[1:]]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "machine": machine(),
        "note": "other helpers' test runs share this 2-core machine; figures from a loaded machine are pessimistic",
        "sizes": [],
    }
    async with bench_stack("canaryd-bench-shards-", keep=args.keep) as stack:
        for n in args.routes:
            print(f"shards: {n} routes over {args.shards} shards, interval {args.interval:g}s", flush=True)
            r = await one_size(
                stack, n, shards=args.shards, groups=args.groups, interval_s=args.interval, steps=args.steps
            )
            result["sizes"].append(r)
            j = r["step_jitter_seconds"]
            print(
                f"  promoted={r['all_promoted']} jitter p50/p99/max {j['p50']}/{j['p99']}/{j['max']} s, "
                f"daemon writes/step {r['daemon_writes_per_step']}, "
                f"queries/round {r['prometheus_queries_per_round']}, "
                f"RSS {[d['peak_rss_mb'] for d in r['daemons']]} MB",
                flush=True,
            )
            if time.monotonic() - started > args.budget:
                result["stopped_early"] = f"over the {args.budget:g}s budget after {n} routes"
                break
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.shards", description=__doc__)
    p.add_argument("--routes", nargs="+", type=int, default=list(SIZES), help="route counts, one run each")
    p.add_argument("--shards", type=int, default=4, help="shards = daemon processes")
    p.add_argument("--groups", type=int, default=50, help="backend groups the routes share (see above)")
    p.add_argument("--interval", type=float, default=60.0, help="step interval in seconds (= the stagger span)")
    p.add_argument("--steps", default="50", help="canaryd.io/steps (the promotion to 100 follows)")
    p.add_argument("--budget", type=float, default=1200.0, help="start no further size after this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "shards.json")
    p.add_argument("--keep", action="store_true", help="keep the work dir (every daemon's JSON log)")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
