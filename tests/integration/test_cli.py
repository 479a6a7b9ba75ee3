"""The control CLI against the real apiserver: status (golden), --wait, intents with a running
engine, check, and the one-line errors."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_asyncio import client

from canaryd import status as render
from canaryd.cli import main
from canaryd.commands import control
from canaryd.core import spec as ann
from canaryd.core.backends import RouteRef
from canaryd.core.state import Phase, RolloutState, ts
from canaryd.engine import Engine
from canaryd.settings import Settings
from devkit.devstack.controlplane import free_port
from tests.conftest import Stack
from tests.kubeobjects import (
    create_backend,
    create_route,
    eventually,
    get_route,
    patch_route,
    route_body,
    running_engine,
    set_endpoints,
)
from tests.unit.test_status_render import GOLDEN, NOW, PHASE_STATES, ROUTE_WEIGHTS, SCHEMA, all_routes

REPO = Path(__file__).resolve().parents[2]


def run_cli(
    stack: Stack,
    *args: str,
    env: dict[str, str] | None = None,
    kubeconfig: str | None = None,
    no_kubeconfig: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``python -m canaryd ...`` with stdout piped (so plain output)."""
    base = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "NO_COLOR")}
    argv = [sys.executable, "-m", "canaryd", *args]
    if not no_kubeconfig:
        argv += ["--kubeconfig", kubeconfig or str(stack.kubeconfig)]
    return subprocess.run(
        argv, capture_output=True, text=True, env={**base, **(env or {})}, cwd=REPO, timeout=timeout, check=False
    )


async def cli(stack: Stack, *args: str) -> int:
    """In-process ``canaryd.cli.main`` (it calls asyncio.run, so in a thread)."""
    return await asyncio.to_thread(main, [*args, "--kubeconfig", str(stack.kubeconfig)])


