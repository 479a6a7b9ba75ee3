"""The local data plane's routing table: one immutable snapshot of the namespace's routes. Pure.

``build_table`` turns plain API dicts (HTTPRoutes, Services, EndpointSlices, Gateways) and what the
pod runner has running (``PodAddress`` by Pod IP) into a ``Table``: per parent (a GAMMA parent
Service, or a Gateway listener) the rules in precedence order, and per backend ``(service, port)``
the endpoints to send to. The rules of the game are in ``devkit.demo.dataplane``'s docstring.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from canaryd.core.spec import APP_ID
from devkit.demo import envoy_stats
from devkit.demo.gateway import GATEWAY_GROUP, Listener, PathRewrite, attached_listeners, listeners, url_rewrite

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "demo.canaryd.io"
LOCAL_DOMAIN = "localhost"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    address: str = ""  # the slice's "<podIP>:<port>" when that is not where we connect
    refused: bool = False  # a Pod with nothing listening on that port: connecting is refused

    def describe(self) -> str:
        if self.refused:
            return f"{self.address} (nothing listens there: connection refused)"
        return f"{self.address} -> {self.host}:{self.port}" if self.address else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Backend:
    service: str
    port: int
    weight: int
    cluster: str  # Envoy's stat name of the cluster, "<ns>/<parent>/<ns>_<svc>_<port>"


@dataclass(frozen=True)
class Rule:
    prefixes: tuple[str, ...]  # PathPrefix values; ("/",) when the rule has no path match
    backends: tuple[Backend, ...]
    rewrite: PathRewrite | None = None  # the rule's URLRewrite path modifier
    hostname: str | None = None  # the rule's URLRewrite hostname

    @property
    def total_weight(self) -> int:
        return sum(b.weight for b in self.backends)

    def matched_prefix(self, path: str) -> str | None:
        """The longest of the rule's prefixes that matches ``path``, None when none does."""
        best: str | None = None
        for p in self.prefixes:
            if prefix_matches(p, path) and (best is None or len(p) > len(best)):
                best = p
        return best

    def match_length(self, path: str) -> int:
        """Length of the longest matching prefix, -1 when none matches."""
        p = self.matched_prefix(path)
        return -1 if p is None else len(p)


@dataclass(frozen=True)
class ParentRoutes:
    parent: str  # the parent Service, or "<gateway>/<listener>"
    app_id: str  # the Dapr app-id of a parent Service ("" for a Gateway listener)
    routes: tuple[str, ...]  # names of the HTTPRoutes attached, in precedence order
    rules: tuple[Rule, ...]

    def match(self, path: str) -> tuple[Rule, str] | None:
        """The rule with the longest matching prefix (ties: the first) and that prefix."""
        best: tuple[Rule, str] | None = None
        for r in self.rules:
            p = r.matched_prefix(path)
            if p is not None and (best is None or len(p) > len(best[1])):
                best = (r, p)
        return best

    def rule_for(self, path: str) -> Rule | None:
        m = self.match(path)
        return None if m is None else m[0]


@dataclass(frozen=True)
class PodAddress:
    """What the pod runner has running for one Pod IP."""

    pod: str
    port: int  # the port the Pod's process listens on (its container's --port)
    local_port: int | None  # where that process really listens on 127.0.0.1; None while it starts


@dataclass(frozen=True)
class Table:
    """One immutable snapshot of everything the proxy needs; replaced, never mutated."""

    namespace: str
    parents: Mapping[str, ParentRoutes] = field(default_factory=dict)  # GAMMA parent Services
    listeners: Mapping[str, ParentRoutes] = field(default_factory=dict)  # "<gateway>/<listener>"
    gateway_listeners: Mapping[str, Listener] = field(default_factory=dict)
    endpoints: Mapping[tuple[str, int], tuple[Endpoint, ...]] = field(default_factory=dict)
    version: int = 0

    def clusters(self) -> set[str]:
        return {
            b.cluster for pr in (*self.parents.values(), *self.listeners.values()) for r in pr.rules for b in r.backends
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parents": {p: self._parent_json(pr) for p, pr in sorted(self.parents.items())},
            "gateways": {k: self._parent_json(pr) for k, pr in sorted(self.listeners.items())},
        }

    def _parent_json(self, pr: ParentRoutes) -> dict[str, Any]:
        return {
            "app_id": pr.app_id,
            "routes": list(pr.routes),
            "rules": [
                {
                    "prefixes": list(r.prefixes),
                    "rewrite": None if r.rewrite is None else {"type": r.rewrite.type, "value": r.rewrite.value},
                    "backends": [
                        {
                            "service": b.service,
                            "port": b.port,
                            "weight": b.weight,
                            "cluster": b.cluster,
                            "endpoints": [e.describe() for e in self.endpoints.get((b.service, b.port), ())],
                        }
                        for b in r.backends
                    ],
                }
                for r in pr.rules
            ],
        }


def prefix_matches(prefix: str, path: str) -> bool:
    """Gateway API PathPrefix: element-wise; '/foo' matches '/foo' and '/foo/bar', not '/foobar'."""
    p = prefix.rstrip("/")
    if not p:
        return True
    return path == p or path.startswith(p + "/")


