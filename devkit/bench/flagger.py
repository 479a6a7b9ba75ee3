"""Flagger for the bench against it: the binary (built from its Go module), its process, its objects.

``hack/build-flagger.sh`` builds ``github.com/fluxcd/flagger/cmd/flagger`` at the version pinned in
hack/versions.env (``FLAGGER_VERSION``) into ``~/.cache/canaryd/bin/flagger-<version>/`` with the
module's CRDs (``crd.yaml``); nothing of Flagger is committed and ``make test`` never builds it.

Flagger runs as a plain process against the devstack's kubeconfig with its Gateway API v1 router
(``-mesh-provider=gatewayapi:v1``), which writes the ``backendRefs`` weights of an HTTPRoute named
after the Service; a Canary whose ``gatewayRefs`` name a Service (GAMMA) is the same kind of route
canaryd steps. The analysis is a MetricTemplate (Prometheus provider) over the very series
canaryd's ``envoy`` signal reads, with the cluster names canaryd's default pattern gives
Flagger's backends ``<svc>-primary`` / ``<svc>-canary``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.kube.informer import Informer, Key, raw
from canaryd.settings import PrometheusSettings
from devkit import DevstackError
from devkit.bench.harness import Daemon
from devkit.devstack.controlplane import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-flagger.sh"
GROUP, VERSION = "flagger.app", "v1beta1"
SUCCESS_RATE = "envoy-success-rate"


def flagger_dir() -> Path:
    """The cache dir holding ``flagger`` and ``crd.yaml`` (builds them the first time, ~1.5 min)."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DevstackError(f"building Flagger failed (hack/build-flagger.sh):\n{proc.stderr[-4000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    for f in ("flagger", "crd.yaml"):
        if not (path / f).exists():
            raise DevstackError(f"{path} lacks {f}; rerun hack/build-flagger.sh")
    return path


def version() -> str:
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("FLAGGER_VERSION="):
            return line.split("=", 1)[1].strip()
    raise DevstackError("hack/versions.env has no FLAGGER_VERSION")


class FlaggerProcess(Daemon):
    """``flagger`` as a subprocess watching one namespace; measured like the canaryd ``Daemon``."""

    name = "flagger"
    ready_path = "/healthz"  # served once its informers have synced

    def __init__(self, binary: Path, kubeconfig: str, namespace: str, prometheus_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.profile_to = None
        self.argv = [
            str(binary),
            f"-kubeconfig={kubeconfig}",
            "-mesh-provider=gatewayapi:v1",
            f"-metrics-server={prometheus_url}",
            f"-namespace={namespace}",
            f"-port={self.port}",
            "-log-level=info",  # the Helm chart's default (the binary's own default is debug)
        ]
        self._log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ)
        )
        self.started = time.monotonic()
        self._cpu0 = 0.0


# --- objects ---------------------------------------------------------------------------------


def cluster_regex_template(port: int = 80) -> str:
    """canaryd's default ``envoy_cluster_pattern`` for Flagger's canary backend, as a Flagger
    template: the parent is the apex Service ``{{ service }}``, the backend ``{{ service }}-canary``."""
    pattern = PrometheusSettings().envoy_cluster_pattern
    for token, value in (
        ("{namespace}", "{{ namespace }}"),
        ("{parent}", "{{ service }}"),
        ("{service}", "{{ service }}-canary"),
        ("{port}", str(port)),
    ):
        pattern = pattern.replace(token, value)
    return pattern


def success_rate_query(port: int = 80) -> str:
    """The canary's success rate in percent over the metric's interval; an error is a 5xx, as in
    canaryd's ``envoy`` signal (4xx counted as successes, its default)."""
    sel = f'envoy_cluster_name=~"{cluster_regex_template(port)}"'
    ok = f'sum(rate(envoy_cluster_upstream_rq{{{sel},envoy_response_code!~"5.."}}[{{{{ interval }}}}]))'
    total = f"sum(rate(envoy_cluster_upstream_rq{{{sel}}}[{{{{ interval }}}}]))"
    return f"100 * {ok} / {total}"


def metric_template_body(prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MetricTemplate",
        "metadata": {"name": SUCCESS_RATE},
        "spec": {"provider": {"type": "prometheus", "address": prometheus_url}, "query": success_rate_query()},
    }


@dataclass(frozen=True)
class Analysis:
    """The rollout both controllers get: same interval, steps, threshold and minimum success rate."""

    interval_s: float
    step_weight: int
    max_weight: int
    threshold: int
    success_rate_min: float

    @property
    def steps(self) -> list[int]:
        return list(range(self.step_weight, self.max_weight + 1, self.step_weight))


def canary_body(name: str, a: Analysis) -> dict[str, Any]:
    interval = f"{a.interval_s:g}s"
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Canary",
        "metadata": {"name": name},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "service": {"port": 80, "gatewayRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}]},
            "analysis": {
                "interval": interval,
                "threshold": a.threshold,
                "stepWeight": a.step_weight,
                "maxWeight": a.max_weight,
                "metrics": [
                    {
                        "name": SUCCESS_RATE,
                        "templateRef": {"name": SUCCESS_RATE},
                        "thresholdRange": {"min": a.success_rate_min},
                        "interval": interval,
                    }
                ],
            },
        },
    }


def backend_weight(route: dict[str, Any], backend: str) -> int | None:
    for rule in route.get("spec", {}).get("rules") or []:
        for ref in rule.get("backendRefs") or []:
            if ref.get("name") == backend:
                return int(ref.get("weight", 1))
    return None


def flagger_canary_weight(route: dict[str, Any]) -> int | None:
    return backend_weight(route, f"{route['metadata']['name']}-canary")


# --- watching Canaries -----------------------------------------------------------------------


@dataclass
class CanaryWatch:
    """Each Canary's ``status.phase`` as the watch delivers it, stamped on arrival."""

    api: client.ApiClient
    namespace: str
    phases: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def _on_change(self, key: Key, obj: dict[str, Any] | None) -> None:
        if obj is None:
            return
        phase = str((obj.get("status") or {}).get("phase") or "")
        runs = self.phases.setdefault(key[1], [])
        if not runs or runs[-1][1] != phase:
            runs.append((time.time(), phase))

    def phase(self, name: str) -> str:
        runs = self.phases.get(name)
        return runs[-1][1] if runs else ""

    def reached(self, name: str, phase: str, since: float) -> float | None:
        """When ``name`` first showed ``phase`` after ``since`` (having left it since then)."""
        left = False
        for at, p in self.phases.get(name, []):
            if at < since:
                continue
            if p != phase:
                left = True
            elif left:
                return at
        return None

    async def start(self) -> None:
        co = client.CustomObjectsApi(self.api)
        informer = Informer(
            f"bench-canaries/{self.namespace}",
            raw(co.list_namespaced_custom_object),
            (GROUP, VERSION, self.namespace, "canaries"),
            on_change=self._on_change,
        )
        self._task = asyncio.create_task(informer.run(), name="bench-canaries")
        await asyncio.wait_for(informer.synced.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
