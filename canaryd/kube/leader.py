"""Leader election on a coordination.k8s.io/v1 Lease, and one Lease per shard.

The holder renews every ``renew_s``; it considers itself leader only while its last successful
renewal is younger than ``renew_deadline`` (two thirds of the lease), so a partitioned leader
stops acting before anyone else may take over. Release on shutdown empties the holder so the
standby takes over at once.

With shards (``ShardElection``) every replica runs one ``LeaderElector`` per shard Lease: for its
own shard it competes as above and, when a stand-in holds it, asks for it back (the annotation
``canaryd.io/wanted-by`` on the Lease); for every other shard it is a *stand-in*: it takes that
Lease only after seeing it free or expired and unchanged for a while (longer the more shards it
holds already, so the least loaded replica takes a dead shard first), and hands it back when the
shard's own replica asks. Nothing here is a consensus of its own: every take-over is one
resourceVersion-guarded write of the Lease, judged by the observed-time rule below.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.core.shards import lease_name, preferred_shard, shard_of
from canaryd.kube.errors import translate

log = structlog.get_logger("canaryd.kube.leader")

WANTED_BY = "canaryd.io/wanted-by"
"""Annotation on a shard's Lease: the identity of the replica whose own shard it is, asking a stand-in for it."""


def _now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        name: str,
        namespace: str,
        identity: str,
        duration_s: float = 15.0,
        renew_s: float = 5.0,
        clock: Callable[[], datetime] = _now,
        on_change: Callable[[bool], None] | None = None,
        field_manager: str = "canaryd",
        claim: bool = False,
        stand_in: Callable[[], int] | None = None,
    ) -> None:
        """``claim``: this Lease is this replica's own shard; when a stand-in holds it, ask for it back.
        ``stand_in``: this Lease is another replica's shard; take it only once it has been free (absent,
        released, or expired) and unchanged for its duration plus ``stand_in()`` lease durations
        (``stand_in()`` = the shards this replica holds now), and hand it back when asked."""
        self._api = client.CoordinationV1Api(api)
        self.field_manager = field_manager
        self.name, self.namespace, self.identity = name, namespace, identity
        self.duration_s, self.renew_s = duration_s, renew_s
        self._renewed_at: float | None = None  # monotonic time of the last successful renewal
        # client-go's rule: a lease expires by OUR clock, counted from when we last saw its record change,
        # never by comparing the holder's renewTime with our wall clock (replicas' clocks may be skewed).
        self._observed: tuple[object, ...] | None = None
        self._observed_at = 0.0
        self._clock = clock  # only what we write into the Lease (acquire/renew times); never used to judge expiry
        self._on_change = on_change  # called with True when elected, False when the lease is lost
        self.claim, self.stand_in = claim, stand_in
        self._handed_back = False
        self._yielding_since: float | None = None  # monotonic time this stand-in stopped acting to hand back
        self.elected = asyncio.Event()
        self.lost = asyncio.Event()
        self.transitions = 0

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and time.monotonic() - self._renewed_at < self.duration_s * 2 / 3

    async def _try(self) -> bool:
        now = self._clock()
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return await self._create(now)
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        duration = spec.lease_duration_seconds or int(self.duration_s)
        meta = lease.metadata
        wanted_by = (meta.annotations or {}).get(WANTED_BY)
        self._observe((holder, spec.renew_time, spec.acquire_time, duration, meta.resource_version))
        if holder == self.identity:
            if self.stand_in is not None and wanted_by and wanted_by != self.identity:
                await self._hand_back(lease, wanted_by)
                return False
            return await self._take(lease, now)
        wait = self._patience(free=not holder, duration=duration, asked=bool(wanted_by) and wanted_by != self.identity)
        if wait > 0 and time.monotonic() - self._observed_at <= wait:
            if self.claim and holder and not wanted_by:
                await self._ask_back(lease)
            return False
        return await self._take(lease, now)

    def _observe(self, record: tuple[object, ...]) -> None:
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()

    def _patience(self, *, free: bool, duration: float, asked: bool) -> float:
        """Seconds the Lease must stay unchanged before this replica takes it: a held one until it expires,
        a free one at once. A stand-in adds a lease duration per shard it holds already, and first waits
        the Lease's duration even when it is free if another replica asked for it (or, absent, its own
        replica may still be starting)."""
        if self.stand_in is None:
            return 0.0 if free else duration
        base = 0.0 if free and not asked else duration
        return base + self.stand_in() * self.duration_s

    async def _create(self, now: datetime) -> bool:
        if self.stand_in is not None:  # absent: the shard's own replica may be starting; give it the chance
            self._observe(("absent",))
            wait = self._patience(free=False, duration=self.duration_s, asked=False)
            if time.monotonic() - self._observed_at <= wait:
                return False
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=int(self.duration_s),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            await self._api.create_namespaced_lease(self.namespace, body, field_manager=self.field_manager)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    async def _take(self, lease: client.V1Lease, now: datetime) -> bool:
        """Renew our Lease, or take a free or expired one (clearing a request to hand it back)."""
        spec = lease.spec or client.V1LeaseSpec()
        if spec.holder_identity != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
            (lease.metadata.annotations or {}).pop(WANTED_BY, None)
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self.duration_s)
        lease.spec = spec
        self._yielding_since = None
        return await self._replace(lease)

    async def _replace(self, lease: client.V1Lease) -> bool:
        try:  # replace carries resourceVersion: a concurrent taker makes this a 409
            await self._api.replace_namespaced_lease(self.name, self.namespace, lease, field_manager=self.field_manager)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    async def _ask_back(self, lease: client.V1Lease) -> None:
        """Our own shard is held by someone else: ask for it (the holder hands it back if it is a stand-in)."""
        lease.metadata.annotations = {**(lease.metadata.annotations or {}), WANTED_BY: self.identity}
        if await self._replace(lease):
            log.info("lease_asked_back", identity=self.identity, lease=f"{self.namespace}/{self.name}")

    async def _hand_back(self, lease: client.V1Lease, to: str) -> None:
        """A stand-in gives the shard back to its own replica: it stops acting at once, and empties the holder
        a third of a lease later — the margin an expiry gives (acting stops at 2/3 of the lease, a take-over
        waits the whole lease), so a patch it sent just before is applied before the other replica takes over.
        The request stays on the Lease, so other stand-ins leave it to the replica that asked."""
        now = time.monotonic()
        if self._yielding_since is None:
            self._renewed_at = None
            self._handed_back = True
            self._yielding_since = now
            return
        if now - self._yielding_since >= self.duration_s / 3 and await self._replace(_vacated(lease)):
            self._yielding_since = None
            log.info("lease_handed_back", identity=self.identity, lease=f"{self.namespace}/{self.name}", to=to)

    async def run(self) -> None:
        """Acquire, then renew, until cancelled. Losing the lease (e.g. the apiserver was away for longer than
        the renew deadline) is not an end: this replica stops acting (``is_leader`` is False, ``lost`` is set)
        and competes again, so an outage never makes the process exit."""
        failing = False
        while True:
            t0 = time.monotonic()
            try:
                ok = await asyncio.wait_for(self._try(), timeout=self.renew_s)
                if failing:
                    log.info("lease_renew_recovered", identity=self.identity)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # apiserver restarts, dropped connections: never end the elector
                if not failing:  # once per outage, not once per attempt
                    err = str(translate(exc, f"lease {self.namespace}/{self.name}"))
                    log.warning("lease_renew_failed", error=err)
                failing = True
                ok = False
            if ok:
                self._renewed_at = t0
                if not self.elected.is_set():
                    self.transitions += 1
                    self.lost.clear()
                    log.info("leader_elected", identity=self.identity, lease=f"{self.namespace}/{self.name}")
                    self.elected.set()
                    self._notify(True)
            elif self.elected.is_set() and not self.is_leader:
                if not self._handed_back:
                    log.error("leader_lost", identity=self.identity, action="standing by, competing again")
                self._handed_back = False
                self.elected.clear()
                self.lost.set()
                self._notify(False)
            await asyncio.sleep(self.renew_s if self.elected.is_set() else self.renew_s / 2)

    def _notify(self, leading: bool) -> None:
        if self._on_change is not None:
            self._on_change(leading)

    async def release(self) -> None:
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                await self._api.replace_namespaced_lease(
                    self.name, self.namespace, _vacated(lease), field_manager=self.field_manager
                )
                log.info("leader_released", identity=self.identity, lease=f"{self.namespace}/{self.name}")
        except Exception as exc:
            log.warning("lease_release_failed", error=str(translate(exc, "release lease")))


