"""The processes the chaos suite kills: canaryd replicas, and a Prometheus that comes back on its port.

``devkit.devstack.prometheus.PrometheusServer`` takes a fresh port on every start; a killed
Prometheus must come back where canaryd was told it lives, so ``StickyPrometheus`` keeps one port
(and one TSDB directory) across restarts. A ``Replica`` is one ``canaryd run`` slot, like a pod of a
Deployment: every (re)start is a new incarnation with a new identity and its own JSON log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devkit import DevstackError
from devkit.devstack.controlplane import free_port
from devkit.devstack.prometheus import PrometheusServer, find_binary

REPO = Path(__file__).resolve().parents[2]


def http_status(url: str, timeout: float = 2.0) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return 0


class StickyPrometheus:
    """Debian's Prometheus on a fixed loopback port, 1 s scrapes of file_sd targets."""

    def __init__(self, data_dir: Path, scrape_interval: str = "1s") -> None:
        self.data_dir = data_dir
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._targets = PrometheusServer(data_dir)  # only for its file_sd target files
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DevstackError("Prometheus is not running")
        return self.proc.pid

    def _argv(self) -> list[str]:
        config = self.data_dir / "prometheus.yml"
        return [
            find_binary(),
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            "--storage.tsdb.retention.time=2h",
            "--log.level=warn",
        ]

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._targets.targets_dir.mkdir(parents=True, exist_ok=True)
        i = self.scrape_interval
        (self.data_dir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {i}\n  scrape_timeout: {i}\n  evaluation_interval: {i}\n"
            "scrape_configs:\n  - job_name: file-sd\n    file_sd_configs:\n"
            f"      - files: ['{self._targets.targets_dir}/*.json']\n        refresh_interval: 1s\n"
        )
        with open(self.data_dir / "prometheus.log", "ab") as logf:
            self.proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while http_status(f"{self.url}/-/ready") != 200:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise DevstackError(f"Prometheus exited with {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise DevstackError(f"Prometheus not ready at {self.url} after {timeout:g}s")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def add_target(self, job: str, address: str) -> None:
        self._targets.add_target(job, address)

    def target_up(self, job: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/targets?state=active", timeout=3) as r:
                data = json.load(r)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        seen = [t for t in data.get("data", {}).get("activeTargets", []) if t.get("labels", {}).get("job") == job]
        return bool(seen) and all(t.get("health") == "up" for t in seen)


@dataclass
class Exit:
    """A canaryd process that ended."""

    replica: str
    identity: str
    pid: int
    rc: int | None
    at: float  # monotonic
    killed_by_chaos: bool
    reason: str = ""

    def as_dict(self, t0: float) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "identity": self.identity,
            "pid": self.pid,
            "rc": self.rc,
            "at_s": round(self.at - t0, 1),  # from t0 as given (the run passes the chaos window's start)
            "killed_by_chaos": self.killed_by_chaos,
            "reason": self.reason,
        }


@dataclass
class Replica:
    """One ``canaryd run`` slot; ``start`` begins a new incarnation."""

    slot: str
    kubeconfig: str
    namespace: str
    prometheus_url: str
    log_dir: Path
    lease_s: float = 6.0
    renew_s: float = 1.0
    shards: int = 1  # with more, the slot is the replica's own shard (its identity ends with it)
    incarnation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    identity: str = ""
    killing: bool = False
    served: bool = False  # this incarnation answered /healthz
    logs: list[Path] = field(default_factory=list)
    _logf: Any = None

    def start(self) -> None:
        if self.alive:
            raise DevstackError(f"{self.identity} still runs; kill it before starting another incarnation")
        self.incarnation += 1
        # A new identity per incarnation, like a Deployment's pods; with shards it ends with the slot, the
        # replica's own shard (canaryd.core.shards.preferred_shard reads the trailing ordinal).
        n, slot = self.incarnation, self.slot
        self.identity = f"canaryd-{slot}-{n}" if self.shards == 1 else f"canaryd-i{n}-{slot}"
        self.port = free_port()
        log_path = self.log_dir / f"{self.identity}.log"
        self.logs.append(log_path)
        env = {
            **os.environ,
            "CANARYD_NAMESPACES": json.dumps([self.namespace]),
            "CANARYD_LEASE_NAMESPACE": self.namespace,
            "CANARYD_LEASE_DURATION_S": str(self.lease_s),
            "CANARYD_LEASE_RENEW_S": str(self.renew_s),
            "CANARYD_LEADER_ELECTION": "true",
            "CANARYD_SHARDS": str(self.shards),
            "CANARYD_IDENTITY": self.identity,
            "CANARYD_LOG_FORMAT": "json",
            "CANARYD_HTTP_HOST": "127.0.0.1",
            "CANARYD_HTTP_PORT": str(self.port),
            "CANARYD_PROMETHEUS__URL": self.prometheus_url,
            "CANARYD_PROMETHEUS__TIMEOUT_S": "5",
        }
        if self._logf is not None:
            self._logf.close()
        self._logf = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed on the next start/stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "canaryd", "run", "--kubeconfig", self.kubeconfig],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        self.killing = False
        self.served = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> Exit:
        """SIGKILL (the chaos)."""
        assert self.proc is not None
        self.killing = True
        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(10)
        return Exit(self.slot, self.identity, self.proc.pid, rc, time.monotonic(), killed_by_chaos=True)

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, as at the end of the run; the rc (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.killing = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        finally:
            if self._logf is not None:
                self._logf.close()
                self._logf = None

    def http(self, path: str) -> int:
        return http_status(f"http://127.0.0.1:{self.port}{path}")

    def events(self, path: Path | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in [path] if path is not None else self.logs:
            if not p.exists():
                continue
            for line in p.read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict):
                    ev["_log"] = p.name
                    out.append(ev)
        return out

    def exit_reason(self) -> str:
        """What the current incarnation's log says about why it ended."""
        if not self.logs:
            return ""
        evs = self.events(self.logs[-1])
        for ev in reversed(evs):
            if ev.get("event") in ("root_task_ended", "leadership_lost_exiting", "leader_lost"):
                return f"{ev.get('event')}: {ev.get('task', '')} {ev.get('error', '')}".strip()
        tail = self.logs[-1].read_text(errors="replace").strip().splitlines()[-3:]
        return " | ".join(tail)[-500:]
