"""The one place that talks HTTP to Prometheus.

prometheus-api-client is synchronous (requests), so each query runs in a bounded thread pool
(``max_concurrency``) under an asyncio timeout. The answer is parsed in that worker thread too,
never on the event loop: ``query`` returns ``Sample``s, ``query_reduce`` hands the raw
``(labels, value)`` pairs to a reducer so a big answer (tens of thousands of histogram buckets)
becomes a compact structure without one object per sample. Every failure becomes a one-line
``MetricsError``, cause first — ``Prometheus at http://…: connection refused`` — which callers
turn into an ERROR observation (and so into Events and the status message). The PromQL never
goes into that line (the client library's messages carry it URL-encoded): it is logged as a
field. An outage (no answer, a timeout, a 5xx) is logged once, as ``prometheus_unreachable``,
and its end as ``prometheus_recovered``; a refused query is logged each time it happens.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import requests
import structlog
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util.retry import Retry

from canaryd.errors import MetricsError
from canaryd.settings import PrometheusSettings

log = structlog.get_logger()

R = TypeVar("R")
Reducer = Callable[[Iterator[tuple[Mapping[str, str], float]]], R]
"""Consumes an answer's ``(labels, value)`` pairs (NaN skipped) in the worker thread."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant-vector answer."""

    labels: dict[str, str]
    value: float


class PrometheusClient:
    """Async facade over ``PrometheusConnect.custom_query`` with auth, TLS and a query counter."""

    def __init__(self, settings: PrometheusSettings) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.queries_issued = 0
        """Queries sent (successful or not); tests and metrics read it to check batching."""
        self._lock = threading.Lock()
        self._token_cache: tuple[float, str] | None = None
        self._outage = 0  # failed queries since the outage began (0 = Prometheus answers)
        session = requests.Session()
        if settings.insecure_skip_verify:
            session.verify = False
        elif settings.ca_file:
            session.verify = settings.ca_file
        auth: tuple[str, str] | None = None
        if settings.basic_auth_user:
            auth = (settings.basic_auth_user, _read_secret(settings.basic_auth_password_file))
        # No retries inside the client: a failed round is reported as ERROR and the engine's
        # next round is the retry; retries here would only stretch the round past its timeout.
        self._prom = PrometheusConnect(
            url=self.url,
            headers=dict(settings.headers),
            session=session,
            auth=auth,
            retry=Retry(total=0, raise_on_status=False),
            timeout=settings.timeout_s,
        )
        self._gate = asyncio.Semaphore(max(1, settings.max_concurrency))
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.max_concurrency), thread_name_prefix="prometheus-query"
        )

    async def query(self, promql: str) -> list[Sample]:
        """Run an instant query; raise ``MetricsError`` on any failure."""
        return await self.query_reduce(promql, _samples)

    async def query_reduce(self, promql: str, reduce: Reducer[R]) -> R:
        """Run an instant query and ``reduce`` its samples in the worker thread.

        ``reduce`` gets the answer's label mappings as decoded (read-only: do not keep or
        mutate them) and must not touch event-loop state. ``MetricsError`` on any failure.
        """
        # Queue here, not in the pool: the timeout must measure Prometheus, not our own backlog.
        async with self._gate:
            return await self._query(promql, reduce)

    async def _query(self, promql: str, reduce: Reducer[R]) -> R:
        with self._lock:
            self.queries_issued += 1
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._query_sync, promql, reduce)
        try:
            raw = await asyncio.wait_for(fut, timeout=self.settings.timeout_s)
        except TimeoutError:
            self._failed(promql, f"no answer within {self.settings.timeout_s:g}s", outage=True)
        except MetricsError as exc:  # the answer could not be used (raised by the reducer)
            self._failed(promql, str(exc), outage=False, prefixed=True)
        except Exception as exc:  # requests / API client errors of every kind
            cause, outage = describe(exc, self.settings.timeout_s)
            self._failed(promql, cause, outage=outage, exc=exc)
        if self._outage:
            log.info("prometheus_recovered", url=self.url, failed_queries=self._outage)
            self._outage = 0
        return raw

    def _failed(
        self, promql: str, cause: str, *, outage: bool, prefixed: bool = False, exc: BaseException | None = None
    ) -> NoReturn:
        """Log (an outage once) and raise the one-line error; the query goes to the log only."""
        message = cause if prefixed else f"Prometheus at {self.url}: {cause}"
        if not outage:
            log.warning("prometheus_query_failed", url=self.url, error=message, query=promql)
        elif self._outage == 0:
            log.warning("prometheus_unreachable", url=self.url, error=message, query=promql)
        if outage:
            self._outage += 1
        raise MetricsError(message, query=promql) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._prom.close()

    def _query_sync(self, promql: str, reduce: Reducer[R]) -> R:
        token = self._bearer_token()
        if token:
            # The API client passes self.headers on each request; replacing the dict is atomic.
            self._prom.headers = {**self.settings.headers, "Authorization": f"Bearer {token}"}
        raw = self._prom.custom_query(promql, params={"timeout": f"{self.settings.timeout_s:g}s"})
        return reduce(iter_samples(raw, self.url))

    def _bearer_token(self) -> str | None:
        if self.settings.bearer_token_file:
            # Projected service-account tokens rotate: re-read when the file changes.
            path = self.settings.bearer_token_file
            try:
                mtime = os.stat(path).st_mtime
                if self._token_cache is None or self._token_cache[0] != mtime:
                    self._token_cache = (mtime, Path(path).read_text().strip())
            except OSError as exc:
                raise MetricsError(
                    f"Prometheus at {self.url}: cannot read bearer_token_file {path} ({exc.strerror or exc})"
                ) from exc
            return self._token_cache[1]
        return self.settings.bearer_token