# --- status: golden ------------------------------------------------------------------------------
async def test_status_golden_from_apiserver(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    for body in all_routes(namespace):
        body = {**body, "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute"}
        body["metadata"] = {k: v for k, v in body["metadata"].items() if k != "namespace"}
        if not body["spec"]:
            body["spec"] = route_body("x")["spec"]
        await create_route(api, namespace, body)
    core = client.CoreV1Api(api)
    await core.create_namespaced_event(
        namespace,
        client.CoreV1Event(
            metadata=client.V1ObjectMeta(name="progressing.1", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version="gateway.networking.k8s.io/v1", kind="HTTPRoute", name="progressing", namespace=namespace
            ),
            reason="StepAdvanced",
            message="step 2/4: whoami-v1 75 → whoami-v2 25",
            type="Normal",
            count=1,
            first_timestamp=datetime(2025, 3, 1, 11, 58, tzinfo=UTC),
            last_timestamp=datetime(2025, 3, 1, 11, 58, tzinfo=UTC),
        ),
    )

    routes = await control.list_routes(api, namespace)
    for r in routes:  # the golden files say "shop"
        r["metadata"]["namespace"] = "shop"
    assert render.render_list(routes, NOW) == (GOLDEN / "status_list.txt").read_text()
    jsonschema.validate(render.list_document(routes, NOW), SCHEMA)

    for name, _st in PHASE_STATES.items():
        obj = await control.get_route(api, RouteRef(namespace, name))
        events = await control.route_events(api, RouteRef(namespace, name))
        if name != "progressing":  # the golden detail files all show the one StepAdvanced event
            events = [e for e in await control.route_events(api, RouteRef(namespace, "progressing"))]
        obj["metadata"]["namespace"] = "shop"
        assert render.render_detail(obj, events, NOW) == (GOLDEN / f"status_detail_{name}.txt").read_text(), name
        doc = render.single_document(obj, events, NOW)
        jsonschema.validate(doc, SCHEMA)
        assert doc["phase"] == PHASE_STATES[name].phase.value
        assert obj["spec"]["rules"][0]["backendRefs"][1]["weight"] == ROUTE_WEIGHTS[name]

    # The real command, piped: plain, only managed routes, json/yaml valid.
    out = run_cli(stack, "status", "-n", namespace)
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout
    assert out.stdout.splitlines()[0].split() == [
        "NAMESPACE",
        "ROUTE",
        "PHASE",
        "STEP",
        "WEIGHTS",
        "VERDICT",
        "NEXT",
        "AGE",
        "MESSAGE",
    ]
    names = [line.split()[1] for line in out.stdout.splitlines()[1:]]
    assert names == ["failed", "paused", "pending", "progressing", "promoted", "rolledback", "waiting"]
    out = run_cli(stack, "status", "-n", namespace, "-o", "json")
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    out = run_cli(stack, "status", "progressing", "-n", namespace, "-o", "yaml")
    doc = yaml.safe_load(out.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert [e["reason"] for e in doc["events"]] == ["StepAdvanced"]
    out = run_cli(stack, "status", "rolledback", "-n", namespace)
    assert "2     25%     rolled back" in out.stdout
    out = run_cli(stack, "status", "-A")
    # Other tests' namespaces are listed too and may widen the columns: match tokens, not spacing.
    assert [namespace, "progressing"] in [line.split()[:2] for line in out.stdout.splitlines()]


# --- engine-driven: --wait and intents -----------------------------------------------------------
@pytest.fixture
async def engine(api: client.ApiClient, namespace: str) -> AsyncIterator[Engine]:
    async with running_engine(api, namespace) as e:
        yield e


async def _state(api: client.ApiClient, namespace: str, name: str) -> RolloutState | None:
    a = (await get_route(api, namespace, name))["metadata"].get("annotations") or {}
    return RolloutState.from_annotation(a[ann.STATE]) if ann.STATE in a else None


async def test_wait_and_every_intent_with_running_engine(
    stack: Stack, api: client.ApiClient, namespace: str, engine: Engine
) -> None:
    await create_backend(api, namespace, "whoami-v1")
    await create_backend(api, namespace, "whoami-v2")
    fast = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "2s"}
    slow = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "10m"}
    await create_route(api, namespace, route_body("fast", annotations=fast))
    await create_route(api, namespace, route_body("slow", annotations=slow))

    # --wait on a rollout that promotes by itself: exit 0.
    assert await cli(stack, "status", "fast", "-n", namespace, "--wait", "--timeout", "30") == 0
    assert (await _state(api, namespace, "fast")).phase.value == "Promoted"  # type: ignore[union-attr]

    # slow sits at step 1 for 10 minutes: --wait times out with 2.
    await eventually(lambda: _state(api, namespace, "slow"), timeout=10, what="slow started")
    assert await cli(stack, "status", "slow", "-n", namespace, "--wait", "--timeout", "2") == 2

    # pause / resume: consumed and recorded.
    assert await cli(stack, "pause", "slow", "-n", namespace, "--wait", "--timeout", "20") == 0
    st = await _state(api, namespace, "slow")
    assert st is not None and st.phase.value == "Paused" and st.intents[-1].intent == "pause"
    rv = (await get_route(api, namespace, "slow"))["metadata"]["resourceVersion"]
    assert await cli(stack, "pause", "slow", "-n", namespace, "--wait", "--timeout", "20") == 1  # refused: paused
    assert (await get_route(api, namespace, "slow"))["metadata"]["resourceVersion"] == rv  # nothing written
    assert await cli(stack, "resume", "slow", "-n", namespace, "--wait", "--timeout", "20") == 0
    st = await _state(api, namespace, "slow")
    assert st is not None and st.phase.value == "Progressing" and st.intents[-1].result == "applied"

    # abort -> RolledBack; status --wait then exits 1; retry restarts; promote finishes.
    assert await cli(stack, "abort", "slow", "-n", namespace, "--wait", "--timeout", "20") == 0
    assert (await _state(api, namespace, "slow")).phase.value == "RolledBack"  # type: ignore[union-attr]
    route = await get_route(api, namespace, "slow")
    assert {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]} == {
        "whoami-v1": 100,
        "whoami-v2": 0,
    }
    assert await cli(stack, "status", "slow", "-n", namespace, "--wait", "--timeout", "10") == 1
    assert await cli(stack, "retry", "slow", "-n", namespace, "--wait", "--timeout", "20") == 0
    st = await _state(api, namespace, "slow")
    assert st is not None and st.phase.value == "Progressing"
    assert await cli(stack, "promote", "slow", "-n", namespace, "--wait", "--timeout", "20") == 0
    st = await _state(api, namespace, "slow")
    assert st is not None and st.phase.value == "Promoted"
    assert [(i.intent, i.result) for i in st.intents] == [
        ("pause", "applied"),
        ("resume", "applied"),
        ("abort", "applied"),
        ("retry", "applied"),
        ("promote", "applied"),
    ]
    a = (await get_route(api, namespace, "slow"))["metadata"]["annotations"]
    assert ann.INTENT not in a

    out = run_cli(stack, "promote", "slow", "-n", namespace)
    assert out.returncode == 1 and "refused, nothing written: already promoted" in out.stderr


