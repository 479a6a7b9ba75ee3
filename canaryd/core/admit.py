"""Admission: (route, a view of the cluster, defaults, now) -> the facts ``decide`` needs, or the problems.

The one place that says whether a route can be rolled out as annotated. The engine, ``canaryd check``
and the intent commands all call ``admit``, so they cannot disagree. Pure: the cluster arrives as a
``ClusterView`` the caller filled (the engine from its informers, ``check`` from one read each).

Rules that keep a running rollout stable:
- the pair (stable, canary) is chosen once, when the rollout starts, and read back from the state
  after that: a backendRef added later never becomes the stable;
- a terminal rollout (Promoted, RolledBack) asks nothing of the route until its canary changes or an
  intent arrives: cleaning up the old backendRef after a promotion is not an error;
- a canary Service deleted mid-rollout is not a bad input but a failure: the facts say so and
  ``decide`` rolls back.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from canaryd.core import spec as ann
from canaryd.core.backends import Pair, gamma_parents, resolve_pair
from canaryd.core.decide import Facts
from canaryd.core.errors import RouteError, SpecError, StateError
from canaryd.core.hooks import HookCatalog, route_hooks, route_notifiers
from canaryd.core.plan import canary_percent
from canaryd.core.spec import Intent, RolloutDefaults, RolloutSpec
from canaryd.core.state import Failure, Phase, RolloutState


class ClusterView(Protocol):
    """What admission needs to know of the cluster besides the route itself."""

    def service_exists(self, namespace: str, name: str) -> bool: ...

    def service_ready(self, namespace: str, name: str) -> bool: ...


@dataclass(frozen=True)
class StaticView:
    """A ``ClusterView`` from values read once (``canaryd check``, tests)."""

    services: Mapping[tuple[str, str], bool] = field(default_factory=dict)  # (ns, name) -> has ready endpoints

    def service_exists(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self.services

    def service_ready(self, namespace: str, name: str) -> bool:
        return self.services.get((namespace, name), False)


@dataclass(frozen=True)
class Problem:
    check: str  # annotations | state | route | service | intent
    message: str
    annotation: str | None = None
    blocking: bool = True  # False: reported, but the rollout goes on (an unknown intent is ignored)


@dataclass(frozen=True)
class Admission:
    facts: Facts
    problems: tuple[Problem, ...]
    spec: RolloutSpec | None = None
    pair: Pair | None = None
    parent: str | None = None  # the GAMMA parent Service
    raw_intent: str | None = None
    notifiers: tuple[str, ...] | None = None  # the route's notifiers; None = the cluster default

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def blocking(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.blocking)


@dataclass
class _Reading:
    where: str
    namespace: str
    problems: list[Problem] = field(default_factory=list)
    state: RolloutState | None = None
    state_failed: bool = False
    spec: RolloutSpec | None = None
    intent: Intent | None = None
    pair: Pair | None = None
    parent: str | None = None
    current: int = 0
    canary_gone: bool = False
    bad_intent: str | None = None
    catalog: HookCatalog = field(default_factory=HookCatalog)
    hooks: tuple[str, ...] = ()
    notifiers: tuple[str, ...] | None = None

    def problem(self, check: str, message: str, annotation: str | None = None, *, blocking: bool = True) -> None:
        self.problems.append(Problem(check, message, annotation, blocking))


def is_managed(obj: Mapping[str, Any]) -> bool:
    """A route canaryd looks after: it carries ``canaryd.io/canary`` or canaryd state."""
    a = (obj.get("metadata") or {}).get("annotations") or {}
    return ann.CANARY in a or ann.STATE in a


def admit(
    obj: Mapping[str, Any],
    view: ClusterView,
    defaults: RolloutDefaults,
    now: datetime,
    catalog: HookCatalog | None = None,
) -> Admission:
    meta = obj["metadata"]
    a: Mapping[str, str] = meta.get("annotations") or {}
    r = _Reading(where=f"httproute {meta.get('namespace')}/{meta.get('name')}", namespace=meta.get("namespace", ""))
    r.catalog = catalog or HookCatalog()
    _read_state(r, a)
    _read_spec(r, a, defaults)
    _read_unknown_keys(r, a)
    _read_hooks(r, a)
    if r.spec is not None and _needs_route(r):
        _read_route(r, obj, view)
    facts = _facts(r, view, now)
    return Admission(
        facts=facts,
        problems=tuple(r.problems),
        spec=r.spec,
        pair=r.pair,
        parent=r.parent,
        raw_intent=a.get(ann.INTENT),
        notifiers=r.notifiers,
    )


def _read_hooks(r: _Reading, a: Mapping[str, str]) -> None:
    try:
        r.hooks = route_hooks(a, r.catalog)
    except SpecError as exc:
        r.problem("annotations", f"{r.where}: annotation {exc}", exc.annotation)
    try:
        r.notifiers = route_notifiers(a, r.catalog)
    except SpecError as exc:
        r.problem("annotations", f"{r.where}: annotation {exc}", exc.annotation)


def _read_state(r: _Reading, a: Mapping[str, str]) -> None:
    if ann.STATE not in a:
        return
    try:
        r.state = RolloutState.from_annotation(a[ann.STATE])
    except StateError as exc:
        r.state_failed = True
        r.problem("state", f"{r.where}: {ann.STATE}: {exc}", ann.STATE)


KNOWN_KEYS = frozenset((*ann.USER_ANNOTATIONS, ann.STATE, ann.INTENT))


def _read_unknown_keys(r: _Reading, a: Mapping[str, str]) -> None:
    """A mistyped key would silently mean the default: refuse it, and say what was probably meant."""
    for k in sorted(a):
        if k.startswith(ann.PREFIX) and k not in KNOWN_KEYS:
            close = difflib.get_close_matches(k, sorted(KNOWN_KEYS), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(ann.USER_ANNOTATIONS))}"
            r.problem("annotations", f"{r.where}: unknown annotation {k[:100]}{hint}", k)


def _read_spec(r: _Reading, a: Mapping[str, str], defaults: RolloutDefaults) -> None:
    try:
        r.intent = ann.parse_intent(a.get(ann.INTENT))
    except SpecError as exc:
        r.bad_intent = exc.message
        r.problem("intent", f"{r.where}: annotation {exc}", exc.annotation, blocking=False)
    try:
        r.spec = ann.parse_spec(a, defaults)
        if r.spec is None:
            r.problem("annotations", f"{r.where}: {ann.CANARY} is missing; set it to the backendRef to roll out")
    except SpecError as exc:
        r.problem("annotations", f"{r.where}: annotation {exc}", exc.annotation)


def _same_rollout(r: _Reading) -> RolloutState | None:
    """The stored rollout when it is still this canary's (its pair then stays)."""
    st, spec = r.state, r.spec
    if st is None or spec is None or st.canary != spec.canary or not st.stable:
        return None
    return st


