"""Every stored revision of an HTTPRoute, read from etcd itself (not through the apiserver, not a watch).

etcd keeps each modification of a key until compaction; its JSON gRPC gateway (``POST /v3/kv/range``
with a ``revision``) reads the key as it was at any revision. Walking back from the newest
``mod_revision`` by reading at ``mod_revision - 1`` visits every version down to the creation.

The apiserver compacts etcd every 5 minutes by default, so ``HistoryCollector`` reads incrementally:
each ``collect`` walks back only to the newest revision it already holds, and a revision that was
compacted before it was read is reported as a gap (never silently skipped). Loopback only.

HTTPRoutes (a CRD) are stored as JSON. Built-in kinds are stored as Kubernetes protobuf (``k8s\\x00``,
a ``runtime.Unknown`` around the object); ``decode_stored`` reads the one built-in kind the shard
proof needs, the ``coordination.k8s.io/v1`` Lease (holder, times, annotations), with a few lines of
protobuf wire format — field numbers from k8s.io/api's ``generated.proto``.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ROUTE_PREFIX = "/registry/gateway.networking.k8s.io/httproutes"
LEASE_PREFIX = "/registry/leases"
K8S_PROTOBUF = b"k8s\x00"


class EtcdError(Exception):
    """etcd could not be read (down, or the revision was compacted)."""

    def __init__(self, message: str, *, compacted: bool = False) -> None:
        super().__init__(message)
        self.compacted = compacted


@dataclass(frozen=True)
class Revision:
    mod_revision: int
    create_revision: int
    version: int
    obj: dict[str, Any]


def route_key(namespace: str, name: str) -> str:
    return f"{ROUTE_PREFIX}/{namespace}/{name}"


def lease_key(namespace: str, name: str) -> str:
    return f"{LEASE_PREFIX}/{namespace}/{name}"


# --- Kubernetes protobuf, as much as a Lease needs ------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited as bytes."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} (field {number}) is not used by Kubernetes objects")
        yield number, value


def _message(buf: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = {}
    for number, value in _fields(buf):
        out.setdefault(number, []).append(value)
    return out


def _str(m: dict[int, list[int | bytes]], number: int) -> str | None:
    v = m.get(number)
    return v[-1].decode() if v and isinstance(v[-1], bytes) else None


def _int(m: dict[int, list[int | bytes]], number: int) -> int | None:
    v = m.get(number)
    return v[-1] if v and isinstance(v[-1], int) else None


def _micro_time(m: dict[int, list[int | bytes]], number: int) -> str | None:
    v = m.get(number)
    if not v or not isinstance(v[-1], bytes):
        return None
    t = _message(v[-1])
    at = datetime.fromtimestamp((_int(t, 1) or 0) + (_int(t, 2) or 0) / 1e9, UTC)
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _string_map(m: dict[int, list[int | bytes]], number: int) -> dict[str, str]:
    out = {}
    for entry in m.get(number, []):
        if isinstance(entry, bytes):
            kv = _message(entry)
            out[_str(kv, 1) or ""] = _str(kv, 2) or ""
    return out


def decode_lease(raw: bytes) -> dict[str, Any]:
    """A coordination.k8s.io/v1 Lease from its protobuf (Lease: 1 metadata, 2 spec; ObjectMeta: 1 name,
    3 namespace, 6 resourceVersion, 12 annotations; LeaseSpec: 1 holderIdentity, 2 leaseDurationSeconds,
    3 acquireTime, 4 renewTime, 5 leaseTransitions; MicroTime: 1 seconds, 2 nanos)."""
    lease = _message(raw)
    meta_raw, spec_raw = (lease.get(1) or [b""])[-1], (lease.get(2) or [b""])[-1]
    meta = _message(meta_raw) if isinstance(meta_raw, bytes) else {}
    spec = _message(spec_raw) if isinstance(spec_raw, bytes) else {}
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": _str(meta, 1),
            "namespace": _str(meta, 3),
            "annotations": _string_map(meta, 12),
        },
        "spec": {
            "holderIdentity": _str(spec, 1),
            "leaseDurationSeconds": _int(spec, 2),
            "acquireTime": _micro_time(spec, 3),
            "renewTime": _micro_time(spec, 4),
            "leaseTransitions": _int(spec, 5),
        },
    }


def decode_stored(value: bytes) -> dict[str, Any]:
    """An object as etcd holds it: JSON (CRDs such as HTTPRoute), or Kubernetes protobuf (a Lease)."""
    if not value.startswith(K8S_PROTOBUF):
        out: dict[str, Any] = json.loads(value)
        return out
    unknown = _message(value[len(K8S_PROTOBUF) :])  # runtime.Unknown: 1 typeMeta, 2 raw
    type_raw, raw = (unknown.get(1) or [b""])[-1], (unknown.get(2) or [b""])[-1]
    kind = _str(_message(type_raw), 2) if isinstance(type_raw, bytes) else None
    if kind != "Lease" or not isinstance(raw, bytes):
        raise EtcdError(f"stored {kind or 'object'} is protobuf; only a Lease is decoded here")
    return decode_lease(raw)


class EtcdReader:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise ValueError(f"etcd URL {url!r} is not on loopback")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.requests = 0

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                out: dict[str, Any] = json.load(r)
                return out
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            raise EtcdError(f"etcd {path}: HTTP {exc.code}: {text[:300]}", compacted="compacted" in text) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise EtcdError(f"etcd {path}: {exc}") from exc

    def get(self, key: str, revision: int | None = None) -> Revision | None:
        """The key as it was at ``revision`` (default: now); None when it did not exist then."""
        body: dict[str, Any] = {"key": base64.b64encode(key.encode()).decode()}
        if revision is not None:
            body["revision"] = str(revision)
        out = self._post("/v3/kv/range", body)
        if "error" in out or ("code" in out and "header" not in out):
            msg = str(out.get("error") or out.get("message"))
            raise EtcdError(f"etcd range {key}@{revision}: {msg}", compacted="compacted" in msg)
        kvs = out.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        value = base64.b64decode(kv.get("value", ""))
        return Revision(
            mod_revision=int(kv["mod_revision"]),
            create_revision=int(kv["create_revision"]),
            version=int(kv.get("version", 0)),
            obj=decode_stored(value),
        )


@dataclass
class KeyHistory:
    key: str
    revisions: dict[int, Revision] = field(default_factory=dict)  # mod_revision -> revision
    gaps: list[str] = field(default_factory=list)  # what could not be read (compacted)
    complete_down_to_creation: bool = False

    def ordered(self) -> list[Revision]:
        return [self.revisions[m] for m in sorted(self.revisions)]


class HistoryCollector:
    """Collects, incrementally, every revision of a set of keys."""

    def __init__(self, reader: EtcdReader) -> None:
        self.reader = reader
        self.keys: dict[str, KeyHistory] = {}
        self.rounds = 0
        self.failed_rounds = 0

    def track(self, key: str) -> None:
        self.keys.setdefault(key, KeyHistory(key))

    def collect_key(self, h: KeyHistory) -> int:
        """Read the revisions of one key not held yet; returns how many were added."""
        current = self.reader.get(h.key)
        if current is None:
            return 0
        added = 0
        rev = current
        while rev.mod_revision not in h.revisions:
            h.revisions[rev.mod_revision] = rev
            added += 1
            if rev.mod_revision == rev.create_revision:
                h.complete_down_to_creation = True
                break
            try:
                older = self.reader.get(h.key, rev.mod_revision - 1)
            except EtcdError as exc:
                if exc.compacted:
                    h.gaps.append(f"revisions of {h.key} before {rev.mod_revision} were compacted before being read")
                    break
                raise
            if older is None:  # cannot happen above the creation revision; say so rather than loop
                h.gaps.append(f"{h.key} missing at {rev.mod_revision - 1}, yet not created at {rev.mod_revision}")
                break
            rev = older
        return added

    def collect(self) -> int:
        """One pass over every tracked key; raises EtcdError when etcd is unreachable."""
        self.rounds += 1
        total = 0
        try:
            for h in list(self.keys.values()):  # a snapshot: track() may run meanwhile
                total += self.collect_key(h)
        except EtcdError:
            self.failed_rounds += 1
            raise
        return total
