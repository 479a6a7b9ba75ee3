"""The chaos suite's invariants, checked over every stored revision of every route (pure: no I/O).

A route's revisions split into what canaryd manages and what belongs to everyone else:

- *managed*: the ``weight`` of the two backendRefs of the rollout (stable and canary) in the rules
  holding both, the annotations ``canaryd.io/state`` / ``canaryd.io/intent`` and the label
  ``canaryd.io/phase``;
- *foreign*: everything else (labels, other annotations, matches, filters, other backendRefs with
  their weights, the order of the backendRefs), minus what the apiserver itself maintains
  (resourceVersion, managedFields, generation, uid, creationTimestamp).

Each revision after the first was written either by the editor or by canaryd. The editor's patches
are guarded by a ``test`` of ``metadata.resourceVersion``, so an editor write attempted on top of
revision B can only ever be the revision right after B: a revision is the editor's exactly when an
attempt based on its predecessor intended its foreign part. Every other revision is canaryd's, and
canaryd may change only managed fields.

Invariants (each violation names the route, the revision and the reason):

1. ``state_unparseable``: ``canaryd.io/state`` parses (``RolloutState.from_annotation``) wherever present;
2. ``foreign_changed``: a canaryd revision leaves the foreign part exactly as its predecessor held it;
3. ``editor_changed_managed``: an editor revision leaves the managed part alone (a harness self-check);
4. ``weight_decreased`` / ``step_repeated`` / ``changed_after_rollback``: the canary's weight never
   decreases within the rollout except the rollback to 0, no weight value is written in two separate
   stretches, nothing moves after the rollback;
5. ``state_weight_mismatch``: the state's ``canary_weight`` equals the weights the same revision holds;
6. ``unexpected_phase`` / ``final_phase``: a healthy canary never reaches RolledBack/Failed/Paused, a
   bad one is never Promoted, and each route ends in the phase its scenario expects;
7. ``final_foreign``: the final foreign part is exactly what the editor last wrote (or what was
   created, if no edit of that route landed).

With shards (``check_shard_writes``), one more, over the shard Leases' revisions as well:

8. ``write_outside_tenure``: the replica that wrote a route revision (its ``route_patched`` line names
   the ``resource_version``) was the holder etcd recorded for the route's shard Lease at that revision.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from canaryd.core import spec as ann
from canaryd.core.errors import StateError
from canaryd.core.state import Phase, RolloutState

SERVER_OWNED_METADATA = ("resourceVersion", "managedFields", "generation", "uid", "creationTimestamp", "selfLink")
MANAGED_ANNOTATIONS = (ann.STATE, ann.INTENT)
MANAGED_LABELS = (ann.PHASE_LABEL,)


@dataclass(frozen=True)
class Violation:
    route: str
    revision: int | None
    reason: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"route": self.route, "revision": self.revision, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class EditAttempt:
    """One write the editor sent: based on ``base_rv``, intending ``intended`` as the foreign part."""

    route: str
    base_rv: int
    intended: dict[str, Any]
    what: str
    outcome: str  # applied | conflict | error | uncertain
    result_rv: int | None = None  # the resourceVersion the apiserver answered with (applied)


@dataclass(frozen=True)
class Expectation:
    route: str
    stable: str
    canary: str
    final_phase: Phase
    forbidden_phases: tuple[Phase, ...]


@dataclass
class RouteReport:
    route: str
    revisions: int = 0
    editor_revisions: int = 0
    canaryd_revisions: int = 0
    edits_kept: int = 0
    edits_clobbered: int = 0
    weights: list[int | None] = field(default_factory=list)  # one value per stretch
    phases: list[str] = field(default_factory=list)  # distinct phases in order
    final_phase: str | None = None
    violations: list[Violation] = field(default_factory=list)


# --- projections -------------------------------------------------------------------------------
def split(obj: Mapping[str, Any], stable: str, canary: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(foreign, managed) parts of one stored route."""
    foreign = copy.deepcopy(dict(obj))
    meta = foreign.setdefault("metadata", {})
    for k in SERVER_OWNED_METADATA:
        meta.pop(k, None)
    annotations = dict(meta.get("annotations") or {})
    managed: dict[str, Any] = {"annotations": {k: annotations.pop(k) for k in MANAGED_ANNOTATIONS if k in annotations}}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    labels = dict(meta.get("labels") or {})
    managed["labels"] = {k: labels.pop(k) for k in MANAGED_LABELS if k in labels}
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)
    weights: dict[str, Any] = {}
    for i, rule in enumerate((foreign.get("spec") or {}).get("rules") or []):
        refs = rule.get("backendRefs") or []
        names = {r.get("name") for r in refs}
        if stable not in names or canary not in names:
            continue  # canaryd weights only the rules holding both; any other weight is foreign
        for ref in refs:
            if ref.get("name") in (stable, canary):
                weights[f"{i}/{ref['name']}"] = ref.pop("weight", None)
    managed["weights"] = weights
    return foreign, managed


def foreign_of(obj: Mapping[str, Any], stable: str, canary: str) -> dict[str, Any]:
    return split(obj, stable, canary)[0]


