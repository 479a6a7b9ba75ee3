"""List-then-watch caches with resourceVersion resumption, bookmarks and 410-Gone relist.

One ``Informer`` per resource kind keeps ``{(namespace, name): object}`` current and calls
``on_change(key, obj_or_None)`` for every add/update/delete. Watches restart where they left
off; when the apiserver says the version is too old (410) it relists and replays the difference.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.kube import translate

log = structlog.get_logger("canaryd.informer")

Key = tuple[str, str]
ListFn = Callable[..., Awaitable[Any]]
OnChange = Callable[[Key, dict[str, Any] | None], None]


def raw(fn: ListFn) -> ListFn:
    """Wrap a list function so lists and watch events stay plain dicts (no model objects).

    Deserializing every EndpointSlice into generated models costs more CPU than the rest of
    the controller; a wrapper without a docstring makes the Watch skip it.
    """

    async def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("watch"):
            return await fn(*args, **kwargs)
        resp = await fn(*args, _preload_content=False, **kwargs)
        try:
            body = await resp.read()
        finally:
            resp.release()
        # Without preloading the client skips its status check: a 403 body must not read as "no items".
        if not 200 <= resp.status <= 299:
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body = body
            raise exc
        return json.loads(body)

    return call


def _to_dict(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TypeError(f"informers take raw() list functions that return dicts, got {type(obj).__name__}")
    return obj


class Informer:
    def __init__(
        self,
        name: str,
        list_fn: ListFn,
        list_args: tuple[Any, ...] = (),
        *,
        on_change: OnChange,
        label_selector: str | None = None,
        timeout_s: int = 300,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self._list = list_fn
        self._args = list_args
        self._on_change = on_change
        self._selector = label_selector
        self._timeout = timeout_s
        self._transform = transform or (lambda o: o)
        self.cache: dict[Key, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.relists = 0

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self._selector:
            kw["label_selector"] = self._selector
        return kw

    @staticmethod
    def _key(obj: dict[str, Any]) -> Key:
        meta = obj["metadata"]
        return (meta.get("namespace", ""), meta["name"])

    async def _relist(self) -> str:
        self.relists += 1
        resp = _to_dict(await self._list(*self._args, **self._kwargs()))
        fresh = {self._key(o): self._transform(_to_dict(o)) for o in resp.get("items", [])}
        for key in [k for k in self.cache if k not in fresh]:
            del self.cache[key]
            self._on_change(key, None)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._on_change(key, obj)
        self.synced.set()
        return str(resp["metadata"]["resourceVersion"])

    async def run(self) -> None:
        try:
            rv = await self._relist()
        except ApiException as exc:
            raise translate(exc, f"list {self.name}") from exc
        backoff = 0.5
        while True:
            w = watch.Watch()
            try:
                async for ev in w.stream(
                    self._list,
                    *self._args,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self._timeout,
                    **self._kwargs(),
                ):
                    kind = ev["type"]
                    raw = ev.get("raw_object") or _to_dict(ev["object"])
                    if kind == "ERROR":
                        if raw.get("code") == 410:
                            raise ApiException(status=410, reason="Gone")
                        raise ApiException(status=raw.get("code", 500), reason=raw.get("message", "watch error"))
                    rv = raw["metadata"].get("resourceVersion", rv)
                    if kind == "BOOKMARK":
                        continue
                    obj = self._transform(raw)
                    key = self._key(obj)
                    if kind == "DELETED":
                        self.cache.pop(key, None)
                        self._on_change(key, None)
                    else:
                        self.cache[key] = obj
                        self._on_change(key, obj)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch_expired_relisting", informer=self.name)
                    rv = await self._relist()
                    continue
                log.warning("watch_failed", informer=self.name, error=str(translate(exc, f"watch {self.name}")))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
                rv = await self._relist()
            except (TimeoutError, OSError, ValueError) as exc:
                log.warning("watch_failed", informer=self.name, error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
                try:
                    rv = await self._relist()
                except Exception as exc2:
                    log.warning("relist_failed", informer=self.name, error=repr(exc2))
            finally:
                await w.close()  # each Watch owns an ApiClient (and an HTTP session)
