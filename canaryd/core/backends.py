"""The managed pair of backendRefs: reading it from a route and the JSON-patch ops that write it (pure).

Owns: which rules hold the stable and the canary, at which indices, with what weights; GAMMA parents;
the ops for the two weights and canaryd's own annotations and label. Must not: do I/O — ``canaryd.kube.routes``
sends the ops, ``canaryd.core.admit`` decides whether a route may be rolled out at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from canaryd.core import spec as ann
from canaryd.core.errors import RouteError
from canaryd.core.plan import PairWeights, pair_scale, weights_at


@dataclass(frozen=True)
class RuleRefs:
    rule: int
    stable: int  # index of the stable backendRef in the rule
    canary: int
    stable_weight: int
    canary_weight: int

    @property
    def scale(self) -> int:
        return pair_scale(self.stable_weight, self.canary_weight)


@dataclass(frozen=True)
class Pair:
    stable: str
    canary: str
    rules: tuple[RuleRefs, ...]
    port: int | None  # the canary backendRef's port


@dataclass(frozen=True)
class RouteRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def ref_of(obj: Mapping[str, Any]) -> RouteRef:
    meta = obj["metadata"]
    return RouteRef(meta["namespace"], meta["name"])


def _is_service_ref(ref: Mapping[str, Any]) -> bool:
    return ref.get("group", "") in ("", "core") and ref.get("kind", "Service") == "Service"


def gamma_parents(obj: Mapping[str, Any]) -> list[str]:
    """Names of the Services this route is attached to (GAMMA), empty for Gateway-attached routes."""
    return [
        p["name"]
        for p in obj.get("spec", {}).get("parentRefs", []) or []
        if p.get("kind") == "Service" and p.get("group", "") in ("", "core")
    ]


SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # an EndpointSlice's Service


def slice_ready(es: Mapping[str, Any]) -> bool:
    """An EndpointSlice with at least one ready endpoint (an absent ``ready`` counts as ready, as Kubernetes says)."""
    for ep in es.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready", True) is not False and ep.get("addresses"):
            return True
    return False


def backend_names(obj: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    for rule in obj.get("spec", {}).get("rules", []) or []:
        for ref in rule.get("backendRefs", []) or []:
            if _is_service_ref(ref):
                out.add(ref["name"])
    return out


def resolve_pair(obj: Mapping[str, Any], canary: str, stable: str | None) -> Pair:  # noqa: C901 - one pass over the rules with a named error per way a pair can be wrong
    """Find the rules holding both backends. Raises RouteError naming the fix."""
    where = f"httproute {obj['metadata'].get('namespace')}/{obj['metadata'].get('name')}"
    rules = obj.get("spec", {}).get("rules", []) or []
    names = backend_names(obj)
    if canary not in names:
        raise RouteError(
            f"{where}: {ann.CANARY}={canary!r} is not a backendRef of this route "
            f"(backends: {', '.join(sorted(names)) or 'none'}); add it to a rule or fix the name"
        )
    if stable is not None and stable not in names:
        raise RouteError(
            f"{where}: {ann.STABLE}={stable!r} is not a backendRef of this route (backends: {', '.join(sorted(names))})"
        )
    chosen = stable
    if chosen is None:
        # The stable is the other backend sharing a rule with the canary; with several, the
        # heaviest one (after a promotion the previous canary is the one holding traffic).
        candidates: dict[str, int] = {}
        for rule in rules:
            refs = [r for r in rule.get("backendRefs", []) or [] if _is_service_ref(r)]
            if any(r["name"] == canary for r in refs):
                for r in refs:
                    if r["name"] != canary:
                        candidates[r["name"]] = max(candidates.get(r["name"], -1), int(r.get("weight", 1)))
        if not candidates:
            raise RouteError(
                f"{where}: no rule holds {canary!r} together with another backend; "
                f"add the stable backend to that rule or set {ann.STABLE}"
            )
        ranked = sorted(candidates.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            raise RouteError(
                f"{where}: cannot tell the stable backend ({ranked[0][0]} or {ranked[1][0]}); set {ann.STABLE}"
            )
        chosen = ranked[0][0]
    found: list[RuleRefs] = []
    port: int | None = None
    for i, rule in enumerate(rules):
        refs = rule.get("backendRefs", []) or []
        s = [j for j, r in enumerate(refs) if _is_service_ref(r) and r["name"] == chosen]
        c = [j for j, r in enumerate(refs) if _is_service_ref(r) and r["name"] == canary]
        if not s or not c:
            continue
        if len(s) > 1 or len(c) > 1:
            raise RouteError(
                f"{where}: rule {i} lists {chosen if len(s) > 1 else canary!r} twice; "
                "keep one backendRef per backend in a rule"
            )
        sw, cw = int(refs[s[0]].get("weight", 1)), int(refs[c[0]].get("weight", 1))
        found.append(RuleRefs(rule=i, stable=s[0], canary=c[0], stable_weight=sw, canary_weight=cw))
        port = port or refs[c[0]].get("port")
    if not found:
        raise RouteError(
            f"{where}: no rule holds both {chosen!r} and {canary!r}; put both backendRefs in the rule to roll out"
        )
    return Pair(stable=chosen, canary=canary, rules=tuple(found), port=port)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def weight_ops(pair: Pair, canary_pct: int) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for r in pair.rules:
        w: PairWeights = weights_at(canary_pct, r.scale)
        base = f"/spec/rules/{r.rule}/backendRefs"
        # The test ops pin the backend names at those indices: if the list was reordered since
        # we read it, the patch fails rather than weighting the wrong backend.
        ops.append({"op": "test", "path": f"{base}/{r.stable}/name", "value": pair.stable})
        ops.append({"op": "test", "path": f"{base}/{r.canary}/name", "value": pair.canary})
        ops.append({"op": "add", "path": f"{base}/{r.stable}/weight", "value": w.stable})
        ops.append({"op": "add", "path": f"{base}/{r.canary}/weight", "value": w.canary})
    return ops


def label_ops(obj: Mapping[str, Any], set_: Mapping[str, str]) -> list[dict[str, Any]]:
    """Set labels that do not hold the value yet (canaryd's own, ``canaryd.io/phase``); others are left alone."""
    current = obj["metadata"].get("labels") or {}
    changed = {k: v for k, v in set_.items() if current.get(k) != v}
    ops: list[dict[str, Any]] = []
    if changed and not current:
        ops.append({"op": "add", "path": "/metadata/labels", "value": {}})
    for key, value in changed.items():
        ops.append({"op": "add", "path": f"/metadata/labels/{_escape(key)}", "value": value})
    return ops


def annotation_ops(obj: Mapping[str, Any], set_: Mapping[str, str], remove: Mapping[str, str]) -> list[dict[str, Any]]:
    """Set annotations, and remove others only if they still hold the value we read."""
    ops: list[dict[str, Any]] = []
    current = obj["metadata"].get("annotations") or {}
    if not current and set_:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    for key, value in set_.items():
        ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value})
    for key, value in remove.items():
        if key in current:
            ops.append({"op": "test", "path": f"/metadata/annotations/{_escape(key)}", "value": value})
            ops.append({"op": "remove", "path": f"/metadata/annotations/{_escape(key)}"})
    return ops
