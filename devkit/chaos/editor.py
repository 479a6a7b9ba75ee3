"""The concurrent editor: someone else keeps changing the routes while canaryd rolls them out.

Each edit reads the route, changes one thing canaryd does not own — a label, an unrelated annotation,
the path match value, or a third backendRef with its own weight (added at a random index, so the
managed pair moves, re-weighted, or removed) — and sends it as a JSON patch guarded by a ``test`` of
``metadata.resourceVersion``. Every attempt is recorded with the revision it was based on and the
foreign part it intended (``invariants.EditAttempt``): that is how the checks tell the editor's
revisions from canaryd's, whatever the attempt's answer was (a write whose answer was lost in an
apiserver kill may still have landed).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTES
from devkit.chaos.invariants import EditAttempt, foreign_of
from devkit.chaos.scenario import RouteSpec

JSON_PATCH = "application/json-patch+json"
NOTES = ["plain", "ünïcødé ✓", "with spaces and / slashes", "", "x" * 300, "emoji 🚦", '{"json": "lookalike"}']
REQUEST_TIMEOUT_S = 5


def escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _resolve(doc: Any, path: str) -> tuple[Any, str]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, parts[-1]


def apply_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove/replace (what the editor sends) on a copy."""
    doc = copy.deepcopy(obj)
    for op in ops:
        parent, last = _resolve(doc, op["path"])
        if op["op"] == "test":
            continue
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif op["op"] == "remove":
                del parent[idx]
            else:
                parent[idx] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])
    return doc


class Editor:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        routes: dict[str, RouteSpec],
        rng: random.Random,
        *,
        rate_hz: float = 3.0,
    ) -> None:
        self.co = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.routes = routes
        self.rng = rng
        self.rate_hz = rate_hz
        self.available: list[str] = []  # routes created so far
        self.attempts: list[EditAttempt] = []
        self.outcomes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.get_errors = 0
        self.last_confirmed: dict[str, tuple[int, dict[str, Any]]] = {}  # route -> (rv, intended foreign)
        self._n = 0

    # --- choosing an edit ------------------------------------------------------------------
    def _edits(self, obj: dict[str, Any], spec: RouteSpec) -> list[tuple[str, Callable[[], list[dict[str, Any]]]]]:
        n = self._n
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        refs = obj["spec"]["rules"][0]["backendRefs"]
        third = next((i for i, r in enumerate(refs) if r["name"] == spec.third), None)

        def label() -> list[dict[str, Any]]:
            if "chaos.example.com/flag" in labels and self.rng.random() < 0.5:
                return [{"op": "remove", "path": "/metadata/labels/" + escape("chaos.example.com/flag")}]
            key = self.rng.choice(["chaos.example.com/edit", "chaos.example.com/flag"])
            base = "/metadata/labels" if labels else None
            if base is None:
                return [{"op": "add", "path": "/metadata/labels", "value": {key: str(n)}}]
            return [{"op": "add", "path": f"{base}/{escape(key)}", "value": f"v{n}"}]

        def annotation() -> list[dict[str, Any]]:
            key = "example.com/note"
            if key in annotations and self.rng.random() < 0.3:
                return [{"op": "remove", "path": "/metadata/annotations/" + escape(key)}]
            value = f"{self.rng.choice(NOTES)} #{n}"
            return [{"op": "add", "path": "/metadata/annotations/" + escape(key), "value": value}]

        def path() -> list[dict[str, Any]]:
            return [{"op": "replace", "path": "/spec/rules/0/matches/0/path/value", "value": f"/p{n}"}]

        def backend() -> list[dict[str, Any]]:
            if third is None:
                at = self.rng.randrange(len(refs) + 1)
                w = self.rng.randint(1, 20)
                ref = {"group": "", "kind": "Service", "name": spec.third, "port": 80, "weight": w}
                return [{"op": "add", "path": f"/spec/rules/0/backendRefs/{at}", "value": ref}]
            if self.rng.random() < 0.5:
                return [
                    {"op": "test", "path": f"/spec/rules/0/backendRefs/{third}/name", "value": spec.third},
                    {"op": "remove", "path": f"/spec/rules/0/backendRefs/{third}"},
                ]
            w = int(refs[third].get("weight", 1))
            new = self.rng.choice([x for x in range(1, 21) if x != w])
            return [
                {"op": "test", "path": f"/spec/rules/0/backendRefs/{third}/name", "value": spec.third},
                {"op": "replace", "path": f"/spec/rules/0/backendRefs/{third}/weight", "value": new},
            ]

        return [("label", label), ("annotation", annotation), ("path", path), ("backend", backend)]

    # --- one edit --------------------------------------------------------------------------
    async def edit_one(self, name: str) -> None:
        spec = self.routes[name]
        try:
            obj: dict[str, Any] = await self.co.get_namespaced_custom_object(
                GATEWAY_GROUP, GATEWAY_VERSION, self.namespace, HTTPROUTES, name, _request_timeout=REQUEST_TIMEOUT_S
            )
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError):
            self.get_errors += 1
            return
        self._n += 1
        before = foreign_of(obj, spec.stable, spec.canary)
        for _ in range(8):
            what, make = self.rng.choice(self._edits(obj, spec))
            ops = make()
            intended = foreign_of(apply_patch(obj, ops), spec.stable, spec.canary)
            if intended != before:
                break
        else:
            return
        base_rv = int(obj["metadata"]["resourceVersion"])
        guarded = [{"op": "test", "path": "/metadata/resourceVersion", "value": str(base_rv)}, *ops]
        self.kinds[what] += 1
        outcome, result_rv = await self._send(name, guarded)
        self.outcomes[outcome] += 1
        self.attempts.append(EditAttempt(name, base_rv, intended, what, outcome, result_rv))
        if outcome == "applied" and result_rv is not None:
            self.last_confirmed[name] = (result_rv, intended)

    async def _send(self, name: str, ops: list[dict[str, Any]]) -> tuple[str, int | None]:
        options: dict[str, Any] = {"_content_type": JSON_PATCH}  # a client option the typed signature leaves out
        try:
            out: dict[str, Any] = await self.co.patch_namespaced_custom_object(
                GATEWAY_GROUP,
                GATEWAY_VERSION,
                self.namespace,
                HTTPROUTES,
                name,
                ops,
                field_manager="chaos-editor",
                _request_timeout=REQUEST_TIMEOUT_S,
                **options,
            )
            return "applied", int(out["metadata"]["resourceVersion"])
        except ApiException as exc:
            if exc.status in (409, 422):
                return "conflict", None
            return "uncertain", None  # 5xx/timeouts from the apiserver: the write may have landed
        except aiohttp.ClientConnectorError:
            return "error", None  # nothing was sent
        except (aiohttp.ClientError, OSError, TimeoutError):
            return "uncertain", None

    async def run(self, stop: asyncio.Event) -> None:
        period = 1.0 / self.rate_hz
        while not stop.is_set():
            t0 = time.monotonic()
            if self.available:
                await self.edit_one(self.rng.choice(self.available))
            left = period - (time.monotonic() - t0)
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), left)
