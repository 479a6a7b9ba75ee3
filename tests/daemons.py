"""``canaryd run`` as a real subprocess, with its JSON log and HTTP endpoints, for the daemon-level tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.devstack.controlplane import free_port
from tests.conftest import Stack

REPO = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(
        self,
        stack: Stack,
        namespace: str,
        identity: str,
        tmp: Path,
        *,
        lease_s: int = 4,
        leader_election: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.identity = identity
        self.port = free_port()
        self.log_path = tmp / f"{identity}.log"
        env = {
            **os.environ,
            "CANARYD_NAMESPACES": json.dumps([namespace]),
            "CANARYD_LEASE_NAMESPACE": namespace,
            "CANARYD_LEASE_DURATION_S": str(lease_s),
            "CANARYD_LEASE_RENEW_S": "1",
            "CANARYD_IDENTITY": identity,
            "CANARYD_LOG_FORMAT": "json",
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(self.port),
            "CANARYD_LEADER_ELECTION": "true" if leader_election else "false",
            **(env or {}),
        }
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "canaryd", "run", "--kubeconfig", str(stack.kubeconfig)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def patches(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "route_patched"]

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except (urllib.error.URLError, OSError):
            return 0, ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