async def test_intent_without_controller_times_out(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    await create_route(api, namespace, route_body("idle", annotations={ann.CANARY: "whoami-v2"}))
    out = run_cli(stack, "pause", "idle", "-n", namespace, "--wait", "--timeout", "1")
    assert out.returncode == 2
    assert "is the canaryd controller running" in out.stderr
    a = (await get_route(api, namespace, "idle"))["metadata"]["annotations"]
    assert a[ann.INTENT] == "pause"


# --- check -----------------------------------------------------------------------------------------
async def test_check_reports_each_problem(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    await create_backend(api, namespace, "whoami-v1")
    await create_backend(api, namespace, "whoami-v2")
    await create_backend(api, namespace, "notready-v2", ready=False)
    await create_backend(api, namespace, "down-v2")
    await set_endpoints(api, namespace, "down-v2", ready=False)
    good = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100"}
    await create_route(api, namespace, route_body("good", annotations=good))
    await create_route(api, namespace, route_body("bad", annotations={ann.CANARY: "whoami-v2", ann.STEPS: "x,100"}))
    await create_route(
        api,
        namespace,
        route_body("missing", annotations={ann.CANARY: "ghost-v2"}, backends=(("whoami-v1", 100), ("ghost-v2", 0))),
    )
    await create_route(
        api,
        namespace,
        route_body("noeps", annotations={ann.CANARY: "notready-v2"}, backends=(("whoami-v1", 100), ("notready-v2", 0))),
    )
    await create_route(
        api,
        namespace,
        route_body("unready", annotations={ann.CANARY: "down-v2"}, backends=(("whoami-v1", 100), ("down-v2", 0))),
    )
    await create_route(api, namespace, route_body("analysed", annotations={**good, ann.ANALYSIS: "envoy"}))

    out = run_cli(stack, "check", "good", "-n", namespace)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no problems found" in out.stdout

    out = run_cli(stack, "check", "bad", "-n", namespace)
    assert out.returncode == 1 and "1 problem:" in out.stdout and "canaryd.io/steps" in out.stdout

    out = run_cli(stack, "check", "missing", "-n", namespace)
    assert out.returncode == 1
    assert f"backend Service {namespace}/ghost-v2 does not exist" in out.stdout
    assert "ghost-v2 has no EndpointSlices" in out.stdout

    out = run_cli(stack, "check", "noeps", "-n", namespace)
    assert out.returncode == 1 and "notready-v2 has no EndpointSlices" in out.stdout

    out = run_cli(stack, "check", "unready", "-n", namespace)
    assert out.returncode == 1 and "down-v2 has no ready endpoints" in out.stdout

    port = free_port()
    out = run_cli(stack, "check", "analysed", "-n", namespace, "--prometheus-url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert "analysis: signal envoy:" in out.stdout and f"127.0.0.1:{port}" in out.stdout
    assert "envoy: canary -; stable - -> judge: error" in out.stdout

    sa = stack.sa_kubeconfig(namespace, "default")
    out = run_cli(stack, "check", "good", "-n", namespace, kubeconfig=str(sa))
    assert out.returncode == 1
    assert f"missing permission: patch httproutes.gateway.networking.k8s.io in namespace {namespace}" in out.stdout
    assert "missing permission: create leases.coordination.k8s.io in namespace default" in out.stdout
    assert "cannot read httproute" in out.stdout
    problems = out.stdout.split("problems:")[1].strip().splitlines()
    assert len(problems) == 12 + 1  # every verb the daemon uses (the chart grants these 12), and the route itself


# --- one-line errors -----------------------------------------------------------------------------
async def test_error_messages(stack: Stack, api: client.ApiClient, namespace: str, tmp_path: Path) -> None:
    await create_route(api, namespace, route_body("plain"))

    out = run_cli(stack, "status", env={"KUBECONFIG": str(tmp_path / "missing")}, no_kubeconfig=True)
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: kubeconfig {tmp_path / 'missing'} (from KUBECONFIG) does not exist")
    assert len(out.stderr.strip().splitlines()) == 1

    closed = tmp_path / "closed.kubeconfig"
    cfg = yaml.safe_load(stack.kubeconfig.read_text())
    cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    closed.write_text(yaml.safe_dump(cfg))
    out = run_cli(stack, "status", "-n", namespace, kubeconfig=str(closed))
    assert out.returncode == 1 and "cluster unreachable" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    out = run_cli(stack, "status", "nope", "-n", namespace)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"error: httproute nope not found in namespace {namespace}; check the name and "
        "-n/--namespace ('canaryd status -A' lists every managed route)"
    )

    for args in (("status", "plain"), ("promote", "plain")):
        out = run_cli(stack, *args, "-n", namespace)
        assert out.returncode == 1
        assert "is not managed by canaryd" in out.stderr and "kubectl annotate" in out.stderr

    sa = stack.sa_kubeconfig(namespace, "default")
    out = run_cli(stack, "status", "-n", namespace, kubeconfig=str(sa))
    assert out.returncode == 1
    assert "forbidden" in out.stderr and "ask a cluster admin" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    # --help of every command carries examples.
    for cmd in ("status", "check", *ann.INTENTS):
        h = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "canaryd", cmd, "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        assert "examples:" in h.stdout, cmd


async def test_watch_redraws_on_change(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    st = PHASE_STATES["progressing"]
    body = route_body(
        "watched",
        backends=(("whoami-v1", 75), ("whoami-v2", 25)),
        annotations={ann.CANARY: "whoami-v2", ann.STATE: st.to_annotation()},
    )
    await create_route(api, namespace, body)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canaryd",
        "status",
        "-n",
        namespace,
        "--watch",
        "--timeout",
        "6",
        "--kubeconfig",
        str(stack.kubeconfig),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 15)
    assert first.decode().startswith("NAMESPACE")
    promoted = st.with_(phase=st.phase.__class__("Promoted"), message="promoted: by the test")
    await patch_route(api, namespace, "watched", {"metadata": {"annotations": {ann.STATE: promoted.to_annotation()}}})
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    text = first.decode() + out.decode()
    assert proc.returncode == 0, err.decode()
    assert text.count("NAMESPACE") == 2, text  # drawn once, redrawn once on the change
    assert text.index("Progressing") < text.index("promoted: by the test")


# --- --wait: a line per change; --watch ROUTE: the live detail view ---------------------------------
async def _lines_until(stream: asyncio.StreamReader, done: Callable[[str], bool], *, limit: float = 30) -> str:
    """Read ``stream`` until ``done(text so far)``; ``limit`` only guards against a hang (not a speed check)."""
    text = ""

    async def more() -> None:
        nonlocal text
        while not done(text):
            chunk = await stream.read(4096)
            assert chunk, f"stream ended before the expected output:\n{text}"
            text += chunk.decode()

    await asyncio.wait_for(more(), limit)
    return text


async def _spawn(stack: Stack, *args: str, stdout: int | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canaryd",
        *args,
        "--kubeconfig",
        str(stack.kubeconfig),
        stdout=asyncio.subprocess.PIPE if stdout is None else stdout,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "NO_COLOR")},
    )


