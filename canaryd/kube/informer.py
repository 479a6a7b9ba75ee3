"""The one watch primitive: list (in pages), then watch from the list's resourceVersion, relist on 410 or any failure.

One ``Informer`` per resource kind keeps ``{(namespace, name): object}`` current and calls
``on_change(key, obj_or_None)`` for every add/update/delete. It serves the engine, ``canaryd status
--watch/--wait`` and the demo's data plane alike, with one error policy:

- ``retry`` (controllers): every list or watch failure — an apiserver restart, a dropped connection,
  a truncated chunk, a TLS reset, 5xx, 403 while RBAC is being fixed, 404 while the resource's CRD
  is missing — is retried with capped exponential backoff and a relist. The first failure of an
  episode is logged as ``watch_failed`` with its cause (again only if the cause changes, e.g. a
  dropped stream, then 404), the recovery as ``watch_recovered``: an outage is two or three lines.
- ``raise`` (CLI): the first failure is raised as a ``KubeError`` (one ``error:`` line for a person).

A 410 Gone (the resourceVersion was compacted) is not a failure under either policy: it relists.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NoReturn

import structlog
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.errors import GoneError, KubeError, NotFoundError
from canaryd.kube.errors import translate

log = structlog.get_logger("canaryd.kube.informer")

Key = tuple[str, str]
ListFn = Callable[..., Awaitable[Any]]
OnChange = Callable[[Key, dict[str, Any] | None], None]
ErrorPolicy = Literal["retry", "raise"]

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 15.0
LIST_PAGE = 100  # objects per list request (a 410 on an expired continue token relists like any 410)


def raw(fn: ListFn) -> ListFn:
    """Wrap a typed client's list function (``CoreV1Api.list_namespaced_config_map``) so lists and watch
    events stay plain dicts (no model objects), as ``canaryd.kube.api.lister``'s functions are.

    Deserializing every EndpointSlice into generated models costs more CPU than the rest of
    the controller.
    """

    async def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("watch"):
            resp = await fn(*args, _preload_content=False, **kwargs)
            if not 200 <= resp.status <= 299:  # e.g. 404 once the CRD is gone: not a stream of events
                _refused(resp, await _body(resp))
            return resp
        resp = await fn(*args, _preload_content=False, **kwargs)
        body = await _body(resp)
        # Without preloading the client skips its status check: a 403 body must not read as "no items".
        if not 200 <= resp.status <= 299:
            _refused(resp, body)
        return json.loads(body)

    return call


async def _body(resp: Any) -> bytes:
    try:
        body: bytes = await resp.read()
        return body
    finally:
        resp.release()


def _refused(resp: Any, body: bytes) -> NoReturn:
    exc = ApiException(status=resp.status, reason=resp.reason)
    exc.body = body
    raise exc


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
        field_selector: str | None = None,
        timeout_s: int = 300,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        on_error: ErrorPolicy = "retry",
    ) -> None:
        self.name = name
        self._list = list_fn
        self._args = list_args
        self._on_change = on_change
        self._label_selector = label_selector
        self._field_selector = field_selector
        self._timeout = timeout_s
        self._transform = transform or (lambda o: o)
        self._policy = on_error
        self.cache: dict[Key, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.relists = 0
        self.failures = 0  # failed list/watch attempts (each retried)
        self._failing: set[tuple[type[KubeError], int | None]] = set()  # causes logged this episode

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self._label_selector:
            kw["label_selector"] = self._label_selector
        if self._field_selector:
            kw["field_selector"] = self._field_selector
        return kw

    @staticmethod
    def _key(obj: dict[str, Any]) -> Key:
        meta = obj["metadata"]
        return (meta.get("namespace", ""), meta["name"])

    async def _relist(self) -> str:
        self.relists += 1
        fresh: dict[Key, dict[str, Any]] = {}
        token: str | None = None
        while True:  # in pages: only one page's full objects are alive at a time, before ``transform``
            page = {**self._kwargs(), "limit": LIST_PAGE, **({"_continue": token} if token else {})}
            resp = _to_dict(await self._list(*self._args, **page))
            fresh.update((self._key(o), self._transform(_to_dict(o))) for o in resp.get("items", []))
            token = resp["metadata"].get("continue")
            if not token:  # the last page's resourceVersion is the whole list's (one snapshot)
                break
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

    async def _watch(self, rv: str) -> str:
        """Stream events from ``rv`` until the server ends the watch; returns the last resourceVersion."""
        resp = await self._list(
            *self._args,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self._timeout,
            **self._kwargs(),
        )
        try:
            while line := await resp.content.readline():  # one JSON event per line; b"" when the server ends it
                rv = self._event(line, rv)
            return rv
        finally:
            resp.release()

    def _event(self, line: bytes, rv: str) -> str:
        """Apply one watch event to the cache; returns the resourceVersion to resume from."""
        try:
            ev = json.loads(line)
            kind, obj = ev["type"], _to_dict(ev["object"])
        except (ValueError, KeyError, TypeError):  # a truncated or foreign line: relist rather than guess
            text = line.decode(errors="replace").strip()[:100]
            raise KubeError(f"watch {self.name}: the stream ended with {text!r}, not an event") from None
        if kind == "ERROR":
            code = int(obj.get("code") or 500)
            if code == 410:
                raise GoneError(f"watch {self.name}: resourceVersion {rv} is too old", status=410)
            raise KubeError(f"watch {self.name}: {obj.get('message', 'watch error')}", status=code, body=obj)
        rv = str(obj.get("metadata", {}).get("resourceVersion", rv))
        if kind == "BOOKMARK":
            return rv
        obj = self._transform(obj)
        key = self._key(obj)
        if kind == "DELETED":
            self.cache.pop(key, None)
            self._on_change(key, None)
        else:
            self.cache[key] = obj
            self._on_change(key, obj)
        return rv

    async def run(self) -> None:
        """Keep the cache current until cancelled (policy ``retry``) or the first failure (``raise``)."""
        rv: str | None = None
        backoff = BACKOFF_START_S
        while True:
            try:
                if rv is None:
                    rv = await self._relist()
                    self._recovered()
                rv = await self._watch(rv)
                backoff = BACKOFF_START_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure of the cluster's weather: retry or raise, never die silently
                err = self._error(exc)
                rv = None  # relist: events may have been missed
                if isinstance(err, GoneError):
                    log.info("watch_expired_relisting", informer=self.name)
                    continue
                if self._policy == "raise":
                    raise err from exc
                self._failed(err)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _error(self, exc: BaseException) -> KubeError:
        translated = translate(exc, f"watch {self.name}")
        if isinstance(translated, NotFoundError):
            resource = self.name.split("/")[0]
            return KubeError(
                f"watch {self.name}: the apiserver does not serve {resource} (404 Not Found); is its "
                "CustomResourceDefinition installed? canaryd retries until it is",
                status=404,
                body=translated.body,
            )
        return translated if isinstance(translated, KubeError) else KubeError(str(translated))

    def _failed(self, err: KubeError) -> None:
        self.failures += 1
        cause = (type(err), err.status)
        if cause not in self._failing:  # once per episode, and once more for each new kind of cause
            self._failing.add(cause)
            log.warning("watch_failed", informer=self.name, error=str(err), status=err.status, failures=self.failures)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = set()
            log.info("watch_recovered", informer=self.name, failures=self.failures)
