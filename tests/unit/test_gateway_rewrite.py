"""URLRewrite and Gateway attachment, pure. The ReplacePrefixMatch table is the one documented on
``HTTPPathModifier.ReplacePrefixMatch`` in kubernetes-sigs/gateway-api ``apis/v1/httproute_types.go``."""

from __future__ import annotations

from typing import Any

import pytest

from devkit.demo.gateway import PathRewrite, attached_listeners, listeners, rewrite_path, url_rewrite
from devkit.demo.routing import build_table, local_backend_objects

PREFIX = "ReplacePrefixMatch"


@pytest.mark.parametrize(
    ("request_path", "prefix", "replace", "modified"),
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ],
)
def test_replace_prefix_match_table(request_path: str, prefix: str, replace: str, modified: str) -> None:
    assert rewrite_path(request_path, prefix, PathRewrite(PREFIX, replace)) == modified


def test_the_seeds_ingress_rewrite() -> None:
    rw = PathRewrite(PREFIX, "/v1.0/invoke/whoami.default/method/")
    assert rewrite_path("/whoami", "/", rw) == "/v1.0/invoke/whoami.default/method/whoami"
    assert rewrite_path("/api/x", "/", rw) == "/v1.0/invoke/whoami.default/method/api/x"
    assert rewrite_path("/", "/", rw) == "/v1.0/invoke/whoami.default/method/"


def test_full_path_and_no_rewrite() -> None:
    assert rewrite_path("/foo/bar", "/foo", PathRewrite("ReplaceFullPath", "/other")) == "/other"
    assert rewrite_path("/foo/bar", "/foo", None) == "/foo/bar"
    assert url_rewrite([{"type": "RequestHeaderModifier"}]) == (None, None)
    assert url_rewrite(
        [{"type": "URLRewrite", "urlRewrite": {"hostname": "h", "path": {"type": PREFIX, "replacePrefixMatch": "/x"}}}]
    ) == (PathRewrite(PREFIX, "/x"), "h")


def gateway(name: str, *ls: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"gatewayClassName": "cilium", "listeners": list(ls)}}


def ingress_route(**ref: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "ingress", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "parentRefs": [{"name": "default-gateway", **ref}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "filters": [
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "path": {"type": PREFIX, "replacePrefixMatch": "/v1.0/invoke/whoami.default/method/"}
                            },
                        }
                    ],
                    "backendRefs": [{"name": "ingress-dapr", "port": 3500}],
                }
            ],
        },
    }


def test_listeners_and_attachment() -> None:
    gw = gateway(
        "default-gateway",
        {"name": "http", "protocol": "HTTP", "port": 80},
        {"name": "alt", "protocol": "HTTP", "port": 8080},
        {"name": "https", "protocol": "HTTPS", "port": 443},
    )
    ls = listeners(gw)
    assert [lst.key for lst in ls] == ["default-gateway/http", "default-gateway/alt"]
    by_gw = {"default-gateway": ls}
    assert [lst.name for lst in attached_listeners(ingress_route(), "demo", by_gw)] == ["http", "alt"]
    assert [lst.name for lst in attached_listeners(ingress_route(sectionName="http"), "demo", by_gw)] == ["http"]
    assert [lst.name for lst in attached_listeners(ingress_route(port=8080), "demo", by_gw)] == ["alt"]
    assert attached_listeners(ingress_route(namespace="elsewhere"), "demo", by_gw) == []
    assert attached_listeners(ingress_route(kind="Service", group=""), "demo", by_gw) == []


def test_gateway_route_in_the_table() -> None:
    svc, slices = local_backend_objects("ingress-dapr", [43500], service_port=3500, port_name="dapr-http")
    table = build_table(
        "demo",
        [ingress_route(sectionName="http")],
        [svc],
        slices,
        gateways=[gateway("default-gateway", {"name": "http", "protocol": "HTTP", "port": 80})],
    )
    assert table.parents == {}  # a Gateway route is no GAMMA parent
    routes = table.listeners["default-gateway/http"]
    match = routes.match("/whoami")
    assert match is not None
    rule, prefix = match
    assert prefix == "/" and rule.rewrite == PathRewrite(PREFIX, "/v1.0/invoke/whoami.default/method/")
    assert rule.backends[0].cluster == "demo/cilium-gateway-default-gateway/demo_ingress-dapr_3500"
    assert [(e.host, e.port) for e in table.endpoints[("ingress-dapr", 3500)]] == [("127.0.0.1", 43500)]
