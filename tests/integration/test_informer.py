"""The informer resumes watches and relists on a real 410 Gone (etcd compaction)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from kubernetes_asyncio import client

from canaryd.kube.informer import Informer, Key, raw
from tests.conftest import Stack
from tests.kubeobjects import eventually


def _etcd(stack: Stack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(stack.info.etcd_url + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


async def test_relist_after_410_replays_what_was_missed(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    for name in ("keep", "gone"):
        await core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name)))
    changes: list[tuple[Key, str | None]] = []

    def on_change(key: Key, obj: dict[str, Any] | None) -> None:
        changes.append((key, None if obj is None else obj["metadata"]["resourceVersion"]))

    # A short server-side timeout makes the watch reconnect (with its last resourceVersion) every second.
    inf = Informer("configmaps", raw(core.list_namespaced_config_map), (namespace,), on_change=on_change, timeout_s=1)
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(inf.synced.wait(), 10)
        assert {k[1] for k in inf.cache} >= {"keep", "gone"}
        # While the informer's resourceVersion ages: delete one object, add one, move etcd on and compact it.
        other = f"{namespace}-other"
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
        await core.delete_namespaced_config_map("gone", namespace)
        await core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="new")))
        for i in range(5):
            await core.create_namespaced_config_map(
                other, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"c{i}"))
            )
        revision = int(_etcd(stack, "/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        _etcd(stack, "/v3/kv/compaction", {"revision": revision, "physical": True})
        await core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="after"))
        )

        async def converged() -> bool:
            names = {k[1] for k in inf.cache if k[0] == namespace}
            return {"keep", "new", "after"} <= names and "gone" not in names

        await eventually(converged, timeout=30, what="the informer cache to converge")
        assert ((namespace, "gone"), None) in changes
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print(f"relists: {inf.relists}")
