"""Shards on Leases: three ``canaryd run --shards 3`` processes against the real apiserver and etcd.

Each route is driven only by the holder of its shard's Lease; a SIGKILLed replica's shard is taken
over once its Lease expired and its rollouts finish; back again, the replica asks for its shard and
the stand-in hands it over. The proof is etcd's own history: every revision of every route, every
revision of every shard Lease (one total order), and the daemons' ``route_patched`` lines naming the
revision each wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.shards import lease_name, shard_of
from canaryd.core.state import Phase
from devkit.chaos.etcd_history import EtcdError, EtcdReader, HistoryCollector, lease_key, route_key
from devkit.chaos.invariants import Expectation, check_route, check_shard_writes, state_of
from tests.conftest import Stack
from tests.daemons import Daemon
from tests.kubeobjects import create_backend, create_route, eventually, get_route, route_body

SHARDS = 3
LEASE_S = 3  # renew every 1 s (tests/daemons.py); a stand-in holding one shard takes a dead one after 3 + 3 s
BASE = "canaryd-leader"
STEPS = "20,40,60,80"


def _routes(namespace: str, per_shard: int = 2) -> dict[str, int]:
    """Route names, ``per_shard`` of each shard (the hash decides; we only pick names)."""
    out: dict[str, int] = {}
    i = 0
    while len(out) < SHARDS * per_shard:
        name = f"r{i:02d}"
        s = shard_of(namespace, name, SHARDS)
        if sum(1 for v in out.values() if v == s) < per_shard:
            out[name] = s
        i += 1
    return out


async def _holder(api: client.ApiClient, namespace: str, shard: int) -> str | None:
    coord = client.CoordinationV1Api(api)
    try:
        lease = await coord.read_namespaced_lease(lease_name(BASE, shard, SHARDS), namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return lease.spec.holder_identity if lease.spec else None


async def _collect(collector: HistoryCollector, stop: asyncio.Event) -> None:
    """Read etcd while the test runs: the apiserver compacts every 5 minutes, history must be read first."""
    while not stop.is_set():
        with contextlib.suppress(EtcdError):
            await asyncio.to_thread(collector.collect)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _daemon(stack: Stack, namespace: str, i: int, tmp: Path) -> Daemon:
    return Daemon(stack, namespace, f"shard-{i}", tmp, lease_s=LEASE_S, env={"CANARYD_SHARDS": str(SHARDS)})


async def test_each_route_is_driven_by_its_shards_holder_through_a_failover(  # noqa: C901 - one scenario
    stack: Stack, api: client.ApiClient, namespace: str, daemons: list[Daemon], tmp_path: Path
) -> None:
    for b in ("whoami", "whoami-v1", "whoami-v2"):  # every route splits the same pair: shards share backends
        await create_backend(api, namespace, b)
    routes = _routes(namespace)
    collector = HistoryCollector(EtcdReader(stack.info.etcd_url))
    for s in range(SHARDS):
        collector.track(lease_key(namespace, lease_name(BASE, s, SHARDS)))
    stop = asyncio.Event()
    collecting = asyncio.create_task(_collect(collector, stop))
    try:
        daemons += [_daemon(stack, namespace, i, tmp_path) for i in range(SHARDS)]

        async def own_shards_held() -> bool:
            return all([await _holder(api, namespace, s) == f"shard-{s}" for s in range(SHARDS)])

        await eventually(own_shards_held, timeout=60, what="each replica holding its own shard")
        a = {ann.CANARY: "whoami-v2", ann.STEPS: STEPS, ann.INTERVAL: "2s"}
        for name in routes:
            await create_route(api, namespace, route_body(name, annotations=a))
            collector.track(route_key(namespace, name))
        victim, victim_shard = daemons[1], 1
        doomed = [n for n, s in routes.items() if s == victim_shard]

        async def victims_routes_stepped() -> bool:
            sts = [state_of(await get_route(api, namespace, n))[0] for n in doomed]
            return all(st is not None and st.step >= 1 for st in sts)

        await eventually(victims_routes_stepped, timeout=60, what=f"shard {victim_shard}'s routes at step 2")
        await asyncio.sleep(0.3)  # the step's route_patched lines are written (the next step is 2 s away)
        victim.stop(signal.SIGKILL)

        async def taken_over() -> str | None:
            h = await _holder(api, namespace, victim_shard)
            return h if h not in (None, victim.identity) else None

        taker = await eventually(taken_over, timeout=60, what=f"shard {victim_shard} taken over")

        async def all_promoted() -> bool:
            sts = [state_of(await get_route(api, namespace, n))[0] for n in routes]
            return all(st is not None and st.phase == Phase.PROMOTED for st in sts)

        await eventually(all_promoted, timeout=90, what="every rollout promoted")

        # Back again (a pod with its old name): it asks for its shard, the stand-in hands it back.
        back = _daemon(stack, namespace, victim_shard, tmp_path)
        daemons.append(back)

        async def handed_back() -> bool:
            return await _holder(api, namespace, victim_shard) == back.identity

        await eventually(handed_back, timeout=60, what=f"shard {victim_shard} handed back to {back.identity}")
        await asyncio.sleep(1.5)  # one more renewal of every Lease into the history
    finally:
        stop.set()
        await collecting
    await asyncio.to_thread(collector.collect)

    written_by: dict[int, str] = {}
    for d in {d.log_path: d for d in daemons}.values():  # the replica back again appends to its old log
        for p in d.patches():
            rv = int(p["resource_version"])
            assert rv not in written_by, f"revision {rv} claimed by {written_by[rv]} and {d.identity}"
            written_by[rv] = d.identity
    assert not any(h.gaps for h in collector.keys.values()), [h.gaps for h in collector.keys.values()]

    def revs(key: str) -> list[tuple[int, dict[str, Any]]]:
        h = collector.keys[key]
        assert h.complete_down_to_creation, f"{key}: history incomplete"
        return [(r.mod_revision, r.obj) for r in h.ordered()]

    leases = {s: revs(lease_key(namespace, lease_name(BASE, s, SHARDS))) for s in range(SHARDS)}
    route_revs = {n: (s, revs(route_key(namespace, n))) for n, s in routes.items()}
    report = check_shard_writes(route_revs, leases, written_by)
    assert not report.violations, [v.as_dict() for v in report.violations]
    assert not report.unattributed, f"revisions no replica logged: {report.unattributed}"
    assert report.writes == len(routes) * len(STEPS.split(",")) + len(routes)  # 4 steps + the promotion each

    for n, s in routes.items():
        chain = report.writers[n]
        if s == victim_shard:
            assert chain[0] == victim.identity and chain[-1] == taker and len(chain) == 2, (n, chain)
        else:
            assert chain == [f"shard-{s}"], (n, chain)
        exp = Expectation(n, "whoami-v1", "whoami-v2", Phase.PROMOTED, (Phase.ROLLED_BACK, Phase.FAILED, Phase.PAUSED))
        checked = check_route(exp, route_revs[n][1], [])
        assert not checked.violations, [v.as_dict() for v in checked.violations]

    # The shard's Lease as etcd holds it: the victim until the take-over, the taker, then the victim again.
    holders = [h for _rev, h in report.tenures[victim_shard]]
    changes = [h for i, h in enumerate(holders) if i == 0 or h != holders[i - 1]]
    assert changes[0] == victim.identity and taker in changes and changes[-1] == back.identity, changes
    assert any(e.get("event") == "lease_handed_back" for d in daemons for e in d.events())
    for d in (daemons[0], daemons[2], back):
        assert d.stop(signal.SIGTERM) == 0, d.log_path
