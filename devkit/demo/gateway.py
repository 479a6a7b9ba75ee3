"""Gateway API pieces of the local data plane that are pure: listeners, parentRefs, URLRewrite.

* :func:`listeners` — a Gateway's ``spec.listeners`` the data plane can serve (protocol HTTP).
* :func:`attached_listeners` — which of them an HTTPRoute's parentRef attaches to (kind
  ``Gateway``, the group and kind defaults of ``ParentReference``; ``sectionName`` and ``port``
  narrow it to a listener).
* :func:`rewrite_path` — the URLRewrite filter's ``path``, exactly as kubernetes-sigs/gateway-api
  ``apis/v1/httproute_types.go`` documents ``HTTPPathModifier`` (the ReplacePrefixMatch table
  there is tests/unit/test_gateway_rewrite.py, row by row).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAYS = "gateways"
REPLACE_PREFIX = "ReplacePrefixMatch"
REPLACE_FULL = "ReplaceFullPath"


@dataclass(frozen=True)
class Listener:
    gateway: str
    name: str
    port: int  # the Gateway's port (80); the data plane binds a local port for it

    @property
    def key(self) -> str:
        return f"{self.gateway}/{self.name}"


@dataclass(frozen=True)
class PathRewrite:
    type: str  # ReplacePrefixMatch | ReplaceFullPath
    value: str


def listeners(gateway: Mapping[str, Any]) -> list[Listener]:
    """The HTTP listeners of a Gateway object (HTTPS/TLS/TCP ones are not served here)."""
    name = str(gateway["metadata"]["name"])
    out: list[Listener] = []
    for item in (gateway.get("spec") or {}).get("listeners") or []:
        if str(item.get("protocol", "")).upper() != "HTTP":
            continue
        out.append(Listener(gateway=name, name=str(item["name"]), port=int(item.get("port", 0))))
    return out


def attached_listeners(
    route: Mapping[str, Any], namespace: str, by_gateway: Mapping[str, Iterable[Listener]]
) -> list[Listener]:
    """The listeners (of Gateways in ``namespace``) that the route's parentRefs name."""
    out: list[Listener] = []
    for ref in (route.get("spec") or {}).get("parentRefs") or []:
        if ref.get("group", GATEWAY_GROUP) != GATEWAY_GROUP or ref.get("kind", "Gateway") != "Gateway":
            continue
        if ref.get("namespace", namespace) != namespace:
            continue
        section, port = ref.get("sectionName"), ref.get("port")
        for lst in by_gateway.get(str(ref["name"]), ()):
            if (section is None or section == lst.name) and (port is None or int(port) == lst.port):
                out.append(lst)
    return list(dict.fromkeys(out))


def url_rewrite(filters: Iterable[Mapping[str, Any]]) -> tuple[PathRewrite | None, str | None]:
    """The (path, hostname) of a rule's URLRewrite filter, if it has one."""
    for f in filters:
        if f.get("type") != "URLRewrite":
            continue
        spec = f.get("urlRewrite") or {}
        path = spec.get("path") or None
        rewrite = None
        if path is not None:
            kind = str(path.get("type", ""))
            key = "replacePrefixMatch" if kind == REPLACE_PREFIX else "replaceFullPath"
            rewrite = PathRewrite(type=kind, value=str(path.get(key) or ""))
        return rewrite, spec.get("hostname")
    return None, None


def rewrite_path(path: str, matched_prefix: str, rewrite: PathRewrite | None) -> str:
    """The path sent upstream for a request to ``path`` that matched the PathPrefix ``matched_prefix``.

    ReplacePrefixMatch replaces the matched path elements (a trailing ``/`` of the prefix and of
    the replacement is ignored) and keeps the rest; an empty result is ``/``. ReplaceFullPath
    replaces the whole path. Without a rewrite the path is unchanged.
    """
    if rewrite is None:
        return path
    if rewrite.type == REPLACE_FULL:
        return rewrite.value or "/"
    if rewrite.type != REPLACE_PREFIX:
        return path
    kept = path[len(matched_prefix.rstrip("/")) :]
    return (rewrite.value.rstrip("/") + kept) or "/"