def _vacated(lease: client.V1Lease) -> client.V1Lease:
    """The Lease with no holder: free for the next taker at once."""
    spec = lease.spec or client.V1LeaseSpec()
    spec.holder_identity = None  # type: ignore[assignment]
    spec.renew_time = None  # type: ignore[assignment]
    spec.acquire_time = None  # type: ignore[assignment]
    spec.lease_duration_seconds = 1
    lease.spec = spec
    return lease


class ShardElection:
    """One Lease per shard (``canaryd.core.shards``): this replica's own shard (``preferred_shard`` of its
    identity) and, as a stand-in, any other whose Lease is free or expired. It may hold every shard (the
    others dead); a stand-in hands a shard back when its own replica asks. With one shard this is the
    plain leader election on ``base_name``."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        base_name: str,
        namespace: str,
        identity: str,
        shards: int,
        duration_s: float = 15.0,
        renew_s: float = 5.0,
        on_change: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.shards = shards
        self.preferred = preferred_shard(identity, shards)
        self._on_change = on_change
        self.electors = [
            LeaderElector(
                api,
                name=lease_name(base_name, i, shards),
                namespace=namespace,
                identity=identity,
                duration_s=duration_s,
                renew_s=renew_s,
                on_change=functools.partial(self._changed, i),
                claim=shards > 1 and i == self.preferred,
                stand_in=None if i == self.preferred else self._held_count,
            )
            for i in range(shards)
        ]
        self.elected = asyncio.Event()  # set once this replica first holds a shard

    def owns_shard(self, shard: int) -> bool:
        return self.electors[shard].is_leader

    def owns(self, namespace: str, name: str) -> bool:
        """Whether this replica may write the route now (checked right before every write)."""
        return self.owns_shard(shard_of(namespace, name, self.shards))

    def held(self) -> list[int]:
        return [i for i, e in enumerate(self.electors) if e.is_leader]

    def _held_count(self) -> int:
        return len(self.held())

    def _changed(self, shard: int, leading: bool) -> None:
        if leading:
            self.elected.set()
        if self._on_change is not None:
            self._on_change(shard, leading)

    async def run(self) -> None:
        """Every shard's elector, until cancelled (an elector never ends by itself)."""
        async with asyncio.TaskGroup() as tg:  # one failing (a bug) cancels the rest and ends the root task
            for e in self.electors:
                tg.create_task(e.run(), name=f"lease {e.name}")

    async def release(self) -> None:
        await asyncio.gather(*(e.release() for e in self.electors))
