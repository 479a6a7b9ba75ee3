"""Every stored revision of an HTTPRoute, read from etcd itself (not through the apiserver, not a watch).

etcd keeps each modification of a key until compaction; its JSON gRPC gateway (``POST /v3/kv/range``
with a ``revision``) reads the key as it was at any revision. Walking back from the newest
``mod_revision`` by reading at ``mod_revision - 1`` visits every version down to the creation.

The apiserver compacts etcd every 5 minutes by default, so ``HistoryCollector`` reads incrementally:
each ``collect`` walks back only to the newest revision it already holds, and a revision that was
compacted before it was read is reported as a gap (never silently skipped). Loopback only.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

ROUTE_PREFIX = "/registry/gateway.networking.k8s.io/httproutes"


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
            obj=json.loads(value),
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
