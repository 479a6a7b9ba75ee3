"""Every write the apiserver accepted or refused, from its own audit log, by who sent it.

The bench against Flagger counts writes where nothing can be missed or guessed: the apiserver
writes one audit line per write request (``create``, ``update``, ``patch``, ``delete``,
``deletecollection``; level Metadata, no bodies), naming the verb, the object (resource,
subresource, namespace, name), the HTTP code and the client's User-Agent. The actor is the
User-Agent's product token: ``canaryd``, ``flagger``, ``kube-controller-manager`` (with the
controller's name it appends, e.g. ``deployment-controller``), ``kube-scheduler``, ``kwok``, and
the bench itself (``canaryd-bench``).

The devstack starts the apiserver without auditing; ``enable_audit`` restarts it once with the
same command line plus the audit flags, before anything is measured.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from devkit import DevstackError
from devkit.devstack import controlplane
from devkit.devstack.controlplane import StackInfo

BENCH_AGENT = "canaryd-bench/vs-flagger"
CLUSTER_ACTORS = ("kube-controller-manager", "kube-scheduler", "kwok")
POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
"""


def enable_audit(info: StackInfo) -> Path:
    """Restart the stack's apiserver with a write-only audit log; returns the log's path."""
    d = Path(info.dir)
    policy, log = d / "audit-policy.yaml", d / "audit.log"
    policy.write_text(POLICY)
    controlplane.kill(info, "kube-apiserver", signal.SIGKILL)
    argv = [a for a in info.argv["kube-apiserver"] if not a.startswith("--audit-")]
    # Without a size the log rotates at 100 MB (a 1,000-rollout run writes ~250 MB): never rotate.
    flags = [f"--audit-policy-file={policy}", f"--audit-log-path={log}", "--audit-log-maxsize=1000000"]
    info.argv["kube-apiserver"] = [*argv, *flags]
    # The old process's connections can hold its port for a few seconds after the kill.
    for attempt in range(30):
        try:
            controlplane.restart(info, "kube-apiserver")
            return log
        except DevstackError as exc:
            if "address already in use" not in str(exc) or attempt == 29:
                raise
            time.sleep(1)
    return log


@dataclass(frozen=True)
class Write:
    at: float  # when the apiserver answered (epoch seconds)
    actor: str  # User-Agent product token
    component: str  # actor, with kube-controller-manager's controller name
    verb: str
    resource: str  # resource[/subresource]
    namespace: str
    name: str
    code: int


def actor_of(agent: str) -> tuple[str, str]:
    """(actor, component) from a User-Agent such as
    ``kube-controller-manager/v1.36.3 (linux/amd64) kubernetes/abc/deployment-controller``."""
    actor = agent.split("/", 1)[0].strip() or "unknown"
    if actor == "kube-controller-manager" and " " in agent:
        return actor, f"{actor}/{agent.rsplit('/', 1)[-1]}"
    return actor, actor


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def parse(line: str) -> Write | None:
    try:
        ev: dict[str, Any] = json.loads(line)
    except ValueError:
        return None  # a line cut while being written: read again later
    ref = ev.get("objectRef") or {}
    resource = ref.get("resource", "")
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    actor, component = actor_of(ev.get("userAgent", ""))
    return Write(
        at=_epoch(ev.get("stageTimestamp") or ev["requestReceivedTimestamp"]),
        actor=actor,
        component=component,
        verb=ev.get("verb", ""),
        resource=resource,
        namespace=ref.get("namespace", ""),
        name=ref.get("name", ""),
        code=int((ev.get("responseStatus") or {}).get("code", 0)),
    )


class AuditLog:
    """Reads the audit log incrementally (``read`` as often as needed; complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes: list[Write] = []
        self._offset = 0

    def read(self) -> list[Write]:
        if not self.path.exists():
            return self.writes
        with self.path.open("rb") as f:
            if f.seek(0, 2) < self._offset:
                raise RuntimeError(f"{self.path} shrank: rotated or truncated, writes would be missed")
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            w = parse(line)
            if w is not None:
                self.writes.append(w)
        return self.writes

    def between(self, namespace: str, t0: float, t1: float) -> list[Write]:
        return [w for w in self.read() if w.namespace == namespace and t0 <= w.at < t1]


def tally(writes: Iterable[Write]) -> dict[str, Any]:
    """Writes grouped by actor: accepted (HTTP < 400) and refused (with their codes), and the accepted
    ones by ``verb resource`` and by component."""
    out: dict[str, Any] = {}
    for w in writes:
        a = out.setdefault(w.actor, {"accepted": 0, "refused": 0, "refused_codes": Counter(), "by_kind": Counter()})
        if 0 < w.code < 400:
            a["accepted"] += 1
            a["by_kind"][f"{w.verb} {w.resource}"] += 1
            if w.component != w.actor:
                a.setdefault("by_component", Counter())[w.component] += 1
        else:
            a["refused"] += 1
            a["refused_codes"][str(w.code)] += 1
    return {k: {f: dict(v) if isinstance(v, Counter) else v for f, v in a.items()} for k, a in sorted(out.items())}


def accepted(t: dict[str, Any], actors: Iterable[str]) -> int:
    return sum(int(t.get(a, {}).get("accepted", 0)) for a in actors)