async def test_wait_prints_a_line_per_change_then_the_outcome(
    stack: Stack, api: client.ApiClient, namespace: str, engine: Engine
) -> None:
    await create_backend(api, namespace, "whoami-v1")
    await create_backend(api, namespace, "whoami-v2")
    slow = {ann.CANARY: "whoami-v2", ann.STEPS: "50,100", ann.INTERVAL: "10m"}
    await create_route(api, namespace, route_body("ci", annotations=slow))

    async def at_step_1() -> bool:
        st = await _state(api, namespace, "ci")
        return st is not None and st.step == 0 and st.canary_weight == 50

    await eventually(at_step_1, timeout=10, what="ci at step 1")
    proc = await _spawn(stack, "status", "ci", "-n", namespace, "--wait", "--timeout", "60")
    assert proc.stdout is not None
    # The first line comes while the rollout still runs (it used to print nothing until the end).
    first = await _lines_until(proc.stdout, lambda t: "\n" in t)
    assert f"  {namespace}/ci  Progressing  step 1/2  whoami-v1 50 → whoami-v2 50  next " in first, first
    assert await cli(stack, "promote", "ci", "-n", namespace) == 0
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = (first + out.decode()).splitlines()
    assert len(lines) >= 3, lines
    assert all(f"  {namespace}/ci  " in line for line in lines[:-1]), lines
    assert any("Promoted  step 2/2  whoami-v1 0 → whoami-v2 100" in line for line in lines[1:-1]), lines
    assert lines[-1].startswith(f"httproute {namespace}/ci Promoted after ")
    assert lines[-1].endswith("(whoami-v1 0 → whoami-v2 100): promoted: promoted by user")
    assert len(lines) == len(set(lines)), "a line only when something changed"