def canary_pct(obj: Mapping[str, Any], stable: str, canary: str) -> int | None:
    """The canary's share of the managed pair in percent (first rule holding both), None without one."""
    for rule in (obj.get("spec") or {}).get("rules") or []:
        refs = {r.get("name"): r for r in rule.get("backendRefs") or []}
        if stable in refs and canary in refs:
            s, c = int(refs[stable].get("weight", 1)), int(refs[canary].get("weight", 1))
            return None if s + c == 0 else round(100 * c / (s + c))
    return None


def state_of(obj: Mapping[str, Any]) -> tuple[RolloutState | None, str | None]:
    """(state, error): the parsed state, or the reason it does not parse."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ann.STATE)
    if raw is None:
        return None, None
    try:
        return RolloutState.from_annotation(raw), None
    except StateError as exc:
        return None, str(exc)


def diff_paths(a: Any, b: Any, path: str = "", limit: int = 8) -> list[str]:
    """Where two JSON values differ (JSON pointers, at most ``limit``)."""
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x:
                    out.append(f"{p}/{k} added")
                elif k not in y:
                    out.append(f"{p}/{k} removed")
                else:
                    walk(x[k], y[k], f"{p}/{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{p}/{i}")
        elif x != y:
            out.append(f"{p}: {_short(x)} -> {_short(y)}")

    walk(a, b, path)
    return out


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=False, sort_keys=True)
    return s if len(s) <= n else s[:n] + "…"


# --- the checks ---------------------------------------------------------------------------------
def check_route(  # noqa: C901 - one pass over the revisions, attributing each and checking it
    exp: Expectation,
    revisions: Sequence[tuple[int, Mapping[str, Any]]],
    attempts: Iterable[EditAttempt],
    *,
    complete: bool = True,
) -> RouteReport:
    """Check one route's revisions (``(mod_revision, stored object)``, oldest first)."""
    rep = RouteReport(exp.route, revisions=len(revisions))

    def bad(rev: int | None, reason: str, detail: str) -> None:
        rep.violations.append(Violation(exp.route, rev, reason, detail))

    if not revisions:
        bad(None, "no_history", "etcd holds no revision of this route")
        return rep
    if not complete:
        bad(revisions[0][0], "history_incomplete", "the walk back did not reach the creation revision")
    by_base: dict[int, list[EditAttempt]] = {}
    for a in attempts:
        by_base.setdefault(a.base_rv, []).append(a)

    prev_rev, prev_obj = revisions[0]
    prev_foreign, prev_managed = split(prev_obj, exp.stable, exp.canary)
    _check_state(rep, exp, prev_rev, prev_obj, bad)
    last_editor_foreign = prev_foreign  # what the editor (or the creator) last wrote
    pending_edit: int | None = None  # the revision of the last editor write, until the next one
    for rev, obj in revisions[1:]:
        foreign, managed = split(obj, exp.stable, exp.canary)
        by_editor = foreign != prev_foreign and any(a.intended == foreign for a in by_base.get(prev_rev, ()))
        if by_editor:
            rep.editor_revisions += 1
            if managed != prev_managed:
                bad(rev, "editor_changed_managed", "; ".join(diff_paths(prev_managed, managed)))
            if pending_edit is not None:
                rep.edits_kept += 1
            pending_edit = rev
            last_editor_foreign = foreign
        else:
            rep.canaryd_revisions += 1
            if foreign != prev_foreign:
                detail = "; ".join(diff_paths(prev_foreign, foreign))
                bad(rev, "foreign_changed", f"a write that was not the editor's changed: {detail}")
                if pending_edit is not None:
                    rep.edits_clobbered += 1
                    pending_edit = None
        _check_state(rep, exp, rev, obj, bad)
        prev_rev, prev_obj, prev_foreign, prev_managed = rev, obj, foreign, managed
    if pending_edit is not None:
        rep.edits_kept += 1
    _check_weights(rep, exp, revisions, bad)
    final_state, _ = state_of(revisions[-1][1])
    rep.final_phase = final_state.phase.value if final_state else None
    if final_state is None or final_state.phase != exp.final_phase:
        bad(
            revisions[-1][0],
            "final_phase",
            f"ended {rep.final_phase or 'without state'}, expected {exp.final_phase.value}"
            + (f": {final_state.message}" if final_state else ""),
        )
    if prev_foreign != last_editor_foreign:  # implied by the per-revision checks; said once more at the end
        bad(revisions[-1][0], "final_foreign", "; ".join(diff_paths(last_editor_foreign, prev_foreign)))
    return rep


def _check_state(rep: RouteReport, exp: Expectation, rev: int, obj: Mapping[str, Any], bad: Any) -> None:
    st, err = state_of(obj)
    if err is not None:
        bad(rev, "state_unparseable", err[:300])
        return
    if st is None:
        return
    if not rep.phases or rep.phases[-1] != st.phase.value:
        rep.phases.append(st.phase.value)
    if st.phase in exp.forbidden_phases:
        bad(rev, "unexpected_phase", f"{st.phase.value}: {st.message[:300]}")
    pct = canary_pct(obj, exp.stable, exp.canary)
    if st.phase != Phase.FAILED and pct is not None and st.canary_weight != pct:
        bad(rev, "state_weight_mismatch", f"state says canary {st.canary_weight}%, the weights hold {pct}%")