def _finished(st: RolloutState | None) -> bool:
    """Promoted or RolledBack: done until a new canary or an intent (Failed is not: it waits for valid input)."""
    return st is not None and st.phase in (Phase.PROMOTED, Phase.ROLLED_BACK)


def _needs_route(r: _Reading) -> bool:
    return not (_finished(_same_rollout(r)) and r.intent is None)


def _read_route(r: _Reading, obj: Mapping[str, Any], view: ClusterView) -> None:
    assert r.spec is not None
    parents = gamma_parents(obj)
    if not parents:
        r.problem(
            "route",
            f"{r.where}: canaryd manages GAMMA routes (parentRefs of kind Service); "
            "this route attaches to a Gateway — annotate the mesh route instead",
        )
    r.parent = parents[0] if parents else None
    running = _same_rollout(r)
    stable = r.spec.stable or (running.stable if running else None)
    try:
        r.pair = resolve_pair(obj, r.spec.canary, stable)
    except RouteError as exc:
        r.problem("route", str(exc))
        return
    _check_services(r, view, active=running is not None and not running.phase.terminal)  # Failed holds: no rollback
    r0 = r.pair.rules[0]
    r.current = round(canary_percent(r0.stable_weight, r0.canary_weight))
    if all(x.stable_weight + x.canary_weight == 0 for x in r.pair.rules):
        r.problem(
            "route",
            f"{r.where}: the weights of {r.pair.stable} and {r.pair.canary} are both 0; "
            "give the stable a weight (e.g. 100)",
        )


def _check_services(r: _Reading, view: ClusterView, *, active: bool) -> None:
    assert r.pair is not None
    for backend in (r.pair.stable, r.pair.canary):
        if view.service_exists(r.namespace, backend):
            continue
        if active and backend == r.pair.canary:
            r.canary_gone = True  # a failure of the release, not of the input: decide rolls back
            continue
        r.problem(
            "service",
            f"{r.where}: backend Service {r.namespace}/{backend} does not exist; create it or fix the backendRef",
        )


def _facts(r: _Reading, view: ClusterView, now: datetime) -> Facts:
    blocking = [p for p in r.problems if p.blocking]
    first = blocking[0].message if blocking else None
    stable: str | None = None
    if first is None:
        running = _same_rollout(r)
        stable = r.pair.stable if r.pair else running.stable if running else None
    return Facts(
        now=now,
        spec=r.spec if first is None else None,
        stable=stable,
        error=first,
        state=r.state,
        intent=r.intent,
        canary_ready=bool(r.spec and view.service_ready(r.namespace, r.spec.canary)),
        current_canary_pct=r.current,
        error_kind=Failure.STATE if r.state_failed else Failure.INPUT,
        canary_gone=r.canary_gone,
        bad_intent=r.bad_intent,
        canary_hint=r.spec.canary if r.spec else "",
        stable_hint=r.pair.stable if r.pair else "",
        catalog=r.catalog,
        hooks=r.hooks,
        observed=None if r.pair is None else tuple((x.stable_weight, x.canary_weight) for x in r.pair.rules),
    )