def _live_state(now: datetime) -> RolloutState:
    st = PHASE_STATES["progressing"]
    return st.with_(
        started_at=ts(now),
        step_started_at=ts(now),
        updated_at=ts(now),
        next_at=ts(now + timedelta(minutes=10)),
    )


async def test_watch_route_piped_appends_the_detail_view_per_change(
    stack: Stack, api: client.ApiClient, namespace: str
) -> None:
    st = _live_state(datetime.now(UTC))
    body = route_body(
        "watched",
        backends=(("whoami-v1", 75), ("whoami-v2", 25)),
        annotations={ann.CANARY: "whoami-v2", ann.STATE: st.to_annotation()},
    )
    await create_route(api, namespace, body)
    proc = await _spawn(stack, "status", "watched", "-n", namespace, "--watch", "--timeout", "60")
    assert proc.stdout is not None
    first = await _lines_until(proc.stdout, lambda t: "\nEvents:\n" in t and t.endswith("\n\n"))
    assert first.startswith(f"Route:   {namespace}/watched\nPhase:   Progressing\n"), first
    assert "\nPlan:\n" in first and "\nAnalysis:\n" in first and "2     25%     current" in first
    promoted = st.with_(phase=Phase.PROMOTED, message="promoted: by the test", next_at=None)
    await patch_route(api, namespace, "watched", {"metadata": {"annotations": {ann.STATE: promoted.to_annotation()}}})
    text = await _lines_until(proc.stdout, lambda t: "promoted: by the test" in t and t.endswith("\n\n"))
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 30)
    assert text.startswith(f"Route:   {namespace}/watched\nPhase:   Promoted\n"), text  # the next copy
    assert "\x1b[" not in first + text, "piped output is plain and appended, never redrawn"


async def test_watch_route_on_a_terminal_ticks_every_second(
    stack: Stack, api: client.ApiClient, namespace: str
) -> None:
    st = _live_state(datetime.now(UTC))
    body = route_body(
        "live",
        backends=(("whoami-v1", 75), ("whoami-v2", 25)),
        annotations={ann.CANARY: "whoami-v2", ann.STATE: st.to_annotation()},
    )
    rv = (await create_route(api, namespace, body))["metadata"]["resourceVersion"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 80, 200, 0, 0))
    proc = await _spawn(stack, "status", "live", "-n", namespace, "--watch", "--no-color", stdout=slave)
    os.close(slave)
    screen = b""
    try:

        async def frames(n: int) -> list[str]:
            nonlocal screen
            while screen.count(b"\x1b[H") < n + 1:  # the n-th frame is complete when the next one starts
                screen += await asyncio.to_thread(os.read, master, 65536)
            return [f.decode() for f in screen.split(b"\x1b[H")[1 : n + 1]]

        shown = await asyncio.wait_for(frames(3), 60)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
        os.close(master)
    plain = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f).replace("\r", "") for f in shown]
    clocks = [f.splitlines()[0].split()[0] for f in plain]
    nexts = [next(line for line in f.splitlines() if line.startswith("Next:")) for f in plain]
    assert all(f"httproute {namespace}/live, redrawn every 1s" in f.splitlines()[0] for f in plain), plain[0]
    assert all("\nPlan:\n" in f and "\nEvents:\n" in f for f in plain)
    # Nothing changed on the route, yet the clock and the countdown moved: the view is live.
    assert (await get_route(api, namespace, "live"))["metadata"]["resourceVersion"] == rv
    assert len(set(clocks)) == len(clocks), clocks
    assert len(set(nexts)) > 1 and all(n.startswith("Next:    9m") for n in nexts), nexts


