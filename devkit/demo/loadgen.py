"""Fixed-rate HTTP load against one URL, counting answers per backend and per status.

Request i is sent at ``start + i / rate`` for ``i < int(rate * duration)`` (a bounded loop; at
most ``concurrency`` in flight — when the target is slower, sends are late, never dropped).
The backend of an answer is read from a response header (``x-canaryd-backend`` by default, as
set by the demo data plane); answers without it count as ``"-"``. A request that got no HTTP
answer (connection refused/reset, timeout) counts as an *error* with status ``"error:<kind>"``.

The optional timeline groups results by the second the request was *sent*, so a caller that
changes weights at time t can read the share each backend served before and after t.

Run as ``python -m devkit.demo.loadgen --url http://127.0.0.1:8080/ --rate 50 --duration 10``;
it prints the summary as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import aiohttp
import structlog

log = structlog.get_logger("devkit.demo.loadgen")

BACKEND_HEADER = "x-canaryd-backend"
NO_BACKEND = "-"
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Result:
    """One request: sent ``t`` seconds after the start."""

    t: float
    backend: str
    status: str  # "200", "503", ... or "error:<kind>" when there was no HTTP answer
    latency_ms: float

    @property
    def answered(self) -> bool:
        return not self.status.startswith("error:")


@dataclass
class LoadSummary:
    url: str
    rate: float
    duration_s: float
    sent: int = 0
    answered: int = 0
    errors: int = 0  # no HTTP answer at all
    elapsed_s: float = 0.0
    by_backend: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    by_backend_status: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    # second (int, by send time) -> backend -> count; only when timeline=True
    timeline: dict[int, dict[str, int]] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list, repr=False)  # only when keep_results=True

    def share(self, backend: str, *, since: float = 0.0, until: float = float("inf")) -> float:
        """Fraction of answered requests sent in [since, until) that ``backend`` served.

        Needs ``keep_results=True`` unless the whole run is asked for.
        """
        if since <= 0.0 and until == float("inf"):
            return self.by_backend.get(backend, 0) / self.answered if self.answered else 0.0
        window = [r for r in self.results if since <= r.t < until and r.answered]
        if not window:
            return 0.0
        return sum(1 for r in window if r.backend == backend) / len(window)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("results")
        d["timeline"] = {str(k): v for k, v in sorted(self.timeline.items())}
        return json.dumps(d, sort_keys=True)


async def run_load(  # noqa: C901 - a load loop with its bookkeeping inline for speed
    url: str,
    *,
    rate: float,
    duration_s: float,
    concurrency: int = 32,
    timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
    backend_header: str = BACKEND_HEADER,
    timeline: bool = False,
    keep_results: bool = False,
    on_result: Callable[[Result], None] | None = None,
) -> LoadSummary:
    """Send ``int(rate * duration_s)`` GETs to ``url`` at a fixed rate; return the summary."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be > 0")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    host = urlsplit(url).hostname or ""
    if host not in _LOCAL_HOSTS:
        raise ValueError(f"{url}: the demo load generator only targets 127.0.0.1/localhost")
    total = int(rate * duration_s)
    summary = LoadSummary(url=url, rate=rate, duration_s=duration_s)
    latencies: list[float] = []
    by_backend: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    per_backend_status: dict[str, Counter[str]] = {}
    per_second: dict[int, Counter[str]] = {}
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)

    def record(res: Result) -> None:
        summary.sent += 1
        by_status[res.status] += 1
        if res.answered:
            summary.answered += 1
            latencies.append(res.latency_ms)
            by_backend[res.backend] += 1
            per_backend_status.setdefault(res.backend, Counter())[res.status] += 1
            if timeline:
                per_second.setdefault(int(res.t), Counter())[res.backend] += 1
        else:
            summary.errors += 1
        if keep_results:
            summary.results.append(res)
        if on_result is not None:
            on_result(res)

    async def one(session: aiohttp.ClientSession, t: float) -> None:
        try:
            began = loop.time()
            try:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    res = Result(
                        t=t,
                        backend=resp.headers.get(backend_header, NO_BACKEND),
                        status=str(resp.status),
                        latency_ms=(loop.time() - began) * 1000.0,
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                res = Result(
                    t=t,
                    backend=NO_BACKEND,
                    status=f"error:{type(exc).__name__}",
                    latency_ms=(loop.time() - began) * 1000.0,
                )
            record(res)
        finally:
            slots.release()

    start = loop.time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        for i in range(total):  # bounded: exactly `total` requests
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            sent_at = loop.time() - start
            tasks.append(asyncio.create_task(one(session, sent_at), name=f"loadgen-{i}"))
        if tasks:
            await asyncio.wait(tasks)
    summary.elapsed_s = loop.time() - start
    summary.by_backend = dict(by_backend)
    summary.by_status = dict(by_status)
    summary.by_backend_status = {b: dict(c) for b, c in per_backend_status.items()}
    summary.timeline = {s: dict(c) for s, c in sorted(per_second.items())}
    if latencies:
        latencies.sort()
        summary.latency_ms_p50 = _quantile(latencies, 0.5)
        summary.latency_ms_p99 = _quantile(latencies, 0.99)
    log.info(
        "load_done",
        url=url,
        sent=summary.sent,
        answered=summary.answered,
        errors=summary.errors,
        by_backend=summary.by_backend,
        elapsed_s=round(summary.elapsed_s, 3),
    )
    return summary


def _quantile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def main(argv: list[str] | None = None) -> int:
    from devkit.demo.whoami import configure_logging

    p = argparse.ArgumentParser(prog="python -m devkit.demo.loadgen", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--url", required=True, help="target, e.g. http://127.0.0.1:8080/")
    p.add_argument("--rate", type=float, default=50.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    p.add_argument("--header", action="append", default=[], metavar="K:V", help="extra request header")
    p.add_argument("--timeline", action="store_true", help="include per-second counts per backend")
    args = p.parse_args(argv)
    configure_logging()
    hdrs = dict(h.split(":", 1) for h in args.header)
    summary = asyncio.run(
        run_load(
            args.url,
            rate=args.rate,
            duration_s=args.duration,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            headers={k.strip(): v.strip() for k, v in hdrs.items()},
            timeline=args.timeline,
        )
    )
    print(summary.to_json(), flush=True)
    return 0 if summary.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