def _check_weights(
    rep: RouteReport, exp: Expectation, revisions: Sequence[tuple[int, Mapping[str, Any]]], bad: Any
) -> None:
    stretches: list[tuple[int | None, int]] = []  # (canary %, first revision)
    for rev, obj in revisions:
        pct = canary_pct(obj, exp.stable, exp.canary)
        if not stretches or stretches[-1][0] != pct:
            stretches.append((pct, rev))
    rep.weights = [v for v, _ in stretches]
    seen: set[int | None] = {stretches[0][0]}
    rolled_back_at: int | None = None
    objs = dict(revisions)
    for i in range(1, len(stretches)):
        value, rev = stretches[i]
        before = stretches[i - 1][0]
        if rolled_back_at is not None:
            bad(rev, "changed_after_rollback", f"canary {before} -> {value} after the rollback at {rolled_back_at}")
            continue
        st, _ = state_of(objs[rev])
        if value == 0 and st is not None and st.phase == Phase.ROLLED_BACK:
            rolled_back_at = rev
            continue
        if value is None or before is None or value < before:
            bad(rev, "weight_decreased", f"canary weight {before} -> {value} (stretches so far {rep.weights[: i + 1]})")
        elif value in seen:
            bad(rev, "step_repeated", f"canary weight {value} written again in a separate stretch")
        seen.add(value)


def check_log_steps(route: str, weights: Sequence[int]) -> list[Violation]:
    """The daemons' ``route_patched`` canary weights of one route, in time order: each step written
    once, increasing, an optional final rollback to 0."""
    out: list[Violation] = []
    for i in range(1, len(weights)):
        a, b = weights[i - 1], weights[i]
        if b == 0 and i == len(weights) - 1:
            continue
        if b <= a:
            out.append(Violation(route, None, "log_step_repeated", f"route_patched weights {list(weights)}"))
            break
    return out


# --- shards: one writer per route at any time ------------------------------------------------------
@dataclass
class ShardReport:
    """Who wrote each route, and whether each write fell inside the writer's tenure of the route's shard."""

    writes: int = 0
    writers: dict[str, list[str]] = field(default_factory=dict)  # route -> writers, one entry per change of writer
    unattributed: list[tuple[str, int]] = field(default_factory=list)  # (route, revision) no log line claims
    tenures: dict[int, list[tuple[int, str | None]]] = field(default_factory=dict)  # shard -> (revision, holder)
    violations: list[Violation] = field(default_factory=list)


def holder_at(tenure: Sequence[tuple[int, str | None]], revision: int) -> str | None:
    """The Lease's holder as etcd held it at ``revision`` (its newest revision at or before it)."""
    holder = None
    for rev, who in tenure:
        if rev > revision:
            break
        holder = who
    return holder


def check_shard_writes(
    routes: Mapping[str, tuple[int, Sequence[tuple[int, Mapping[str, Any]]]]],
    leases: Mapping[int, Sequence[tuple[int, Mapping[str, Any]]]],
    written_by: Mapping[int, str],
    foreign: Collection[int] = (),
) -> ShardReport:
    """Every revision of every route after its creation is canaryd's, claimed by exactly one replica's
    ``route_patched`` log line (its ``resource_version`` is the revision etcd stored), and etcd held that
    replica as the holder of the route's shard Lease at that revision. etcd's revisions are one total
    order over routes and Leases alike, so "holder at the revision" needs no clock: a write outside its
    writer's tenure — two replicas driving one route — is a violation.

    ``routes``: route -> (shard, [(mod_revision, stored object)] oldest first); ``leases``: shard ->
    [(mod_revision, stored Lease)] oldest first; ``written_by``: revision -> identity, from the logs;
    ``foreign``: revisions someone else wrote (the chaos editor's), skipped. A revision no log claims is
    listed in ``unattributed`` (a replica SIGKILLed between its patch and its log line leaves one), not
    judged."""
    rep = ShardReport()
    for shard, revs in leases.items():
        rep.tenures[shard] = [(rev, (obj.get("spec") or {}).get("holderIdentity")) for rev, obj in revs]
    for route, (shard, revs) in routes.items():
        chain: list[str] = []
        for rev, _obj in revs[1:]:
            if rev in foreign:
                continue
            rep.writes += 1
            writer = written_by.get(rev)
            holder = holder_at(rep.tenures.get(shard, []), rev)
            if writer is None:
                rep.unattributed.append((route, rev))
            elif writer != holder:
                detail = f"written by {writer} while etcd held {holder or 'nobody'} as shard {shard}'s holder"
                rep.violations.append(Violation(route, rev, "write_outside_tenure", detail))
            if writer is not None and (not chain or chain[-1] != writer):
                chain.append(writer)
        rep.writers[route] = chain
    return rep