# --- -l, -o wide, completion, the kubectl plugin ----------------------------------------------------
async def test_selector_and_wide_list(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    for name, team in (("cart", "shop"), ("pay", "payments"), ("loose", None)):
        body = route_body(name, annotations={ann.CANARY: "whoami-v2", ann.INTERVAL: "2m"})
        if team:
            body["metadata"]["labels"] = {"team": team}
        await create_route(api, namespace, body)
    out = run_cli(stack, "status", "-n", namespace, "-l", "team=shop")
    assert out.returncode == 0, out.stderr
    assert [line.split()[1] for line in out.stdout.splitlines()[1:]] == ["cart"]
    out = run_cli(stack, "status", "-n", namespace, "--selector", "team")
    assert [line.split()[1] for line in out.stdout.splitlines()[1:]] == ["cart", "pay"]
    out = run_cli(stack, "status", "-n", namespace, "-l", "team=nobody")
    assert out.stdout == "no routes with canaryd annotations found\n"
    out = run_cli(stack, "status", "-n", namespace, "-l", "team=shop", "-o", "json")
    assert [i["route"] for i in json.loads(out.stdout)["items"]] == ["cart"]
    out = run_cli(stack, "status", "-n", namespace, "-l", "not a selector")
    assert out.returncode == 1 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    out = run_cli(stack, "status", "cart", "-n", namespace, "-l", "team=shop")
    assert out.returncode == 1 and "-l/--selector filters the list" in out.stderr

    out = run_cli(stack, "status", "-n", namespace, "-o", "wide")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == [*render.LIST_HEADER[:-1], "STEPS", "INTERVAL", "ANALYSIS", "UPDATED", "MESSAGE"]
    cart = next(r for r in rows if r.split()[1] == "cart")
    starts = [header.index(f" {h}") + 1 for h in ("STEPS", "INTERVAL", "ANALYSIS", "UPDATED", "MESSAGE")]
    cells = [cart[a:b].strip() for a, b in itertools.pairwise(starts)]
    # Pending (no controller here): the annotated interval, the daemon's defaults for the rest.
    assert cells == ["default", "2m", "default", "-"], cart


async def test_completion_scripts_complete_in_bash(stack: Stack) -> None:
    script = run_cli(stack, "completion", "bash", no_kubeconfig=True)
    assert script.returncode == 0, script.stderr

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        probe = (
            f"{script.stdout}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            '_canaryd; printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        got = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, check=True)
        return got.stdout.split()

    assert complete("canaryd st") == ["status"]
    assert complete("canaryd status -o ") == ["table", "wide", "json", "yaml"]
    assert complete("canaryd status -n shop -o w") == ["wide"]
    assert "--selector" in complete("canaryd status --s") and "--watch" in complete("canaryd status --w")
    assert complete("canaryd promote whoami --f") == ["--full"]
    assert complete("canaryd completion ") == ["bash", "zsh", "fish"]
    assert complete("canaryd --v") == ["--version"]
    for shell in ("zsh", "fish"):
        out = run_cli(stack, "completion", shell, no_kubeconfig=True)
        assert out.returncode == 0 and "status" in out.stdout and "--selector" in out.stdout


async def test_kubectl_plugin(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    await create_route(api, namespace, route_body("plugged", annotations={ann.CANARY: "whoami-v2"}))
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "kubectl-canaryd").is_file(), "kubectl-canaryd is a console script: reinstall (make venv)"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("NO_COLOR",)},
        "PATH": f"{venv_bin}{os.pathsep}{stack.bin_dir}{os.pathsep}/usr/bin:/bin",
        "KUBECONFIG": str(stack.kubeconfig),
    }

    def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False
        )

    assert str(venv_bin / "kubectl-canaryd") in kubectl("plugin", "list").stdout
    out = kubectl("canaryd", "status", "-A")
    assert out.returncode == 0, out.stderr
    assert [namespace, "plugged", "Pending"] in [line.split()[:3] for line in out.stdout.splitlines()]
    helped = kubectl("canaryd", "status", "--help")
    assert helped.stdout.startswith("usage: kubectl canaryd status ")
    assert "  kubectl canaryd status -A -o wide" in helped.stdout
    assert kubectl("canaryd", "--version").stdout.strip().startswith("canaryd ")


