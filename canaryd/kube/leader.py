"""Leader election on a coordination.k8s.io/v1 Lease.

The holder renews every ``renew_s``; it considers itself leader only while its last successful
renewal is younger than ``renew_deadline`` (two thirds of the lease), so a partitioned leader
stops acting before anyone else may take over. Release on shutdown empties the holder so the
standby takes over at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.kube.errors import translate

log = structlog.get_logger("canaryd.kube.leader")


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
    ) -> None:
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
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        duration = spec.lease_duration_seconds or int(self.duration_s)
        record = (holder, spec.renew_time, spec.acquire_time, duration, lease.metadata.resource_version)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        expired = time.monotonic() - self._observed_at > duration
        if holder and holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self.duration_s)
        lease.spec = spec
        try:  # replace carries resourceVersion: a concurrent taker makes this a 409
            await self._api.replace_namespaced_lease(self.name, self.namespace, lease, field_manager=self.field_manager)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

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
                log.error("leader_lost", identity=self.identity, action="standing by, competing again")
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
                lease.spec.holder_identity = None  # type: ignore[assignment]
                lease.spec.renew_time = None  # type: ignore[assignment]
                lease.spec.acquire_time = None  # type: ignore[assignment]
                lease.spec.lease_duration_seconds = 1
                await self._api.replace_namespaced_lease(
                    self.name, self.namespace, lease, field_manager=self.field_manager
                )
                log.info("leader_released", identity=self.identity)
        except Exception as exc:
            log.warning("lease_release_failed", error=str(translate(exc, "release lease")))
