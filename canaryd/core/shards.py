"""Shards: which replica's Lease drives which route (pure).

Owns: the shard of a route — a stable hash of ``namespace/name`` modulo the number of shards, the
same in every process, on every machine and in every release (SHA-256, never Python's salted
``hash()``); the name of each shard's Lease; the shard a replica prefers. Must not: do I/O —
``canaryd.kube.leader.ShardElection`` holds the Leases, ``canaryd.engine`` drives only the routes
of the shards held.

With one shard everything is as without sharding: shard 0, and the Lease keeps its plain name.
"""

from __future__ import annotations

import hashlib
import re

MAX_SHARDS = 64
"""More shards than this is a configuration mistake: each is a Lease renewed every few seconds."""

_ORDINAL = re.compile(r"-(\d+)$")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def check_shards(shards: int) -> int:
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be within 1..{MAX_SHARDS}, got {shards}")
    return shards


def shard_of(namespace: str, name: str, shards: int) -> int:
    """The shard that drives the route ``namespace/name``."""
    if check_shards(shards) == 1:
        return 0
    return _hash64(f"{namespace}/{name}") % shards


def lease_name(base: str, shard: int, shards: int) -> str:
    """The Lease of one shard: ``<base>-shard-<i>``; with one shard, ``<base>`` itself (as before shards)."""
    if not 0 <= shard < check_shards(shards):
        raise ValueError(f"shard {shard} outside 0..{shards - 1}")
    return base if shards == 1 else f"{base}-shard-{shard}"


def lease_names(base: str, shards: int) -> list[str]:
    return [lease_name(base, i, shards) for i in range(check_shards(shards))]


def preferred_shard(identity: str, shards: int) -> int:
    """The shard a replica campaigns for first: the ordinal its identity ends with (``canaryd-2``, as a
    StatefulSet names pods) modulo the shards, else a stable hash of the identity (a Deployment's random
    pod names: two replicas may then prefer the same shard; the other shards still find a holder)."""
    if check_shards(shards) == 1:
        return 0
    m = _ORDINAL.search(identity)
    return int(m.group(1)) % shards if m else _hash64(identity) % shards