def service_parents(route: Mapping[str, Any], namespace: str) -> list[str]:
    out: list[str] = []
    for ref in route.get("spec", {}).get("parentRefs") or []:
        if ref.get("group", GATEWAY_GROUP) != "" or ref.get("kind") != "Service":
            continue
        if ref.get("namespace", namespace) != namespace:
            continue
        out.append(str(ref["name"]))
    return out


def _rule_prefixes(raw: Mapping[str, Any]) -> list[str] | None:
    """The PathPrefix values of a rule; None when it only has match types not implemented here."""
    prefixes: list[str] = []
    matches = raw.get("matches") or []
    for m in matches:
        path = m.get("path")
        if path is None:
            prefixes.append("/")
        elif path.get("type", "PathPrefix") == "PathPrefix":
            prefixes.append(str(path.get("value", "/")))
    if matches and not prefixes:
        return None
    return prefixes or ["/"]


def _rule_backends(raw: Mapping[str, Any], namespace: str, cluster_parent: str) -> list[Backend]:
    backends: list[Backend] = []
    for ref in raw.get("backendRefs") or []:
        if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
            continue
        if ref.get("namespace", namespace) != namespace:
            continue
        svc, port = str(ref["name"]), int(ref.get("port", 0))
        cluster = envoy_stats.cluster_name(namespace, cluster_parent, svc, port)
        backends.append(Backend(service=svc, port=port, weight=int(ref.get("weight", 1)), cluster=cluster))
    return backends


def route_rules(route: Mapping[str, Any], namespace: str, cluster_parent: str) -> list[Rule]:
    """The rules of one route; ``cluster_parent`` qualifies its Envoy cluster names."""
    rules: list[Rule] = []
    for raw in route.get("spec", {}).get("rules") or []:
        prefixes = _rule_prefixes(raw)
        if prefixes is None:
            continue  # only match types we do not implement: the rule is not served
        rewrite, hostname = url_rewrite(raw.get("filters") or [])
        backends = _rule_backends(raw, namespace, cluster_parent)
        rules.append(Rule(tuple(prefixes), tuple(backends), rewrite=rewrite, hostname=hostname))
    return rules


# --------------------------------------------------------------------------- endpoints


def _local_host(address: str, address_type: str) -> str | None:
    """127.0.0.1 (or the loopback IP) for a local endpoint address, None for anything else."""
    if address_type == "FQDN":
        name = address.rstrip(".").lower()
        return LOOPBACK if name == LOCAL_DOMAIN or name.endswith("." + LOCAL_DOMAIN) else None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return str(ip) if ip.is_loopback and ip.version == 4 else None


def pod_endpoint(address: str, port: int, pod: PodAddress | None) -> Endpoint | None:
    """The endpoint for slice address ``address:port`` of a Pod the pod runner knows, None when it
    does not know it (or its process is still starting: not ready yet, as a readiness probe says).

    The Pod's process listens on ``pod.port``; a slice port that differs gets "connection refused",
    as connecting to a port nothing listens on in a real Pod does."""
    if pod is None or pod.local_port is None:
        return None
    if pod.port != port:
        return Endpoint(host=address, port=port, address=f"{address}:{port}", refused=True)
    return Endpoint(host=LOOPBACK, port=pod.local_port, address=f"{address}:{port}")


def _slice_target(sl: Mapping[str, Any], port_name: str | None) -> int | None:
    """The slice's port for the Service port named ``port_name`` (by name, as kube-proxy does)."""
    slice_ports = sl.get("ports") or []
    for sp in slice_ports:
        if port_name is not None and (sp.get("name") or "") == port_name:
            return int(sp["port"])
    if port_name is None and len(slice_ports) == 1:
        return int(slice_ports[0]["port"])
    return None


def _slice_endpoints(
    service: str,
    sl: Mapping[str, Any],
    target: int,
    pods: Mapping[str, PodAddress],
    refused: set[str],
) -> Iterator[Endpoint]:
    addr_type = str(sl.get("addressType", "IPv4"))
    for ep in sl.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue  # nil means ready (EndpointSlice API)
        for addr in ep.get("addresses") or []:
            host = _local_host(str(addr), addr_type)
            if host is not None:
                yield Endpoint(host=host, port=target)
            elif str(addr) in pods:
                pe = pod_endpoint(str(addr), target, pods[str(addr)])
                if pe is not None:
                    yield pe
            else:
                refused.add(f"{service}:{addr}")


