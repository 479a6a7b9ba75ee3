"""``python -m devkit.bench.promql_cost``: what one batched envoy query costs Prometheus, by batch size.

Serves ``routes`` routes' Envoy series (2 clusters each) from the synthetic exporter, lets
Prometheus (1 s scrape) collect a window, then times the analyzer's request query with the
regex union of a chunk of N routes against a coarse per-namespace selector.
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

from canaryd.metrics import promql
from canaryd.metrics.envoy import cluster_pattern
from canaryd.settings import PrometheusSettings
from devkit.bench.harness import cluster_name
from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer

_SUM = "sum by (envoy_cluster_name, envoy_response_code) "


def _query(url: str, expr: str) -> tuple[float, int]:
    t = time.perf_counter()
    data = urllib.parse.urlencode({"query": expr}).encode()
    with urllib.request.urlopen(url + "/api/v1/query", data=data, timeout=120) as r:
        out = json.load(r)
    return time.perf_counter() - t, len(out["data"]["result"])


async def main(routes: int = 1000) -> dict[str, object]:
    ns = "cost"
    tmpl = PrometheusSettings().envoy_cluster_pattern
    exp = MetricsExporter()
    work = Path(tempfile.mkdtemp(prefix="canaryd-promql-"))
    prom = PrometheusServer(work, scrape_interval="1s")
    out: dict[str, object] = {"routes": routes}
    try:
        await exp.start()
        for i in range(routes):
            for v in ("v1", "v2"):
                exp.set_backend(cluster_name(ns, f"r{i:04d}", f"r{i:04d}-{v}"), rps=10)
        await asyncio.to_thread(prom.start, timeout=60)
        prom.add_target("cost", exp.address)
        await prom.wait_target_up("cost", timeout=60)
        await asyncio.sleep(12)
        for n in (50, 200, 1000):
            pats = [
                cluster_pattern(tmpl, namespace=ns, service=f"r{i:04d}-{v}", port=80, parent=f"r{i:04d}")
                for i in range(n)
                for v in ("v1", "v2")
            ]
            sel = f"envoy_cluster_name=~{promql.string_literal(promql.regex_union(pats))}"
            expr = f"{_SUM}(increase(envoy_cluster_upstream_rq{{{sel}}}[10s]))"
            out[f"union_{n}_routes_s"] = round((await asyncio.to_thread(_query, prom.url, expr))[0], 3)
        coarse = f'{_SUM}(increase(envoy_cluster_upstream_rq{{envoy_cluster_name=~"{ns}/.*"}}[10s]))'
        out["namespace_prefix_all_routes_s"] = round((await asyncio.to_thread(_query, prom.url, coarse))[0], 3)
    finally:
        prom.stop()
        await exp.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)), indent=2))