def _read_secret(path: str | None) -> str:
    if not path:
        raise MetricsError("basic_auth_user is set but basic_auth_password_file is not")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise MetricsError(f"cannot read Prometheus password file {path}: {exc}") from exc


def iter_samples(raw: Any, url: str) -> Iterator[tuple[Mapping[str, str], float]]:
    """Validate an instant-vector answer lazily: ``(labels, value)`` per sample, NaN skipped."""
    if not isinstance(raw, list):
        raise MetricsError(f"Prometheus at {url}: unexpected result type (not an instant vector)")
    for item in raw:
        try:
            labels = item["metric"]
            if not isinstance(labels, dict):
                raise TypeError("metric is not an object")
            value = float(item["value"][1])  # "NaN", "+Inf" parse as floats
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise MetricsError(f"Prometheus at {url}: malformed sample in the answer: {_short(repr(item))}") from exc
        if math.isnan(value):
            continue  # 0/0 inside the query: no information, not zero
        yield labels, value


def _samples(pairs: Iterator[tuple[Mapping[str, str], float]]) -> list[Sample]:
    return [Sample({str(k): str(v) for k, v in labels.items()}, value) for labels, value in pairs]


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: chained exceptions, urllib3's ``reason``, exceptions in ``args``."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        wrapped = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo += [w for w in wrapped if isinstance(w, BaseException)]


_HTTP_STATUS = re.compile(r"HTTP Status Code (\d+) \((.*)\)$", re.S)


def describe(exc: BaseException, timeout_s: float) -> tuple[str, bool]:
    """The cause of a failed query in a few words, and whether it is an outage (no usable answer).

    Never the request URL: the client library's own messages carry the URL-encoded query.
    """
    if isinstance(exc, PrometheusApiClientException):
        return _http_error(str(exc))
    for e in _causes(exc):
        if isinstance(e, ConnectionRefusedError):
            return "connection refused", True
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host name ({e.strerror or e})", True
        if isinstance(e, ssl.SSLError | Urllib3SSLError):
            return f"TLS handshake failed ({_short(getattr(e, 'reason', None) or str(e), 120)})", True
        if isinstance(e, TimeoutError | requests.Timeout):
            return f"no answer within {timeout_s:g}s", True
        if isinstance(e, requests.exceptions.JSONDecodeError):
            return "the answer is not JSON; is the URL Prometheus' base URL?", False
        if isinstance(e, OSError) and e.strerror:
            return e.strerror[:1].lower() + e.strerror[1:], True
    if isinstance(exc, requests.ConnectionError):
        return "connection failed", True
    if isinstance(exc, KeyError | TypeError):
        return "the answer has no data.result; is the URL Prometheus' base URL?", False
    # Anything else: its type and text, without a URL (which would carry the query).
    text = re.sub(r"(?:url: )?/api/v1/\S*", "", str(exc))
    return _short(f"{type(exc).__name__}: {text}" if text.strip() else type(exc).__name__), True


def _http_error(text: str) -> tuple[str, bool]:
    """``HTTP Status Code 400 (b'{"status":"error",...}')`` -> ``HTTP 400 bad_data: <error>``."""
    m = _HTTP_STATUS.match(text)
    if m is None:
        return _short(text), True
    code = int(m[1])
    try:
        body = ast.literal_eval(m[2])
        content = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    except (ValueError, SyntaxError):
        content = m[2]
    try:
        doc = json.loads(content)
        detail = f"{doc.get('errorType', 'error')}: {doc.get('error', '')}" if isinstance(doc, dict) else content
    except ValueError:
        detail = content or "(empty body)"
    hint = "; is the URL Prometheus' base URL?" if code == 404 else ""
    return f"HTTP {code} {_short(detail)}{hint}", code >= 500
