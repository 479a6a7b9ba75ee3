"""A GitOps tool puts the route's manifest back mid-rollout: canaryd notices, says so, re-asserts once, then holds.

What Argo CD's self-heal (a client-side ``kubectl apply``) and Flux's drift correction (a server-side apply
with ``--force-conflicts``) do on every sync, done here with the real ``kubectl`` against the real apiserver
while the real engine runs in-process. Everything is asserted from the route, its Events and its
managedFields, and from ``canaryd status`` as a user would run it (docs/gitops.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState
from devkit.devstack import controlplane
from tests.conftest import Stack
from tests.kubeobjects import create_backend, eventually, get_route, route_body, route_events, running_engine, weights

REPO = Path(__file__).resolve().parents[2]
STABLE, CANARY = "whoami-v1", "whoami-v2"
# One long step: the rollout stays at 20 % while the test overwrites it (nothing here waits for a clock).
ANNOTATIONS = {ann.CANARY: CANARY, ann.STEPS: "20,50,100", ann.INTERVAL: "1h"}


def manifest(namespace: str, annotations: dict[str, str]) -> str:
    """The route as it is kept in git: weights 100/0, canaryd's annotations, nothing canaryd writes."""
    body = route_body("whoami", annotations=annotations)
    body["metadata"]["namespace"] = namespace
    return yaml.safe_dump(body)


def state_of(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


def pair(route: dict[str, Any]) -> tuple[int, int]:
    w = weights(route)
    return w[STABLE], w[CANARY]


async def kubectl(stack: Stack, *args: str, input: str | None = None) -> str:
    return await asyncio.to_thread(stack.kubectl, *args, input=input)


async def wait_route(api: client.ApiClient, namespace: str, what: str, ok: Any) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await get_route(api, namespace, "whoami")
        st = state_of(r)
        return r if st is not None and ok(r, st) else None

    return await eventually(check, timeout=30, what=f"{namespace}/whoami: {what}")


async def overwrites(api: client.ApiClient, namespace: str, n: int) -> list[client.CoreV1Event]:
    async def found() -> list[client.CoreV1Event] | None:
        evs = [e for e in await route_events(api, namespace, "whoami") if e.reason == "WeightsOverwritten"]
        return evs if len(evs) >= n else None

    return await eventually(found, timeout=30, what=f"{n} WeightsOverwritten events")


async def backends(api: client.ApiClient, namespace: str) -> None:
    for name in ("whoami", STABLE, CANARY):
        await create_backend(api, namespace, name)


def status_cli(stack: Stack, namespace: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "NO_COLOR")}
    argv = [sys.executable, "-m", "canaryd", "status", "whoami", "-n", namespace, "--kubeconfig", str(stack.kubeconfig)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=True)
    return out.stdout


