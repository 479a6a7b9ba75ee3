"""canaryd's own request path against the real apiserver: who it says it is, lists in pages, the error family."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes_asyncio import client

from canaryd import __version__
from canaryd.errors import ConflictError, NotFoundError
from canaryd.kube import USER_AGENT, Api
from canaryd.kube import informer as informer_mod
from canaryd.kube.api import get_route, patch_route, request
from canaryd.kube.informer import Informer, Key, raw


async def test_requests_carry_our_user_agent(api: Api, namespace: str) -> None:
    # A write that names no field manager is recorded under the User-Agent's product: ours.
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ua"}, "data": {"a": "1"}}
    out = await request(api, "POST", f"/api/v1/namespaces/{namespace}/configmaps", "create configmap", body=body)
    assert api.default_headers["User-Agent"] == USER_AGENT == f"canaryd/{__version__}"
    assert [m["manager"] for m in out["metadata"]["managedFields"]] == ["canaryd"]


async def test_informer_lists_in_pages(api: Api, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    core = client.CoreV1Api(api)
    for i in range(5):
        await core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"c{i}"))
        )
    monkeypatch.setattr(informer_mod, "LIST_PAGE", 2)
    pages: list[dict[str, Any]] = []
    listing = raw(core.list_namespaced_config_map)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("watch"):
            pages.append(kwargs)
        return await listing(*args, **kwargs)

    changes: list[Key] = []
    inf = Informer("configmaps", counted, (namespace,), on_change=lambda key, obj: changes.append(key))
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(inf.synced.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    names = {k[1] for k in inf.cache}
    assert {f"c{i}" for i in range(5)} <= names and len(changes) == len(names)
    assert len(pages) >= 3 and all(p["limit"] == 2 for p in pages) and "_continue" in pages[-1]


async def test_route_calls_keep_the_error_family(api: Api, namespace: str) -> None:
    with pytest.raises(NotFoundError, match=rf"^get httproute {namespace}/nope: not found \("):
        await get_route(api, namespace, "nope")
    guarded = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}]
    with pytest.raises((NotFoundError, ConflictError), match=rf"^patch httproute {namespace}/nope: "):
        await patch_route(api, namespace, "nope", guarded, field_manager="canaryd")
