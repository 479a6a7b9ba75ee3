"""Property: whatever a user writes into ``canaryd.io/*``, the daemon stays up and each route either
rolls out correctly or goes Failed with an Event naming the annotation, its spec untouched.

Hypothesis draws batches of annotation sets — valid and invalid values of every annotation: numbers
in and out of range, garbage strings, huge values, unicode, empty strings, conflicting combinations
— and each batch runs against the real apiserver with ``canaryd run`` as a subprocess (one fresh
namespace and daemon per batch). Every stored revision of every route is then read back from etcd
(``devkit.chaos.etcd_history``), so a write between two polls cannot hide.

The generator knows which values are invalid by construction (the oracle); canaryd's parser is not
consulted. One explicit batch covers every annotation once (each with an invalid value, plus one
route with all of them valid); four drawn batches of 20 routes mix the rest. Derandomized and without
shrinking, so CI runs the same batches in bounded time (about 20-40 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from hypothesis import strategies as st
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase as RolloutPhase
from devkit.chaos.etcd_history import EtcdReader, HistoryCollector, Revision, route_key
from devkit.chaos.invariants import canary_pct, foreign_of, state_of
from tests.conftest import Stack
from tests.daemons import Daemon
from tests.kubeobjects import create_backend, create_route, route_body

pytestmark = pytest.mark.timeout(240)

BATCHES = 4
ROUTES_PER_BATCH = 20
SETTLE_S = 30.0
STABLE, CANARY = "whoami-v1", "whoami-v2"
UNKNOWN = ann.PREFIX + "unknown-key"  # not an annotation canaryd knows: refused, whatever it holds
TYPO = ann.PREFIX + "sucess-rate-min"  # refused with a did-you-mean

HUGE = "9" * 60_000
GARBAGE_TEXT = ["ünïcødé", "⏱", "½", "日本語", "\t", " ", "null", "{}", "0x10", "1_000"]

VALID: dict[str, list[str]] = {
    ann.STABLE: [STABLE, "", f" {STABLE} "],
    ann.INTERVAL: ["100ms", "0.1s", "0.5s", "1", "1s", " 2s ", "1.5s", "500ms", "1m", "24h"],
    ann.READY_DEADLINE: ["1s", "300", "5m", "7d"],
    ann.ANALYSIS: ["none", "", " none ", "none,none"],
    ann.ANALYSIS_WINDOW: ["1s", "1m", "24h"],
    ann.SUCCESS_RATE_MIN: ["0", "99", "99.5%", "100", " 50 "],
    ann.LATENCY_MAX: ["1ms", "250ms", "1h"],
    ann.LATENCY_QUANTILE: ["0.5", "0.99", "0.999"],
    ann.MIN_REQUESTS: ["1", "100", "1000000000"],
    ann.MAX_INCONCLUSIVE: ["1", "5", "1000000"],
    ann.ON_INCONCLUSIVE: ["pause", "rollback", " pause "],
    ann.CONFIDENCE: ["0.5", "0.99", "0.9999"],
    ann.TOLERANCE: ["0", "0.5", "100"],
    ann.FAILURE_THRESHOLD: ["1", "2", "1000", " 7 "],
    ann.MAX_ERRORS: ["1", "3", "1000"],
    ann.APP_ID: ["whoami", "a", "x" * 63],
    ann.STABLE_APP_ID: ["whoami-v1"],
    ann.CALLER_APP_ID: ["ingress"],
    ann.PORT: ["1", "80", "65535"],
    ann.ANALYSIS_INTERVAL: ["1s", "10s", "1h"],  # more than the interval is cut to it, not refused
    ann.COUNT_4XX: ["true", "false", " TRUE ", "no", "1"],
    ann.HOOKS: [""],  # empty = none (no hooks are configured here)
    ann.NOTIFY: ["none"],
    ann.ON_DRIFT: ["reassert", "hold", " hold "],
    "example.com/not-canaryds": ["", HUGE, *GARBAGE_TEXT],  # another prefix: none of canaryd's business
}
INVALID: dict[str, list[str]] = {
    ann.CANARY: ["", "Whoami-V2", "x" * 70, "ünï", "whoami-v3", "whoami_v2", HUGE],
    ann.STABLE: [CANARY, "Bad_Name", "no-such-backend"],
    ann.INTERVAL: ["", "0s", "99ms", "25h", "2d", "1x", "-1s", "1e3s", "nan", "inf", "9" * 400, "1 s s", *GARBAGE_TEXT],
    ann.READY_DEADLINE: ["30d", "0.5s", "abc", ""],
    ann.ANALYSIS: ["bogus", "envoy;", "custom:", "CUSTOM:x", "custom:-x", "ünï", "envoy,bogus"],
    ann.ANALYSIS_WINDOW: ["500ms", "25h", "x"],
    ann.SUCCESS_RATE_MIN: ["101", "-1", "nan", "inf", "abc", "", "1e400"],
    ann.LATENCY_MAX: ["0ms", "2h", "fast"],
    ann.LATENCY_QUANTILE: ["0.4", "1", "0.9995", "nan"],
    ann.MIN_REQUESTS: ["0", "1e3", "1000000001", "-1", "9" * 40],
    ann.MAX_INCONCLUSIVE: ["0", "1000001", "x"],
    ann.ON_INCONCLUSIVE: ["Pause", "stop", ""],
    ann.CONFIDENCE: ["0.49", "1", "nan"],
    ann.TOLERANCE: ["-0.1", "100.5", "inf"],
    ann.FAILURE_THRESHOLD: ["0", "1001", "3.5", "abc", "", "9" * 50],
    ann.MAX_ERRORS: ["0", "1001", "2.0", "∞"],
    ann.APP_ID: ['whoami"} or vector(1) #', "UPPER", "", "a_b", "x" * 64],
    ann.STABLE_APP_ID: ["", "v1.2"],
    ann.CALLER_APP_ID: ["in gress"],
    ann.PORT: ["0", "65536", "http", "-80", "80.0"],
    ann.ANALYSIS_INTERVAL: ["500ms", "2h", "x"],
    ann.COUNT_4XX: ["maybe", "", "2"],
    ann.HOOKS: ["smoke-test", "http://hooks.example/x", "a/b"],  # none configured: every name is unknown
    ann.NOTIFY: ["", "team-a", "none,team-a"],
    ann.ON_DRIFT: ["Hold", "fight", ""],
    UNKNOWN: ["", "anything", *GARBAGE_TEXT, HUGE],
    TYPO: ["99"],
}
BAD_STEPS = ["", ",", "0,50", "50,10", "10,10", "101", "abc", "5,x", "1e2", "-5", "5.5", "5;10", "5," + HUGE, "½"]


@st.composite
def steps_text(draw: st.DrawFn) -> str:
    values = sorted(draw(st.lists(st.integers(1, 100), min_size=1, max_size=6, unique=True)))
    sep = draw(st.sampled_from([",", ", ", " ,"]))
    pct = draw(st.booleans())
    return sep.join(f"{v}%" if pct else str(v) for v in values)


@st.composite
def annotation_set(draw: st.DrawFn) -> tuple[dict[str, str], frozenset[str]]:
    """(annotations, the annotations that are invalid: empty when the route must roll out)."""
    valid = draw(st.booleans())
    keys = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=6))
    bad = frozenset() if valid else draw(st.sets(st.sampled_from(sorted(INVALID)), min_size=1, max_size=2))
    a: dict[str, str] = {ann.CANARY: CANARY}
    for k in sorted(keys | bad):
        if k in bad:
            a[k] = draw(st.sampled_from(INVALID[k]))
        elif k in VALID:
            a[k] = draw(st.sampled_from(VALID[k]))
    invalid = set(bad)
    # The steps: one of the ways to give them, some of which are wrong together.
    mode = draw(
        st.sampled_from(["default", "steps", "step-weight", "step+max"] if valid else ["steps", "step+max", "mixed"])
    )
    if mode == "steps":
        if valid or draw(st.booleans()):
            a[ann.STEPS] = draw(steps_text())
        else:
            a[ann.STEPS] = draw(st.sampled_from(BAD_STEPS))
            invalid.add(ann.STEPS)
    elif mode in ("step-weight", "step+max"):
        sw = draw(st.integers(1, 100))
        a[ann.STEP_WEIGHT] = str(sw)
        if mode == "step+max":
            if valid or draw(st.booleans()):
                a[ann.MAX_WEIGHT] = str(draw(st.integers(sw, 100)))
            else:
                a[ann.MAX_WEIGHT] = draw(st.sampled_from(["0", "101", "x", str(sw - 1) if sw > 1 else "0"]))
                invalid.add(ann.MAX_WEIGHT)
    elif mode == "mixed":
        which = draw(st.sampled_from(["both", "max-alone", "bad-step-weight"]))
        if which == "both":  # steps and step-weight together: refused, naming steps
            a[ann.STEPS], a[ann.STEP_WEIGHT] = "10,100", "10"
            invalid.add(ann.STEPS)
        elif which == "max-alone":
            a[ann.MAX_WEIGHT] = "50"
            invalid.add(ann.MAX_WEIGHT)
        else:
            a[ann.STEP_WEIGHT] = draw(st.sampled_from(["0", "101", "abc", "", "1e1"]))
            invalid.add(ann.STEP_WEIGHT)
    return a, frozenset(invalid)


def every_annotation_once() -> list[tuple[dict[str, str], frozenset[str]]]:
    """The explicit batch: each annotation once with an invalid value (the last, often the nastiest,
    of its list), and one route carrying every annotation with a valid value."""
    batch = [({ann.CANARY: CANARY, k: values[-1]}, frozenset({k})) for k, values in sorted(INVALID.items())]
    if ann.CANARY in INVALID:  # the canary's own case replaces the default canary
        batch = [(a, bad) if bad != {ann.CANARY} else ({ann.CANARY: INVALID[ann.CANARY][-1]}, bad) for a, bad in batch]
    batch.append(({ann.CANARY: CANARY, ann.STEPS: BAD_STEPS[-1]}, frozenset({ann.STEPS})))
    batch.append(({ann.CANARY: CANARY, ann.STEPS: "10, 50%", **{k: v[0] for k, v in VALID.items()}}, frozenset()))
    return batch


def _spec_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj["spec"], sort_keys=True, ensure_ascii=False).encode()


async def _settled(api: client.ApiClient, ns: str, batch: dict[str, frozenset[str]]) -> dict[str, str]:
    """Routes not yet at their first outcome, with why (empty: all settled)."""
    co = client.CustomObjectsApi(api)
    routes = await co.list_namespaced_custom_object("gateway.networking.k8s.io", "v1", ns, "httproutes")
    evs = await client.CoreV1Api(api).list_namespaced_event(ns)
    spec_events = {e.involved_object.name for e in evs.items if e.reason == "InvalidSpec"}
    waiting: dict[str, str] = {}
    for obj in routes["items"]:
        name = obj["metadata"]["name"]
        st, err = state_of(obj)
        if err is not None:
            waiting[name] = f"unparseable state: {err}"
        elif st is None:
            waiting[name] = "no state yet"
        elif batch[name]:
            if st.phase != RolloutPhase.FAILED or name not in spec_events:
                waiting[name] = f"{st.phase.value}, InvalidSpec event: {name in spec_events}"
        elif st.phase not in (RolloutPhase.PROGRESSING, RolloutPhase.PROMOTED) or st.step < 0:
            waiting[name] = f"{st.phase.value} at step {st.step}: {st.message}"
    return waiting


async def run_batch(
    stack: Stack, api: client.ApiClient, tmp: Path, batch: list[tuple[dict[str, str], frozenset[str]]]
) -> None:
    ns = f"prop-{secrets.token_hex(4)}"
    core = client.CoreV1Api(api)
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    for n in ("whoami", STABLE, CANARY):
        await create_backend(api, ns, n)
    expected: dict[str, frozenset[str]] = {}
    created: dict[str, dict[str, Any]] = {}
    for i, (annots, invalid) in enumerate(batch):
        name = f"r{i:02d}"
        expected[name] = invalid
        created[name] = await create_route(api, ns, route_body(name, annotations=annots))
        shown = {k: v[:80] for k, v in annots.items()}
        note(f"{name}: invalid={sorted(invalid)} {shown}")
        event("route with invalid annotations" if invalid else "route with valid annotations")
        for k in invalid:
            event(f"invalid {k}")

    d = Daemon(
        stack, ns, f"props-{ns}", tmp, leader_election=False, env={"CANARYD_PROMETHEUS__URL": "http://127.0.0.1:9"}
    )
    unhealthy: list[int] = []
    served = False
    waiting: dict[str, str] = {"-": "not checked"}
    try:
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            assert d.proc.poll() is None, f"the daemon exited with {d.proc.returncode}; log {d.log_path}"
            status, _ = await asyncio.to_thread(d.http, "/healthz")
            served = served or status == 200
            if served and status != 200:
                unhealthy.append(status)
            waiting = await _settled(api, ns, expected)
            if not waiting:
                break
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # a little longer: nothing may change for the worse
        status, _ = await asyncio.to_thread(d.http, "/healthz")
        assert d.proc.poll() is None, f"the daemon exited with {d.proc.returncode}; log {d.log_path}"
        assert status == 200 and served and not unhealthy, f"/healthz: final {status}, failures {unhealthy}"
    finally:
        rc = d.stop(signal.SIGTERM)
    assert rc == 0, f"SIGTERM gave rc {rc}; log {d.log_path}"
    assert not waiting, f"routes without their outcome after {SETTLE_S:g}s: {waiting}"

    await _check_history(stack, api, ns, expected, created)


async def _check_history(
    stack: Stack, api: client.ApiClient, ns: str, expected: dict[str, frozenset[str]], created: dict[str, Any]
) -> None:
    """Every stored revision of every route, from etcd; every problem of the batch is reported at once."""
    core = client.CoreV1Api(api)
    collector = HistoryCollector(EtcdReader(stack.info.etcd_url))
    for name in expected:
        collector.track(route_key(ns, name))
    await asyncio.to_thread(collector.collect)
    evs = (await core.list_namespaced_event(ns)).items
    problems: list[str] = []
    for name, invalid in expected.items():
        revs = collector.keys[route_key(ns, name)].ordered()
        warnings = [f"{e.reason}: {e.message}" for e in evs if e.involved_object.name == name and e.type == "Warning"]
        problems += _route_problems(name, invalid, revs, created[name], warnings)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


def _route_problems(
    name: str, invalid: frozenset[str], revs: list[Revision], created: dict[str, Any], warnings: list[str]
) -> list[str]:
    if not revs or revs[0].mod_revision != revs[0].create_revision:
        return [f"{name}: incomplete history"]
    out = [f"{name}@{r.mod_revision}: state does not parse: {err}" for r in revs for err in [state_of(r.obj)[1]] if err]
    if invalid:
        st, _ = state_of(revs[-1].obj)
        if st is None or st.phase != RolloutPhase.FAILED:
            return [*out, f"{name}: ended {st.phase.value if st else 'without state'}, not Failed"]
        # byte-equal in every revision, not only the last
        out += [f"{name}@{r.mod_revision}: spec changed" for r in revs if _spec_bytes(r.obj) != _spec_bytes(created)]
        spec_events = [w for w in warnings if w.startswith("InvalidSpec: ")]
        if not spec_events:
            out.append(f"{name}: no InvalidSpec event")
        elif not any(k in spec_events[0] for k in invalid):
            out.append(f"{name}: event {spec_events[0][:300]!r} names none of {sorted(invalid)}")
        if not any(k in st.message for k in invalid):
            out.append(f"{name}: state message {st.message[:300]!r} names none of {sorted(invalid)}")
        if spec_events and (len(spec_events[0]) > 1100 or len(st.message) >= 1000):
            out.append(f"{name}: message too long ({len(spec_events[0])}, {len(st.message)})")
        return out
    pcts = [canary_pct(r.obj, STABLE, CANARY) for r in revs]
    weights = [w for w in pcts if w is not None]
    if len(weights) != len(pcts) or weights[0] != 0:
        out.append(f"{name}: canary weights {pcts}")
    elif weights != sorted(weights):
        out.append(f"{name}: canary weights went down: {weights}")
    elif weights[-1] <= 0:
        out.append(f"{name}: never shifted traffic: {weights}")
    first = foreign_of(revs[0].obj, STABLE, CANARY)
    # canaryd wrote only the two weights and its own annotations
    changed = [r.mod_revision for r in revs[1:] if foreign_of(r.obj, STABLE, CANARY) != first]
    out += [f"{name}@{rev}: foreign fields changed" for rev in changed]
    if warnings:  # valid input: nothing to warn about
        out.append(f"{name}: valid annotations yet Warning events {[w[:200] for w in warnings]}")
    return out


@settings(
    max_examples=BATCHES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: each example is a real batch with its own daemon
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(batch=st.lists(annotation_set(), min_size=ROUTES_PER_BATCH, max_size=ROUTES_PER_BATCH))
@example(batch=every_annotation_once())
async def test_random_annotations_roll_out_or_fail_naming_the_annotation(
    stack: Stack, api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory, batch: Any
) -> None:
    await run_batch(stack, api, tmp_path_factory.mktemp("props"), batch)