async def test_kubectl_apply_mid_rollout_is_reasserted_once_then_held(
    stack: Stack, api: client.ApiClient, namespace: str
) -> None:
    await backends(api, namespace)
    git = manifest(namespace, ANNOTATIONS)
    async with running_engine(api, namespace) as engine:
        await kubectl(stack, "apply", "-f", "-", input=git)  # Argo CD's default: a client-side apply
        r = await wait_route(api, namespace, "at step 1", lambda r, st: st.step == 0 and pair(r) == (80, 20))
        assert r["metadata"]["labels"][ann.PHASE_LABEL] == "Progressing"  # written with the state
        owned = next(m for m in r["metadata"]["managedFields"] if m["manager"] == "canaryd")
        assert owned["operation"] == "Update" and "f:rules" in owned["fieldsV1"]["f:spec"]
        assert "f:canaryd.io/state" in owned["fieldsV1"]["f:metadata"]["f:annotations"]

        # The sync puts the manifest's weights back: canaryd writes its own once more and says so.
        await kubectl(stack, "apply", "-f", "-", input=git)
        [ev] = await overwrites(api, namespace, 1)
        assert ev.type == "Warning" and f"{STABLE} 100, {CANARY} 0" in ev.message
        assert f"canaryd wrote {STABLE} 80, {CANARY} 20" in ev.message and "docs/gitops.md" in ev.message
        r = await wait_route(api, namespace, "re-asserted", lambda r, st: st.drifts == 1 and pair(r) == (80, 20))
        st = state_of(r)
        assert st is not None and st.phase == Phase.PROGRESSING and st.step == 0 and "re-asserted" in st.message
        assert st.message in status_cli(stack, namespace)

        # The next sync does it again: canaryd pauses instead of fighting, and leaves the weights alone.
        await kubectl(stack, "apply", "-f", "-", input=git)
        evs = await overwrites(api, namespace, 2)
        assert "canaryd resume" in evs[-1].message
        r = await wait_route(api, namespace, "held", lambda r, st: st.drift_held)
        st = state_of(r)
        assert st is not None and st.phase == Phase.PAUSED and st.drifts == 2
        assert pair(r) == (100, 0)  # the revision that holds: only the state was written
        assert r["metadata"]["labels"][ann.PHASE_LABEL] == "Paused"
        shown = status_cli(stack, namespace)
        assert "Paused" in shown and "weights overwritten again" in shown and "canaryd resume" in shown
        printed = await kubectl(stack, "get", "httproute", "-n", namespace, "-L", ann.PHASE_LABEL)
        assert "Paused" in printed.splitlines()[1]

        # Once the GitOps tool leaves the weights to canaryd, `resume` writes them back.
        await kubectl(stack, "annotate", "httproute", "whoami", "-n", namespace, f"{ann.INTENT}=resume")
        r = await wait_route(api, namespace, "resumed", lambda r, st: st.phase == Phase.PROGRESSING)
        st = state_of(r)
        assert st is not None and not st.drift_held and pair(r) == (80, 20)
        assert r["metadata"]["labels"][ann.PHASE_LABEL] == "Progressing"
        sample = engine.metrics.registry.get_sample_value(
            "canaryd_weight_overwrites_total", {"namespace": namespace, "route": "whoami"}
        )
        assert sample == 2

    # Every write canaryd made names it: the route's weights and state above, its Events here.
    raw = json.loads(await kubectl(stack, "get", "events", "-n", namespace, "-o", "json", "--show-managed-fields"))
    ours = [e for e in raw["items"] if e["source"].get("component") == "canaryd"]
    assert ours and all([m["manager"] for m in e["metadata"]["managedFields"]] == ["canaryd"] for e in ours)


async def test_flux_style_forced_server_side_apply_with_hold_pauses_at_once(
    stack: Stack, api: client.ApiClient, namespace: str
) -> None:
    await backends(api, namespace)
    git = manifest(namespace, {**ANNOTATIONS, ann.ON_DRIFT: "hold"})
    flux = ("apply", "--server-side", "--field-manager=kustomize-controller", "-f", "-")
    async with running_engine(api, namespace):
        await kubectl(stack, *flux, input=git)
        await wait_route(api, namespace, "at step 1", lambda r, st: st.step == 0 and pair(r) == (80, 20))
        # rules is an atomic list, now canaryd's: a plain server-side apply is refused as a conflict ...
        refused = await asyncio.to_thread(controlplane.kubectl, stack.info, *flux, input=git, check=False)
        assert refused.returncode != 0 and "conflict" in refused.stderr.lower()
        # ... and a forced one (what drift correction does) takes it back: canaryd pauses at once.
        await kubectl(stack, *flux[:-2], "--force-conflicts", "-f", "-", input=git)
        [ev] = await overwrites(api, namespace, 1)
        assert "pausing" in ev.message
        r = await wait_route(api, namespace, "held", lambda r, st: st.drift_held)
        st = state_of(r)
        assert st is not None and st.phase == Phase.PAUSED and st.drifts == 1 and pair(r) == (100, 0)
        assert st.paused_phase == Phase.PROGRESSING.value
