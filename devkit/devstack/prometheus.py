"""A real Prometheus server (Debian's ``/usr/bin/prometheus``) for tests, the demo and benchmarks.

Listens on 127.0.0.1 on a free port and scrapes targets listed in file_sd JSON files under
``<data_dir>/targets/``, so ``add_target`` can register a scrape target while it runs (also
from another process: it is only a file). Startup is kept short: local TSDB, 1 s scrapes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import structlog

from devkit import DevstackError

log = structlog.get_logger()

DEFAULT_BINARY = "/usr/bin/prometheus"


def find_binary(explicit: str | None = None) -> str:
    candidate = explicit or os.environ.get("CANARYD_PROMETHEUS_BINARY")
    if candidate:
        if not os.access(candidate, os.X_OK):
            raise DevstackError(f"Prometheus binary {candidate} is missing or not executable")
        return candidate
    found = shutil.which("prometheus") or (DEFAULT_BINARY if os.access(DEFAULT_BINARY, os.X_OK) else None)
    if not found:
        raise DevstackError(
            "the prometheus binary was not found on PATH or at /usr/bin/prometheus; "
            "install it with 'sudo apt-get install prometheus' (or set CANARYD_PROMETHEUS_BINARY)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrometheusServer:
    """One Prometheus process. ``start()`` returns once it answers ``/-/ready``."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        scrape_interval: str = "1s",
        detach: bool = False,
        binary: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.scrape_interval = scrape_interval
        self.detach = detach  # survive this Python process (CLI 'devstack up'); stop by pid
        self._binary = binary
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise DevstackError("Prometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise DevstackError("Prometheus is not started")
        return self._proc.pid

    @property
    def targets_dir(self) -> Path:
        return self._dir() / "targets"

    @property
    def log_file(self) -> Path:
        return self._dir() / "prometheus.log"

    def start(
        self,
        data_dir: Path | None = None,
        scrape_interval: str | None = None,
        *,
        timeout: float = 30.0,
    ) -> PrometheusServer:
        if self._proc is not None:
            raise DevstackError(f"Prometheus already running at {self.url}")
        if data_dir is not None:
            self.data_dir = data_dir
        if scrape_interval is not None:
            self.scrape_interval = scrape_interval
        binary = find_binary(self._binary)
        root = self._dir()
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        config.write_text(self._config())
        last = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            with open(self.log_file, "ab") as logf:
                self._proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        f"--storage.tsdb.path={root / 'tsdb'}",
                        "--storage.tsdb.retention.time=2h",
                        "--web.enable-lifecycle",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=self.detach,
                )
            try:
                self.wait_ready(timeout)
                log.info("prometheus_started", url=self.url, pid=self._proc.pid, dir=str(root))
                return self
            except DevstackError as exc:
                last = str(exc)
                self.stop()
                if "address already in use" not in last:
                    break
        raise DevstackError(last)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate, then kill; returns when the process is gone."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.info("prometheus_stopped", port=self.port)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- waiting ---------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise DevstackError(
                    f"Prometheus exited with code {self._proc.returncode} during startup; "
                    f"log {self.log_file}:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise DevstackError(
                    f"Prometheus at {self.url} not ready after {timeout:g}s; log {self.log_file}:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    async def wait_target_up(self, job: str, timeout: float = 30.0) -> None:
        """Wait until every target of ``job`` was scraped successfully (async: the target may be
        served by this same event loop)."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            data = await asyncio.to_thread(self._get_json, "/api/v1/targets?state=active")
            seen = [t for t in data.get("data", {}).get("activeTargets", []) if t.get("labels", {}).get("job") == job]
            if seen and all(t.get("health") == "up" for t in seen):
                return
            await asyncio.sleep(0.2)
        detail = ", ".join(f"{t.get('scrapeUrl')}: {t.get('health')} {t.get('lastError')}" for t in seen)
        raise DevstackError(f"Prometheus target job {job!r} not up after {timeout:g}s ({detail or 'not discovered'})")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Convenience instant query (for tests and the demo; canaryd uses its own client)."""
        data = self._get_json("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    # -- targets ---------------------------------------------------------------------------

    def add_target(self, job: str, address: str, labels: dict[str, str] | None = None) -> Path:
        """Register ``address`` (host:port) as a scrape target under ``job``; picked up by
        file_sd within about a second."""
        if not job or "/" in job:
            raise DevstackError(f"invalid job name {job!r}")
        path = self.targets_dir / f"{job}.json"
        groups = [{"targets": [address], "labels": {**(labels or {}), "job": job}}]
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")  # not matched by the *.json glob
        tmp.write_text(json.dumps(groups))
        tmp.replace(path)  # atomic: Prometheus never reads a half-written file
        return path

    def remove_target(self, job: str) -> None:
        (self.targets_dir / f"{job}.json").unlink(missing_ok=True)

    # -- internals ---------------------------------------------------------------------------

    def _dir(self) -> Path:
        if self.data_dir is None:
            raise DevstackError("PrometheusServer needs a data_dir")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def _config(self) -> str:
        interval = self.scrape_interval
        return (
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: file-sd\n"  # overridden per target by the 'job' label in the file
            "    file_sd_configs:\n"
            f"      - files: ['{self.targets_dir}/*.json']\n"
            "        refresh_interval: 1s\n"
        )

    def _get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
