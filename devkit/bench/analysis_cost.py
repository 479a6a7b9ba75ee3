"""``python -m devkit.bench.analysis_cost [routes]``: what one envoy analysis answer costs, query by query.

Serves ``routes`` routes' Envoy series (2 clusters each, Envoy's 16 latency buckets) from the synthetic
exporter, lets Prometheus (1 s scrape) collect a window, then, three times each: the envoy signal's two
namespace-wide queries as raw HTTP (Prometheus plus transfer, then ``json.loads``: the decode holds the
GIL in the analyzer's worker thread), and ``EnvoySignal.fetch`` as the daemon runs it (both queries,
decoded and reduced). Times are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from canaryd.metrics.envoy import EnvoySignal
from canaryd.metrics.prometheus import PrometheusClient
from canaryd.settings import PrometheusSettings
from devkit.bench.harness import cluster_name
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer

NS = "cost"
SELECTOR = f'envoy_cluster_name=~"{NS}/.*"'
QUERIES = {
    "requests": "sum by (envoy_cluster_name, envoy_response_code) "
    f"(increase(envoy_cluster_upstream_rq{{{SELECTOR}}}[10s]))",
    "latency": f"sum by (envoy_cluster_name, le) (rate(envoy_cluster_upstream_rq_time_bucket{{{SELECTOR}}}[10s]))",
}


def _raw(url: str, expr: str) -> dict[str, float]:
    t0 = time.perf_counter()
    data = urllib.parse.urlencode({"query": expr}).encode()
    with urllib.request.urlopen(url + "/api/v1/query", data=data, timeout=120) as r:
        body = r.read()
    t1 = time.perf_counter()
    doc = json.loads(body)
    t2 = time.perf_counter()
    return {
        "prometheus_and_transfer_s": round(t1 - t0, 3),
        "json_decode_s": round(t2 - t1, 3),
        "bytes": len(body),
        "samples": len(doc["data"]["result"]),
    }


async def main(routes: int = 1000) -> dict[str, Any]:
    exp = MetricsExporter()
    work = Path(tempfile.mkdtemp(prefix="canaryd-analysis-cost-"))
    prom = PrometheusServer(work, scrape_interval="1s")
    out: dict[str, Any] = {"routes": routes, "series_per_route": "2 clusters x (requests + 16 buckets)"}
    try:
        await exp.start()
        for i in range(routes):
            for v in ("v1", "v2"):
                exp.set_backend(cluster_name(NS, f"r{i:04d}", f"r{i:04d}-{v}"), rps=10, error_ratio=0.0, latency_ms=20)
        await asyncio.to_thread(prom.start, timeout=60)
        prom.add_target("cost", exp.address)
        await prom.wait_target_up("cost", timeout=60)
        await asyncio.sleep(12)
        for name, expr in QUERIES.items():
            out[name] = [await asyncio.to_thread(_raw, prom.url, expr) for _ in range(3)]
        settings = PrometheusSettings(url=prom.url)
        client, signal = PrometheusClient(settings), EnvoySignal(settings)
        fetch = []
        for _ in range(3):
            t0 = time.perf_counter()
            await signal.fetch(client, 10.0, frozenset({NS}))
            fetch.append(round(time.perf_counter() - t0, 3))
        out["envoy_fetch_s"] = fetch
        client.close()
    finally:
        prom.stop()
        await exp.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)), indent=2))