# --- intents the controller would ignore are refused ------------------------------------------------
async def test_retry_on_promoted_is_refused(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    st = PHASE_STATES["promoted"]
    body = route_body(
        "done",
        backends=(("whoami-v1", 0), ("whoami-v2", 100)),
        annotations={ann.CANARY: "whoami-v2", ann.STEPS: "5,25,50,100", ann.STATE: st.to_annotation()},
    )
    rv = (await create_route(api, namespace, body))["metadata"]["resourceVersion"]
    out = run_cli(stack, "retry", "done", "-n", namespace)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(
        f"error: retry httproute {namespace}/done refused, nothing written: retry needs a rolled-back or failed "
        "rollout, this one is Promoted: the controller would record the intent as ignored and change nothing."
    ), out.stderr
    assert f"point {ann.CANARY} at its backend" in out.stderr and len(out.stderr.splitlines()) == 1
    after = await get_route(api, namespace, "done")
    assert after["metadata"]["resourceVersion"] == rv and ann.INTENT not in after["metadata"]["annotations"]


async def test_every_intent_predicted_ignored_is_refused(stack: Stack, api: client.ApiClient, namespace: str) -> None:
    refused: set[tuple[str, str]] = set()
    for phase, st in PHASE_STATES.items():
        w = ROUTE_WEIGHTS[phase]
        body = route_body(
            phase,
            backends=(("whoami-v1", 100 - w), ("whoami-v2", w)),
            annotations={ann.CANARY: "whoami-v2", ann.STEPS: "5,25,50,100", ann.STATE: st.to_annotation()},
        )
        await create_route(api, namespace, body)
        for intent in ann.INTENTS:
            before = await get_route(api, namespace, phase)
            predicted = control.predict(intent, before, Settings().defaults, datetime.now(UTC))
            code = await cli(stack, intent, phase, "-n", namespace)
            after = await get_route(api, namespace, phase)
            if predicted.applies:
                assert code == 0 and after["metadata"]["annotations"][ann.INTENT] == intent, (phase, intent)
                await patch_route(api, namespace, phase, {"metadata": {"annotations": {ann.INTENT: None}}})
            else:
                assert code == 1, (phase, intent, predicted.text)
                assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (phase, intent)
                refused.add((phase, intent))
    # decide()'s own table (ignored_reason): what makes no sense in each phase.
    assert {
        ("promoted", "promote"),
        ("promoted", "retry"),
        ("promoted", "pause"),
        ("promoted", "resume"),
        ("rolledback", "abort"),
        ("rolledback", "pause"),
        ("paused", "pause"),
        ("progressing", "resume"),
        ("progressing", "retry"),
        ("waiting", "retry"),
    } <= refused, sorted(refused)
    assert ("rolledback", "retry") not in refused and ("paused", "resume") not in refused


async def test_daemon_refuses_bad_default_steps_at_start(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "canaryd.yaml"
    bad.write_text("defaults:\n  steps: [50, 10, 100]\n")
    out = run_cli(stack, "run", env={"CANARYD_CONFIG_FILE": str(bad)}, no_kubeconfig=True)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "error: invalid settings: defaults.steps: steps must increase: 50 then 10 (the rule of canaryd.io/steps); "
        "fix the settings file (CANARYD_CONFIG_FILE) or the CANARYD_* environment variable (nested keys with "
        "'__', e.g. CANARYD_DEFAULTS__STEPS)"
    )
