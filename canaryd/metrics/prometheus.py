"""The one place that talks HTTP to Prometheus.

prometheus-api-client is synchronous (requests), so each query runs in a bounded thread pool
(``max_concurrency``) under an asyncio timeout. The answer is parsed in that worker thread too,
never on the event loop: ``query`` returns ``Sample``s, ``query_reduce`` hands the raw
``(labels, value)`` pairs to a reducer so a big answer (tens of thousands of histogram buckets)
becomes a compact structure without one object per sample. Every failure becomes
``MetricsError`` with a message naming Prometheus and its URL; callers turn it into an ERROR
observation.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
import structlog
from prometheus_api_client import PrometheusConnect
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
            raise MetricsError(f"Prometheus at {self.url} did not answer within {self.settings.timeout_s:g}s") from None
        except MetricsError:
            raise
        except Exception as exc:  # requests / API client errors of every kind
            raise MetricsError(f"Prometheus at {self.url} query failed: {_short(exc)}") from exc
        return raw

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
            mtime = os.stat(path).st_mtime
            if self._token_cache is None or self._token_cache[0] != mtime:
                self._token_cache = (mtime, Path(path).read_text().strip())
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
        raise MetricsError(f"Prometheus at {url} answered with an unexpected result type")
    for item in raw:
        try:
            labels = item["metric"]
            if not isinstance(labels, dict):
                raise TypeError("metric is not an object")
            value = float(item["value"][1])  # "NaN", "+Inf" parse as floats
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise MetricsError(f"Prometheus at {url} answered with a malformed sample: {item!r}") from exc
        if math.isnan(value):
            continue  # 0/0 inside the query: no information, not zero
        yield labels, value


def _samples(pairs: Iterator[tuple[Mapping[str, str], float]]) -> list[Sample]:
    return [Sample({str(k): str(v) for k, v in labels.items()}, value) for labels, value in pairs]


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."
