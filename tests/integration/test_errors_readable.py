"""Errors that read well (issue 18, item 6), against the real apiserver and a real, stopped Prometheus.

- Prometheus down: the judge's reason, the status message and the Events say the cause first
  (``Prometheus at http://…: connection refused``), with no URL-encoded PromQL; the query is a
  field of the one ``prometheus_unreachable`` log line.
- One ``error:`` line, exit code 1, no traceback: a busy ``--http-port`` in ``canaryd run``, a
  kubeconfig with garbage in it.
- The HTTPRoute CRD deleted while the daemon runs: it logs the cause, retries, and drives a rollout
  once the CRD is back.
- ``--wait`` closes its clients (no "Unclosed client session").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState
from devkit.devstack.prometheus import PrometheusServer
from tests.conftest import Stack
from tests.daemons import Daemon
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    route_body,
    running_engine,
    wait_events,
)

REPO = Path(__file__).resolve().parents[2]
CRD = "httproutes.gateway.networking.k8s.io"


async def canaryd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m canaryd ARGS`` in a thread (an engine may share this loop), no CANARYD_* leaking in."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANARYD_") and k not in ("KUBECONFIG", "NO_COLOR")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "canaryd", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def one_error_line(out: subprocess.CompletedProcess[str], starts: str) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith(f"error: {starts}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and "Unclosed" not in out.stderr


def state_of(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


async def _backends(api: client.ApiClient, namespace: str) -> None:
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, namespace, n)


# --- Prometheus down ------------------------------------------------------------------------------------
@pytest.fixture
def stopped_prometheus(tmp_path: Path) -> str:
    """The URL of a real Prometheus that was started, then stopped: nothing listens there now."""
    prom = PrometheusServer(tmp_path / "prom", scrape_interval="1s")
    prom.start(timeout=60)
    url = prom.url
    prom.stop()
    return url


async def test_prometheus_down_says_the_cause_first(
    stack: Stack, api: client.ApiClient, namespace: str, stopped_prometheus: str
) -> None:
    url = stopped_prometheus
    cause = f"Prometheus at {url}: connection refused"
    await _backends(api, namespace)
    await create_route(api, namespace, route_body("checked"))

    # canaryd check: the judge's reason and the finding, cause first.
    out = await canaryd(
        "check", "checked", "-n", namespace, "--canary", "whoami-v2", "--set", "analysis=envoy,dapr",
        "--set", "app-id=whoami", "--prometheus-url", url, "-o", "json", "--kubeconfig", str(stack.kubeconfig),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert [s["reason"] for s in doc["analysis"]["signals"]] == [cause, cause]
    messages = [f["message"] for f in doc["findings"] if f["check"] == "analysis"]
    assert [m.split(";")[0] for m in messages] == [f"signal envoy: {cause}", f"signal dapr: {cause}"]
    assert "%" not in out.stdout and "query" not in out.stdout

    # The daemon: the status message and the Events, cause first, no encoded query; one log line with it.
    a = {
        ann.CANARY: "whoami-v2",
        ann.STEPS: "50,100",
        ann.INTERVAL: "2s",
        ann.ANALYSIS: "envoy",
        ann.MAX_ERRORS: "2",
    }
    await create_route(api, namespace, route_body("whoami", annotations=a))
    with structlog.testing.capture_logs() as logs:
        async with running_engine(api, namespace, prometheus_url=url, analyzer=True):

            async def rolled_back() -> RolloutState | None:
                st = state_of(await get_route(api, namespace, "whoami"))
                return st if st is not None and st.phase == Phase.ROLLED_BACK else None

            st = await eventually(rolled_back, timeout=60, what="the rollback after two analysis errors")
            events = await wait_events(api, namespace, "whoami", "AnalysisError")
    assert st.message.endswith(f"analysis errored 2 times in a row: envoy: {cause}"), st.message
    assert [h.reason for h in st.history if h.verdict == "error"] == [cause, cause]
    for e in events:
        assert f"envoy: {cause}" in e.message and "%" not in e.message, e.message
    down = [e for e in logs if e["event"] == "prometheus_unreachable"]
    assert len(down) == 1, down  # an outage is logged once ...
    assert down[0]["error"] == cause and "envoy_cluster_upstream_rq" in down[0]["query"]  # ... with its query


# --- one error: line ---------------------------------------------------------------------------------------
async def test_busy_http_port_is_one_error_line(stack: Stack) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = await canaryd(
            "run", "--no-leader-election", "--http-port", str(port), "--kubeconfig", str(stack.kubeconfig),
            env={"CANARYD_HTTP_HOST": "127.0.0.1"},
        )  # fmt: skip
    one_error_line(out, f"cannot serve /metrics, /healthz and /readyz on 127.0.0.1:{port}: address already in use")
    assert "--http-port" in out.stderr


@pytest.mark.parametrize(
    "garbage",
    ["- 1\n- 2\n", "clusters: 5\ncontexts: x\ncurrent-context: 7\n", "a: [1, 2\nb", "\x00\xff\xfe"],
    ids=["list", "wrong-shapes", "broken-yaml", "binary"],
)
async def test_garbage_kubeconfig_is_one_error_line(tmp_path: Path, garbage: str) -> None:
    kc = tmp_path / "garbage.kubeconfig"
    kc.write_bytes(garbage.encode("latin-1"))
    commands = (("status", "-A"), ("check", "whoami"), ("run", "--no-leader-election"))
    for out in await asyncio.gather(*(canaryd(*args, "--kubeconfig", str(kc)) for args in commands)):
        one_error_line(out, f"cannot load kubeconfig {kc}: ")


# --- the CRD goes away and comes back ----------------------------------------------------------------------
async def test_daemon_survives_the_httproute_crd_going_away(
    own_stack: Stack, own_api: client.ApiClient, daemons: list[Daemon], tmp_path: Path
) -> None:
    ns = "crd"
    await client.CoreV1Api(own_api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    await _backends(own_api, ns)
    hold = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1h"}
    await create_route(own_api, ns, route_body("before", annotations=hold))
    d = Daemon(own_stack, ns, "crd", tmp_path, leader_election=False)
    daemons.append(d)

    async def started(name: str) -> RolloutState | None:
        st = state_of(await get_route(own_api, ns, name))
        return st if st is not None and st.step >= 0 and st.phase == Phase.PROGRESSING else None

    await eventually(lambda: started("before"), timeout=60, what="the daemon driving a route")
    crd_file = Path(own_stack.info.bin_dir) / "crds" / "standard" / "gateway.networking.k8s.io_httproutes.yaml"
    await asyncio.to_thread(own_stack.kubectl, "delete", "crd", CRD, "--wait=true")

    def failures() -> list[dict[str, Any]]:
        return [
            e
            for e in d.events()
            if e.get("event") == "watch_failed" and str(e.get("informer", "")).startswith("httproutes")
        ]

    async def told() -> list[dict[str, Any]] | None:
        return [e for e in failures() if e.get("status") == 404] or None

    [missing] = await eventually(told, timeout=60, what="watch_failed naming the missing CRD")
    assert "does not serve httproutes (404 Not Found); is its CustomResourceDefinition installed?" in str(
        missing["error"]
    )
    assert d.proc.poll() is None, "the daemon died when the CRD went away"

    await asyncio.to_thread(own_stack.kubectl, "apply", "--server-side", "-f", str(crd_file))

    async def established() -> bool | None:
        # Right after the apply the CRD has no status.conditions yet, and kubectl wait errors out then.
        crd = json.loads(await asyncio.to_thread(own_stack.kubectl, "get", "crd", CRD, "-o", "json"))
        conditions = (crd.get("status") or {}).get("conditions") or []
        return True if any(c["type"] == "Established" and c["status"] == "True" for c in conditions) else None

    await eventually(established, timeout=60, what="the re-created CRD Established")
    go = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1s"}

    async def created() -> bool:  # the apiserver serves the resource again a moment after Established
        try:
            await create_route(own_api, ns, route_body("after", annotations=go))
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    await eventually(created, timeout=60, interval=0.3, what="the CRD serving again")

    async def promoted() -> RolloutState | None:
        st = state_of(await get_route(own_api, ns, "after"))
        return st if st is not None and st.phase == Phase.PROMOTED else None

    await eventually(promoted, timeout=60, what="a rollout after the CRD came back")
    assert d.proc.poll() is None
    assert any(e.get("event") == "watch_recovered" and e.get("informer") == f"httproutes/{ns}" for e in d.events())
    assert len(failures()) <= 3, failures()  # the cause, not a flood
    text = d.log_path.read_text()
    assert "TypeError" not in text and "Traceback" not in text
    assert d.stop(signal.SIGTERM) == 0


# --- --wait closes its clients -------------------------------------------------------------------------------
async def test_wait_closes_its_clients(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    await _backends(api, namespace)
    hold = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "1h"}
    await create_route(api, namespace, route_body("whoami", annotations=hold))
    kc = ("-n", namespace, "--timeout", "60", "--kubeconfig", str(stack.kubeconfig))
    async with running_engine(api, namespace):
        runs = [
            await canaryd("pause", "whoami", "--wait", *kc),
            await canaryd("resume", "whoami", "--wait", *kc),
            await canaryd("promote", "whoami", "--wait", *kc),
            await canaryd("status", "whoami", "--wait", *kc),
        ]
    for out in runs:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Unclosed" not in out.stderr and "Traceback" not in out.stderr, out.stderr
