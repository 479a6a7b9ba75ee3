"""Leader election on a coordination.k8s.io/v1 Lease.

The holder renews every ``renew_s``; it considers itself leader only while its last successful
renewal is younger than ``renew_deadline`` (two thirds of the lease), so a partitioned leader
stops acting before anyone else may take over. Release on shutdown empties the holder so the
standby takes over at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.kube import translate

log = structlog.get_logger("canaryd.leader")


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
    ) -> None:
        self._api = client.CoordinationV1Api(api)
        self.name, self.namespace, self.identity = name, namespace, identity
        self.duration_s, self.renew_s = duration_s, renew_s
        self._renewed_at: float | None = None  # monotonic time of the last successful renewal
        self.elected = asyncio.Event()
        self.lost = asyncio.Event()
        self.transitions = 0

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and time.monotonic() - self._renewed_at < self.duration_s * 2 / 3

    async def _try(self) -> bool:
        now = _now()
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
                await self._api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        renew = spec.renew_time
        duration = spec.lease_duration_seconds or int(self.duration_s)
        expired = renew is None or renew + timedelta(seconds=duration) < now
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
            await self._api.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    async def run(self) -> None:
        """Acquire, then renew until cancelled or the lease is lost (sets ``lost``)."""
        while True:
            t0 = time.monotonic()
            try:
                ok = await asyncio.wait_for(self._try(), timeout=self.renew_s)
            except (TimeoutError, ApiException, OSError) as exc:
                log.warning("lease_renew_failed", error=str(translate(exc, f"lease {self.namespace}/{self.name}")))
                ok = False
            if ok:
                self._renewed_at = t0
                if not self.elected.is_set():
                    self.transitions += 1
                    log.info("leader_elected", identity=self.identity, lease=f"{self.namespace}/{self.name}")
                    self.elected.set()
            elif self.elected.is_set() and not self.is_leader:
                log.error("leader_lost", identity=self.identity)
                self.lost.set()
                return
            await asyncio.sleep(self.renew_s if self.elected.is_set() else self.renew_s / 2)

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
                await self._api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("leader_released", identity=self.identity)
        except (ApiException, OSError) as exc:
            log.warning("lease_release_failed", error=str(translate(exc, "release lease")))
