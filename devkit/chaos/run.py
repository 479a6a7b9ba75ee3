"""``python -m devkit.chaos.run [--routes 50] [--seed 1] [--kills N] [--out devkit/bench/results/chaos.json]``

canaryd under chaos (``make chaos``; docs/reliability.md):

1. a private control plane (etcd + kube-apiserver), a Prometheus on a fixed port, the exporter;
2. ``--routes`` HTTPRoutes in one namespace (``devkit.chaos.scenario``): time-based, envoy-analysed
   healthy canaries, and a few bad canaries that must end RolledBack; some start during the chaos;
3. two ``canaryd run`` replicas with leader election;
4. seeded SIGKILLs at random moments — the leading or standby daemon, the kube-apiserver, etcd,
   Prometheus — each restarted after a seeded pause (the daemon as a new incarnation, like a pod);
5. a concurrent editor changing what canaryd does not own (``devkit.chaos.editor``);
6. once every route is terminal (or the time is up): every revision of every route read back from
   etcd and checked (``devkit.chaos.invariants``), plus the daemons' exits and logs.

Prints a summary, writes the JSON result, exits 1 on any violation (2 when the run itself broke).
Everything it started is stopped in ``finally``; the whole run is bounded by ``--budget``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.core.shards import lease_name, lease_names, shard_of
from canaryd.core.state import Phase, parse_ts
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES, new_client
from devkit.bench.harness import bounded, cluster_name, service_body, slice_body
from devkit.bench.run import machine
from devkit.chaos import invariants
from devkit.chaos.editor import Editor
from devkit.chaos.etcd_history import EtcdError, EtcdReader, HistoryCollector, lease_key, route_key
from devkit.chaos.invariants import Expectation, Violation, state_of
from devkit.chaos.processes import Exit, Replica, StickyPrometheus
from devkit.chaos.scenario import COMPONENTS, NAMESPACE, Kill, Plan, RouteSpec, make_plan
from devkit.devstack import controlplane
from devkit.devstack.controlplane import StackInfo
from devkit.devstack.exporter import MetricsExporter

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
EXPORTER_JOB = "chaos-exporter"
TERMINAL = (Phase.PROMOTED.value, Phase.ROLLED_BACK.value, Phase.FAILED.value)
LEASE = "canaryd-leader"  # the daemons' default lease_name
EXIT_BLAME_S = 30.0  # a daemon exit this soon after a restart is blamed on that kill


def log(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


@dataclass
class KillRecord:
    kill: Kill
    started: float = 0.0
    restarted: float = 0.0
    wall: float = 0.0  # time.time() of the kill, to compare with the states' timestamps
    in_flight: int | None = None  # rollouts started and not yet terminal at the kill
    target: str = ""
    ok: bool = False
    error: str = ""

    def as_dict(self, window_start: float) -> dict[str, Any]:
        return {
            "component": self.kill.component,
            "target": self.target,
            "planned_at_s": self.kill.at,
            "killed_at_s": round(self.started - window_start, 1),  # both from the start of the chaos window
            "down_s": self.kill.down_s,
            "back_after_s": round(self.restarted - self.started, 1) if self.restarted else None,
            "restarted": self.ok,
            "rollouts_in_flight": self.in_flight,
            "error": self.error,
        }


@dataclass
class Chaos:
    """What one run holds while it runs."""

    plan: Plan
    info: StackInfo
    api: client.ApiClient
    prom: StickyPrometheus
    replicas: list[Replica]
    t0: float
    kills: list[KillRecord] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    restarts_after_crash: int = 0
    created: dict[str, float] = field(default_factory=dict)  # route -> when created (time.time())
    healthz_failures: int = 0
    healthz_checks: int = 0
    chaos_started: float = 0.0
    shards: int = 1

    # --- the daemon replicas -------------------------------------------------------------------
    async def monitor(self, stop: asyncio.Event) -> None:
        """Notice a daemon that ended without being killed, record it, and start it again (as the
        kubelet would): its exit is a finding, the run goes on."""
        tick = 0
        while not stop.is_set():
            tick += 1
            for r in self.replicas:
                if r.proc is None or r.killing:
                    continue
                proc = r.proc
                rc = proc.poll()
                if rc is not None:
                    ex = Exit(r.slot, r.identity, proc.pid, rc, time.monotonic(), False, r.exit_reason())
                    self.exits.append(ex)
                    log(self.t0, f"!! daemon {r.identity} exited by itself rc={rc}: {ex.reason}")
                    await asyncio.sleep(1.0)
                    if r.proc is proc and not r.killing:  # nobody started it meanwhile
                        r.start()
                        self.restarts_after_crash += 1
                elif tick % 4 == 0:
                    status = await asyncio.to_thread(r.http, "/healthz")
                    self.healthz_checks += 1
                    if status == 200:
                        r.served = True
                    elif r.served and r.alive and not r.killing:  # a failure once it had been serving
                        self.healthz_failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def leader_identity(self) -> str | None:
        coord = client.CoordinationV1Api(self.api)
        try:
            # With shards, "the leader" a kill may target is shard 0's holder.
            name = lease_name(LEASE, 0, self.shards)
            lease = await coord.read_namespaced_lease(name, NAMESPACE, _request_timeout=3)
        except Exception:
            return None
        return lease.spec.holder_identity if lease.spec else None

    # --- kills -----------------------------------------------------------------------------------
    async def run_kills(self) -> None:
        for kill in self.plan.kills:
            delay = self.chaos_started + kill.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = KillRecord(kill, started=time.monotonic(), wall=time.time())
            self.kills.append(rec)
            try:
                await self._kill(kill, rec)
                rec.ok = True
            except Exception as exc:
                rec.error = f"{type(exc).__name__}: {exc}"[:500]
                log(self.t0, f"!! restart of {kill.component} failed: {rec.error}")
                if kill.component in ("kube-apiserver", "etcd"):
                    return  # nothing after this can be judged; the checks say so
            rec.restarted = time.monotonic()
            log(self.t0, f"   {kill.component} {rec.target} back after {rec.restarted - rec.started:.1f}s")

    async def _kill(self, kill: Kill, rec: KillRecord) -> None:
        c = kill.component
        if c == "daemon":
            holder = await self.leader_identity()
            alive = [r for r in self.replicas if r.alive]
            leaders = [r for r in alive if r.identity == holder]
            others = [r for r in alive if r.identity != holder]
            pool = (leaders or others) if kill.target == "leader" else (others or leaders)
            if not pool:
                rec.target = "none alive"
                return
            victim = pool[0]
            role = "holder" if victim.identity == holder else "standby"
            rec.target = f"{victim.identity} ({role}; wanted {kill.target})"
            log(self.t0, f">> SIGKILL daemon {rec.target} for {kill.down_s}s")
            self.exits.append(victim.kill())
            await asyncio.sleep(kill.down_s)
            victim.start()
            return
        rec.target = c
        log(self.t0, f">> SIGKILL {c} for {kill.down_s}s")
        if c == "prometheus":
            await asyncio.to_thread(self.prom.kill)
            await asyncio.sleep(kill.down_s)
            await asyncio.to_thread(self.prom.start)
            return
        await asyncio.to_thread(controlplane.kill, self.info, c)
        await asyncio.sleep(kill.down_s)
        await asyncio.to_thread(controlplane.restart, self.info, c, 120.0)

    # --- routes ------------------------------------------------------------------------------------
    async def create_route(self, spec: RouteSpec, deadline: float) -> bool:
        co = client.CustomObjectsApi(self.api)
        while time.monotonic() < deadline:
            try:
                await co.create_namespaced_custom_object(
                    GATEWAY_GROUP, GATEWAY_VERSION, NAMESPACE, HTTPROUTES, spec.body(), _request_timeout=10
                )
                return True
            except ApiException as exc:
                if exc.status == 409:
                    return True  # an earlier attempt landed although its answer was lost
            except Exception:  # the apiserver or etcd is down: try again
                pass
            await asyncio.sleep(1.0)
        return False

    async def phases(self) -> dict[str, str | None]:
        co = client.CustomObjectsApi(self.api)
        out: dict[str, Any] = await co.list_namespaced_custom_object(
            GATEWAY_GROUP, GATEWAY_VERSION, NAMESPACE, HTTPROUTES, _request_timeout=10
        )
        phases: dict[str, str | None] = {}
        for obj in out.get("items") or []:
            st, _ = state_of(obj)
            phases[obj["metadata"]["name"]] = st.phase.value if st else None
        return phases


async def _setup_cluster(api: client.ApiClient, plan: Plan, exporter: MetricsExporter) -> None:
    core: Any = client.CoreV1Api(api)
    disc: Any = client.DiscoveryV1Api(api)
    await core.create_namespace({"metadata": {"name": NAMESPACE}})
    services = [n for s in plan.routes for n in (s.stable, s.canary, s.third)]
    ready = [n for s in plan.routes for n in (s.stable, s.canary)]
    await bounded([partial(core.create_namespaced_service, NAMESPACE, service_body(n)) for n in services], 8)
    await bounded([partial(disc.create_namespaced_endpoint_slice, NAMESPACE, slice_body(n)) for n in ready], 8)
    for s in plan.routes:
        if s.kind == "time":
            continue
        exporter.set_backend(cluster_name(NAMESPACE, s.name, s.stable), rps=40, error_ratio=0.0, latency_ms=20)
        bad = s.kind == "bad"
        exporter.set_backend(
            cluster_name(NAMESPACE, s.name, s.canary), rps=20, error_ratio=0.3 if bad else 0.0, latency_ms=20
        )


def _check(  # noqa: C901 - every check of the run, one after the other
    plan: Plan,
    collector: HistoryCollector,
    editor: Editor,
    chaos: Chaos,
    final_rcs: dict[str, int | None],
) -> tuple[list[Violation], dict[str, Any]]:
    violations: list[Violation] = []
    attempts: dict[str, list[invariants.EditAttempt]] = {}
    for a in editor.attempts:
        attempts.setdefault(a.route, []).append(a)
    reports = []
    for spec in plan.routes:
        h = collector.keys.get(route_key(NAMESPACE, spec.name))
        revs = [(r.mod_revision, r.obj) for r in h.ordered()] if h else []
        exp = Expectation(spec.name, spec.stable, spec.canary, spec.final_phase, spec.forbidden_phases)
        rep = invariants.check_route(
            exp, revs, attempts.get(spec.name, []), complete=bool(h and h.complete_down_to_creation)
        )
        for gap in h.gaps if h else []:
            rep.violations.append(Violation(spec.name, None, "history_gap", gap))
        reports.append(rep)
        violations += rep.violations
        # The editor's own record agrees with the history: its last confirmed write is in it.
        confirmed = editor.last_confirmed.get(spec.name)
        if confirmed is not None and h is not None and confirmed[0] not in h.revisions:
            violations.append(
                Violation(spec.name, confirmed[0], "edit_missing", "the editor's confirmed write is not in etcd")
            )
    # The daemons' logs: each route's weights written once each, in order.
    patched: dict[str, list[tuple[str, int]]] = {}
    root_ended = 0
    warnings: Counter[str] = Counter()
    for r in chaos.replicas:
        for ev in r.events():
            if ev.get("event") == "root_task_ended":
                root_ended += 1
            if ev.get("level") in ("warning", "error", "critical"):
                warnings[f"{ev.get('level')} {ev.get('event')}"] += 1
            if ev.get("event") == "route_patched" and ev.get("canary_weight") is not None:
                at, weight = str(ev.get("timestamp")), int(ev["canary_weight"])
                patched.setdefault(str(ev.get("route")), []).append((at, weight))
    for route, writes in patched.items():
        violations += invariants.check_log_steps(route, [w for _, w in sorted(writes)])
    shard_totals = _check_shards(plan, collector, editor, chaos) if chaos.shards > 1 else None
    if shard_totals is not None:
        violations += shard_totals.pop("violations")
    for ex in chaos.exits:
        if not ex.killed_by_chaos:
            b = blame(chaos, ex.at)
            after = "" if b is None else f" ({b.kill.component} killed {ex.at - b.started:.1f}s before)"
            detail = (
                f"{ex.identity} pid {ex.pid} rc={ex.rc} at {ex.at - chaos.chaos_started:.1f}s into the chaos "
                f"without being killed{after}: {ex.reason}"
            )
            violations.append(Violation("-", None, "daemon_exited", detail))
    for identity, rc in final_rcs.items():
        if rc != 0:
            violations.append(Violation("-", None, "daemon_unclean_stop", f"{identity}: SIGTERM gave rc={rc}"))
    for k in chaos.kills:
        if not k.ok:
            violations.append(Violation("-", None, "restart_failed", f"{k.kill.component}: {k.error}"))
    totals = {
        "revisions_checked": sum(r.revisions for r in reports),
        "canaryd_revisions": sum(r.canaryd_revisions for r in reports),
        "editor_revisions": sum(r.editor_revisions for r in reports),
        "edits_kept": sum(r.edits_kept for r in reports),
        "edits_clobbered": sum(r.edits_clobbered for r in reports),
        "final_phases": dict(Counter(r.final_phase or "none" for r in reports)),
        "root_task_ended_lines": root_ended,
        "shards": shard_totals,
        "log_warnings": dict(warnings.most_common()),
        "routes": {
            r.route: {"weights": r.weights, "phases": r.phases, "revisions": r.revisions, "final": r.final_phase}
            for r in reports
        },
    }
    return violations, totals


def _check_shards(plan: Plan, collector: HistoryCollector, editor: Editor, chaos: Chaos) -> dict[str, Any]:
    """Every canaryd revision of a route against the shard Leases' history (``check_shard_writes``): the
    writer named by its ``route_patched`` line held the route's shard at that revision. The editor's
    confirmed writes are skipped; a revision no line claims (a SIGKILL between a patch and its log line,
    or an editor write whose answer was lost) is counted, not judged."""
    written_by: dict[int, str] = {}
    for r in chaos.replicas:
        for ev in r.events():
            if ev.get("event") == "route_patched" and ev.get("resource_version"):
                written_by[int(ev["resource_version"])] = str(ev["_log"]).removesuffix(".log")  # <identity>.log
    foreign = {a.result_rv for a in editor.attempts if a.outcome == "applied" and a.result_rv is not None}

    def revs(key: str) -> list[tuple[int, dict[str, Any]]]:
        h = collector.keys.get(key)
        return [(x.mod_revision, x.obj) for x in h.ordered()] if h else []

    routes = {
        s.name: (shard_of(NAMESPACE, s.name, chaos.shards), revs(route_key(NAMESPACE, s.name))) for s in plan.routes
    }
    leases = {i: revs(lease_key(NAMESPACE, n)) for i, n in enumerate(lease_names(LEASE, chaos.shards))}
    rep = invariants.check_shard_writes(routes, leases, written_by, foreign)
    return {
        "shards": chaos.shards,
        "writes_checked": rep.writes,
        "unattributed": len(rep.unattributed),
        "lease_holders": {i: len({h for _, h in t}) for i, t in rep.tenures.items()},
        "violations": rep.violations,
    }


def _exit_dict(chaos: Chaos, e: Exit) -> dict[str, Any]:
    d = e.as_dict(chaos.chaos_started)  # seconds into the chaos window, like the kills
    if not e.killed_by_chaos:
        b = blame(chaos, e.at)
        d["after_kill_of"] = None if b is None else f"{b.kill.component} at {b.started - chaos.chaos_started:.1f}s"
    return d


async def _event_reasons(api: client.ApiClient) -> dict[str, int]:
    """Reasons of the Events canaryd posted on the routes (the rollouts' story, as users see it)."""
    try:
        evs = await client.CoreV1Api(api).list_namespaced_event(NAMESPACE, _request_timeout=10)
    except Exception as exc:
        return {f"unreadable: {type(exc).__name__}": 1}
    return dict(Counter(f"{e.type} {e.reason}" for e in evs.items).most_common())


def _count_in_flight(chaos: Chaos, collector: HistoryCollector) -> None:
    """For each kill: how many routes had been created and were not terminal yet (by their final state's time)."""
    done_at: dict[str, float] = {}
    for name in chaos.created:
        h = collector.keys.get(route_key(NAMESPACE, name))
        revs = h.ordered() if h else []
        st, _ = state_of(revs[-1].obj) if revs else (None, None)
        ts = parse_ts(st.updated_at) if st is not None and st.phase.value in TERMINAL else None
        done_at[name] = ts.timestamp() if ts else float("inf")
    for k in chaos.kills:
        k.in_flight = sum(1 for n, c in chaos.created.items() if c <= k.wall < done_at[n])


def blame(chaos: Chaos, at: float) -> KillRecord | None:
    """The kill a daemon's own exit at ``at`` follows from: the latest outage it falls in or shortly
    after, of the apiserver or etcd first (the Lease lives there), then Prometheus, then a daemon."""

    def covers(k: KillRecord) -> bool:
        return k.started <= at <= (k.restarted or at) + EXIT_BLAME_S

    for tier in (("kube-apiserver", "etcd"), ("prometheus",), ("daemon",)):
        pool = [k for k in chaos.kills if k.kill.component in tier and covers(k)]
        if pool:
            return max(pool, key=lambda k: k.started)
    return None


def _survival(chaos: Chaos) -> dict[str, dict[str, int]]:
    """Per component: kills, and kills survived (restarted, and no daemon exit blamed on it)."""
    out = {c: {"kills": 0, "survived": 0} for c in COMPONENTS}
    blamed = {id(b) for e in chaos.exits if not e.killed_by_chaos for b in [blame(chaos, e.at)] if b is not None}
    for k in chaos.kills:
        c = out[k.kill.component]
        c["kills"] += 1
        if k.ok and id(k) not in blamed:
            c["survived"] += 1
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: C901 - one straight script with a finally
    t0 = time.monotonic()
    budget_end = t0 + args.budget
    plan = make_plan(routes=args.routes, seed=args.seed, kills=args.kills, window_s=args.window)
    work = Path(tempfile.mkdtemp(prefix="canaryd-chaos-"))
    result: dict[str, Any] = {
        "command": " ".join(["python", "-m", "devkit.chaos.run", *sys.argv[1:]]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "seed": args.seed,
        "routes": args.routes,
        "window_s": args.window,
        "work_dir": str(work),
        "route_kinds": dict(Counter(s.kind for s in plan.routes)),
        "plan": [{"at_s": k.at, "component": k.component, "down_s": k.down_s, "target": k.target} for k in plan.kills],
    }
    log(t0, f"work dir {work}; {len(plan.routes)} routes {result['route_kinds']}; {len(plan.kills)} kills")
    prom = StickyPrometheus(work / "prometheus")
    exporter = MetricsExporter()
    info: StackInfo | None = None
    api: client.ApiClient | None = None
    replicas: list[Replica] = []
    stop_editor, stop_monitor, stop_collector = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    violations: list[Violation] = []
    finished = False
    try:
        info = await asyncio.to_thread(controlplane.start_control_plane, work / "stack")
        await asyncio.to_thread(prom.start)
        await exporter.start()
        prom.add_target(EXPORTER_JOB, exporter.address)
        api = await new_client(info.kubeconfig)
        await _setup_cluster(api, plan, exporter)
        for _ in range(120):
            if await asyncio.to_thread(prom.target_up, EXPORTER_JOB):
                break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("Prometheus never scraped the exporter")
        log(t0, f"control plane, Prometheus {prom.url} and {3 * len(plan.routes)} Services ready")
        replicas = [
            Replica(slot, info.kubeconfig, NAMESPACE, prom.url, work, lease_s=args.lease, shards=args.shards)
            for slot in (("a", "b") if args.shards == 1 else [str(i) for i in range(max(2, args.shards))])
        ]
        chaos = Chaos(plan, info, api, prom, replicas, t0, shards=args.shards)
        collector = HistoryCollector(EtcdReader(info.etcd_url))
        for name in lease_names(LEASE, args.shards):
            collector.track(lease_key(NAMESPACE, name))
        rng = random.Random(args.seed + 1)
        routes = {s.name: s for s in plan.routes}
        editor = Editor(api, NAMESPACE, routes, rng, rate_hz=args.edit_rate)

        upfront = [s for s in plan.routes if s.create_at == 0]
        later = sorted((s for s in plan.routes if s.create_at > 0), key=lambda s: s.create_at)
        for s in upfront:
            await chaos.create_route(s, budget_end)
            chaos.created[s.name] = time.time()
            collector.track(route_key(NAMESPACE, s.name))
        editor.available = [s.name for s in upfront]
        for r in replicas:
            r.start()
        chaos.chaos_started = time.monotonic()
        log(t0, f"{len(upfront)} routes created, {len(replicas)} replicas started; chaos window {args.window:g}s")

        async def creator() -> None:
            for s in later:
                delay = chaos.chaos_started + s.create_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if await chaos.create_route(s, budget_end):
                    chaos.created[s.name] = time.time()
                    collector.track(route_key(NAMESPACE, s.name))
                    editor.available.append(s.name)

        async def collect_loop() -> None:
            while not stop_collector.is_set():
                try:
                    await asyncio.to_thread(collector.collect)
                except EtcdError:
                    pass  # etcd is down: the next round reads what this one missed
                except Exception as exc:
                    log(t0, f"!! etcd history read failed: {type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_collector.wait(), args.collect_every)

        tasks = [
            asyncio.create_task(chaos.monitor(stop_monitor), name="monitor"),
            asyncio.create_task(editor.run(stop_editor), name="editor"),
            asyncio.create_task(collect_loop(), name="collector"),
        ]
        kills_task = asyncio.create_task(chaos.run_kills(), name="kills")
        creator_task = asyncio.create_task(creator(), name="creator")
        await asyncio.gather(kills_task, creator_task)
        log(t0, "chaos over; waiting for every route to finish")

        settle_end = min(budget_end - 60, time.monotonic() + args.settle)
        phases: dict[str, str | None] = {}
        while time.monotonic() < settle_end:
            try:
                phases = await chaos.phases()
            except Exception:  # a slow apiserver after a restart: ask again
                await asyncio.sleep(2)
                continue
            done = sum(1 for p in phases.values() if p in TERMINAL)
            if done == len(plan.routes):
                break
            await asyncio.sleep(2)
        counts = Counter(p or "none" for p in phases.values())
        log(t0, f"phases {dict(counts)}")
        stop_editor.set()
        await asyncio.sleep(args.quiet)  # let canaryd answer the editor's last writes, if it would
        stop_monitor.set()
        stop_collector.set()
        await asyncio.gather(*tasks)
        for attempt in range(10):
            try:
                await asyncio.to_thread(collector.collect)
                break
            except EtcdError as exc:
                log(t0, f"final etcd read failed ({exc}); retry {attempt + 1}")
                await asyncio.sleep(2)
        final_rcs = {r.identity: await asyncio.to_thread(r.terminate) for r in replicas}
        violations, totals = _check(plan, collector, editor, chaos, final_rcs)
        _count_in_flight(chaos, collector)
        result.update(
            {
                "chaos_window_started_at_s": round(chaos.chaos_started - t0, 1),
                "kills": [k.as_dict(chaos.chaos_started) for k in chaos.kills],
                "kills_survived": _survival(chaos),
                "daemon_exits": [_exit_dict(chaos, e) for e in chaos.exits],
                "daemon_incarnations": {r.slot: r.incarnation for r in replicas},
                "daemon_restarts_after_crash": chaos.restarts_after_crash,
                "daemon_final_rc": final_rcs,
                "healthz": {"checks": chaos.healthz_checks, "failures": chaos.healthz_failures},
                "edits": {
                    "attempted": len(editor.attempts),
                    "by_kind": dict(editor.kinds),
                    "answers": dict(editor.outcomes),
                    "landed": totals["editor_revisions"],
                    "kept": totals["edits_kept"],
                    "clobbered": totals["edits_clobbered"],
                    "get_errors": editor.get_errors,
                },
                "revisions_checked": totals["revisions_checked"],
                "canaryd_revisions": totals["canaryd_revisions"],
                "shards": totals["shards"],
                "etcd": {
                    "reads": collector.reader.requests,
                    "rounds": collector.rounds,
                    "failed_rounds": collector.failed_rounds,
                },
                "final_phases": totals["final_phases"],
                "root_task_ended_lines": totals["root_task_ended_lines"],
                "daemon_log_warnings": totals["log_warnings"],
                "route_events_by_reason": await _event_reasons(api),
                "per_route": totals["routes"],
            }
        )
        finished = True
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in replicas:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(r.terminate, 10.0)
        if api is not None:
            await api.close()
        await exporter.stop()
        prom.stop()
        controlplane.stop_stack(work / "stack")
        result["seconds"] = round(time.monotonic() - t0, 1)
        result["violations"] = [v.as_dict() for v in violations]
        if finished and not violations and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            result["work_dir"] = None
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"chaos: {result.get('routes')} routes, seed {result.get('seed')}, {result.get('seconds')}s wall"]
    for c, v in (result.get("kills_survived") or {}).items():
        lines.append(f"  kills {c:15s} {v['survived']}/{v['kills']} survived")
    for k in result.get("kills") or []:
        lines.append(
            f"    at {k['killed_at_s']:6.1f}s {k['component']:15s} down {k['down_s']}s, back after "
            f"{k['back_after_s']}s, {k['rollouts_in_flight']} rollouts in flight  {k['target']}"
        )
    e = result.get("edits") or {}
    lines.append(
        f"  edits attempted {e.get('attempted')}, landed {e.get('landed')}, kept {e.get('kept')}, "
        f"clobbered {e.get('clobbered')} (answers {e.get('answers')})"
    )
    checked, by_canaryd = result.get("revisions_checked"), result.get("canaryd_revisions")
    lines.append(f"  revisions checked {checked} (canaryd wrote {by_canaryd})")
    if sh := result.get("shards"):
        lines.append(
            f"  shards {sh['shards']}: {sh['writes_checked']} canaryd writes checked against the shard Leases, "
            f"{sh['unattributed']} without a log line; holders per shard {sh['lease_holders']}"
        )
    lines.append(f"  final phases {result.get('final_phases')}")
    exits = [x for x in result.get("daemon_exits") or [] if not x["killed_by_chaos"]]
    lines.append(f"  daemon exits not caused by a kill: {len(exits)}; final SIGTERM rc {result.get('daemon_final_rc')}")
    vs = result.get("violations") or []
    lines.append(f"  violations: {len(vs)}")
    by_reason = Counter(v["reason"] for v in vs)
    for reason, n in by_reason.most_common():
        first = next(v for v in vs if v["reason"] == reason)
        lines.append(f"    {n:4d} {reason}: e.g. {first['route']}@{first['revision']}: {first['detail'][:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.chaos.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--routes", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kills", type=int, default=10, help="how many kills in the chaos window (default 10)")
    p.add_argument("--window", type=float, default=150.0, help="seconds of chaos (kills and late routes)")
    p.add_argument("--settle", type=float, default=150.0, help="most seconds to wait for every route to finish")
    p.add_argument("--budget", type=float, default=480.0, help="hard limit for the whole run (seconds)")
    p.add_argument("--lease", type=float, default=6.0, help="daemon lease duration (seconds)")
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="run the daemons with --shards N (max(2, N) replicas) and check each write against the shard Leases",
    )
    p.add_argument("--edit-rate", type=float, default=4.0, help="editor writes per second")
    p.add_argument("--collect-every", type=float, default=10.0, help="seconds between etcd history reads")
    p.add_argument("--quiet", type=float, default=4.0, help="seconds without edits before the final read")
    p.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) even without violations")
    args = p.parse_args(argv)
    if args.window + 60 > args.budget:
        p.error("--budget must leave at least 60 s beyond --window")

    loop = asyncio.new_event_loop()
    main_task = loop.create_task(asyncio.wait_for(run(args), timeout=args.budget + 120))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        result = loop.run_until_complete(main_task)
    except (asyncio.CancelledError, TimeoutError) as exc:
        print(f"chaos: aborted ({type(exc).__name__}); everything started was stopped", file=sys.stderr)
        return 2
    except Exception as exc:
        traceback.print_exc()
        print(f"chaos: the run itself failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    print(summary(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}" + (f"; logs in {result['work_dir']}" if result.get("work_dir") else ""), flush=True)
    return 1 if result.get("violations") else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