def resolve_endpoints(
    service: str,
    port: int,
    services: Mapping[str, Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    pods: Mapping[str, PodAddress],
    refused: set[str],
) -> tuple[Endpoint, ...]:
    name: str | None = None  # the Service port's name; None when the Service is unknown
    svc = services.get(service)
    if svc is not None:
        names = {int(sp.get("port", 0)): str(sp.get("name") or "") for sp in svc.get("spec", {}).get("ports") or []}
        if port not in names:
            return ()  # the Service has no such port
        name = names[port]
    out: list[Endpoint] = []
    for sl in slices:
        if (sl.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL) != service:
            continue
        target = _slice_target(sl, name)
        if target is not None:
            out.extend(_slice_endpoints(service, sl, target, pods, refused))
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------- local backends


def local_backend_objects(
    service: str,
    ports: Iterable[int],
    *,
    service_port: int = 80,
    port_name: str = "http",
    labels: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A selector-less Service plus one EndpointSlice per local instance port.

    Each instance is an endpoint ``<service>-<i>.localhost`` (addressType FQDN; the apiserver
    refuses loopback IPs) that the demo data plane maps to 127.0.0.1:<port>.
    """
    extra = dict(labels or {})
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "labels": {**extra, "app.kubernetes.io/managed-by": MANAGED_BY}},
        "spec": {"ports": [{"name": port_name, "port": service_port, "protocol": "TCP"}]},
    }
    slices: list[dict[str, Any]] = []
    for i, port in enumerate(ports):
        slices.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{service}-local-{i}",
                    "labels": {**extra, SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY},
                },
                "addressType": "FQDN",
                "ports": [{"name": port_name, "port": int(port), "protocol": "TCP"}],
                "endpoints": [{"addresses": [f"{service}-{i}.{LOCAL_DOMAIN}"], "conditions": {"ready": True}}],
            }
        )
    return svc, slices


# --------------------------------------------------------------------------- the table


def _ordered(routes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(routes, key=lambda r: (str(r["metadata"].get("creationTimestamp") or ""), str(r["metadata"]["name"])))


def _service_parent_routes(routes: list[Mapping[str, Any]], namespace: str) -> dict[str, ParentRoutes]:
    acc: dict[str, tuple[str | None, list[str], list[Rule]]] = {}
    for route in routes:
        name = str(route["metadata"]["name"])
        annotations = route["metadata"].get("annotations") or {}
        for parent in service_parents(route, namespace):
            app_id, names, rules = acc.setdefault(parent, (None, [], []))
            names.append(name)
            rules.extend(route_rules(route, namespace, parent))
            if app_id is None and annotations.get(APP_ID):
                acc[parent] = (str(annotations[APP_ID]), names, rules)
    return {
        p: ParentRoutes(parent=p, app_id=app_id or p, routes=tuple(names), rules=tuple(rules))
        for p, (app_id, names, rules) in acc.items()
    }


def _listener_routes(
    routes: list[Mapping[str, Any]], namespace: str, by_gateway: Mapping[str, list[Listener]]
) -> dict[str, ParentRoutes]:
    acc: dict[str, tuple[list[str], list[Rule]]] = {lst.key: ([], []) for lsts in by_gateway.values() for lst in lsts}
    for route in routes:
        name = str(route["metadata"]["name"])
        for lst in attached_listeners(route, namespace, by_gateway):
            names, rules = acc[lst.key]
            names.append(name)
            rules.extend(route_rules(route, namespace, envoy_stats.gateway_parent(lst.gateway)))
    return {k: ParentRoutes(parent=k, app_id="", routes=tuple(n), rules=tuple(r)) for k, (n, r) in acc.items()}


def build_table(
    namespace: str,
    routes: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    *,
    gateways: Iterable[Mapping[str, Any]] = (),
    pods: Mapping[str, PodAddress] | None = None,
    version: int = 0,
    refused: set[str] | None = None,
) -> Table:
    """The routing snapshot for ``namespace`` from plain API dicts. Pure.

    ``pods`` is what the pod runner has running, by Pod IP; ``refused`` collects endpoint
    addresses that were ignored because they are neither local nor a known Pod's.
    """
    refused = refused if refused is not None else set()
    svc_by_name = {str(s["metadata"]["name"]): s for s in services}
    slice_list = list(slices)
    ordered = _ordered(routes)
    by_gateway: dict[str, list[Listener]] = {}
    for gw in gateways:
        by_gateway[str(gw["metadata"]["name"])] = listeners(gw)
    parents = _service_parent_routes(ordered, namespace)
    attached = _listener_routes(ordered, namespace, by_gateway)
    endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
    for pr in (*parents.values(), *attached.values()):
        for r in pr.rules:
            for b in r.backends:
                key = (b.service, b.port)
                if key not in endpoints:
                    endpoints[key] = resolve_endpoints(b.service, b.port, svc_by_name, slice_list, pods or {}, refused)
    return Table(
        namespace=namespace,
        parents=parents,
        listeners=attached,
        gateway_listeners={lst.key: lst for lsts in by_gateway.values() for lst in lsts},
        endpoints=endpoints,
        version=version,
    )


def choose_backend(rule: Rule, rng: random.Random) -> Backend | None:
    """Weighted random choice; None when every weight is 0."""
    total = rule.total_weight
    if total <= 0:
        return None
    x = rng.random() * total
    acc = 0
    for b in rule.backends:
        if b.weight <= 0:
            continue
        acc += b.weight
        if x < acc:
            return b
    return next(b for b in reversed(rule.backends) if b.weight > 0)
