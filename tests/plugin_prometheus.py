"""Pytest plugin: a real Prometheus for the session and a fake exporter per test.

Register with ``pytest_plugins = ["tests.plugin_prometheus"]`` (or ``-p tests.plugin_prometheus``).
A missing prometheus binary fails the tests (never skips): install it with apt-get.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from devkit.devstack.exporter import MetricsExporter
from devkit.devstack.prometheus import PrometheusServer

_jobs = itertools.count(1)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), scrape_interval="1s")
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def exporter(prometheus: PrometheusServer) -> AsyncIterator[MetricsExporter]:
    exp = MetricsExporter()
    await exp.start()
    job = f"exporter-{next(_jobs)}"
    prometheus.add_target(job, exp.address)
    try:
        await prometheus.wait_target_up(job, timeout=30)
        yield exp
    finally:
        prometheus.remove_target(job)
        await exp.stop()
