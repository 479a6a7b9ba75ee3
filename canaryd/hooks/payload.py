"""The JSON document every hook call and notification carries, and its Slack rendering (pure).

The shape is ``docs/hook-payload-schema.json`` (``canaryd.io/v1``: fields are only ever added)::

    {"apiVersion": "canaryd.io/v1", "kind": "HookCall", "hook": "smoke-test", "type": "confirm-step",
     "namespace": "shop", "route": "whoami", "phase": "Progressing", "step": 2, "steps": [5, 10, 25, 50, 100],
     "canary": "whoami-v2", "stable": "whoami-v1", "weights": {"stable": 90, "canary": 10},
     "verdict": "pass", "reason": "step 2/5: whoami-v1 90 → whoami-v2 10",
     "rollout_id": "1f0c9d6b2e8a4c7d5b3a9e1f", "at": "2026-12-01T10:02:00.000Z"}

``step`` is 1-based (the step whose weights are written; 0 = no traffic shifted yet, as at
pre-rollout), ``rollout_id`` is stable for one rollout across restarts (see ``rollout_id``), and
``hook`` of a Notification is the notifier's name (``Notifier.notify`` fills it in).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from canaryd.core.state import RolloutState, ts

API_VERSION = "canaryd.io/v1"
NOTIFICATION_TYPE = "transition"
PayloadKind = Literal["HookCall", "Notification"]

_SLACK_TEXT_LIMIT = 2900  # Slack refuses a section text over 3000 characters
_SLACK_FIELD_LIMIT = 1900  # ... and a field over 2000
_PHASE_EMOJI = {
    "Progressing": ":arrow_forward:",
    "WaitingForEndpoints": ":hourglass_flowing_sand:",
    "Paused": ":double_vertical_bar:",
    "Promoted": ":white_check_mark:",
    "RolledBack": ":rewind:",
    "Failed": ":x:",
}


def rollout_id(namespace: str, route: str, canary: str, started_at: str) -> str:
    """A stable id for one rollout: the same after a restart (all four are in the route and its
    state), different for the next canary or a restarted rollout (a new ``started_at``)."""
    raw = "\x00".join((namespace, route, canary, started_at)).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def build_payload(
    *,
    kind: PayloadKind,
    name: str,
    type: str,
    namespace: str,
    route: str,
    phase: str,
    step: int,
    steps: Sequence[int],
    canary: str,
    stable: str,
    canary_weight: int,
    rollout_id: str,
    at: datetime,
    verdict: str | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """One payload. ``type`` is the hook kind for a HookCall, ``transition`` for a Notification;
    ``step`` is 1-based (0 = none yet); weights are percent, the stable's being the rest."""
    if not 0 <= canary_weight <= 100:
        raise ValueError(f"canary_weight {canary_weight} is not a percentage")
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "hook": name,
        "type": type,
        "namespace": namespace,
        "route": route,
        "phase": str(phase),
        "step": step,
        "steps": list(steps),
        "canary": canary,
        "stable": stable,
        "weights": {"stable": 100 - canary_weight, "canary": canary_weight},
        "verdict": None if verdict is None else str(verdict),
        "reason": reason,
        "rollout_id": rollout_id,
        "at": ts(at),
    }


def payload_from_state(
    *,
    kind: PayloadKind,
    type: str,
    namespace: str,
    route: str,
    state: RolloutState,
    at: datetime,
    name: str = "",
    verdict: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """``build_payload`` filled from the rollout's state: the step, plan, pair and weights it holds,
    ``reason`` defaulting to its message, and its ``rollout_id``. For a HookCall give ``name``; a
    Notification's ``name`` is filled in per notifier."""
    return build_payload(
        kind=kind,
        name=name,
        type=type,
        namespace=namespace,
        route=route,
        phase=state.phase.value,
        step=state.step + 1,
        steps=state.steps,
        canary=state.canary,
        stable=state.stable,
        canary_weight=state.canary_weight,
        rollout_id=rollout_id(namespace, route, state.canary, state.started_at),
        at=at,
        verdict=verdict,
        reason=state.message if reason is None else reason,
    )


def _esc(s: object) -> str:
    """Slack mrkdwn escaping: &, < and > are the control characters."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


def slack_message(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message (``{"text": ..., "blocks": [...]}``) for a payload.

    ``text`` is the fallback (notifications, screen readers); the blocks say the same with the
    fields laid out. Everything is escaped (``text`` is mrkdwn too), so a route name or reason
    cannot inject Slack markup such as ``<!channel>``.
    """
    ns, route, phase = payload.get("namespace", ""), payload.get("route", ""), str(payload.get("phase", ""))
    steps = payload.get("steps") or []
    weights = payload.get("weights") or {}
    step_txt = f"{payload.get('step', 0)}/{len(steps)}"
    canary_w, stable_w = weights.get("canary", 0), weights.get("stable", 0)
    reason = str(payload.get("reason") or "")
    title = f"{ns}/{route}: {phase}"
    text = f"{title} (step {step_txt}, canary {payload.get('canary', '')} {canary_w}%)"
    if reason:
        text += f": {reason}"
    fields = [
        ("Phase", phase),
        ("Step", step_txt),
        ("Canary", f"{payload.get('canary', '')} ({canary_w}%)"),
        ("Stable", f"{payload.get('stable', '')} ({stable_w}%)"),
    ]
    if payload.get("verdict"):
        fields.append(("Verdict", str(payload["verdict"])))
    if payload.get("kind") == "HookCall":
        fields.append(("Hook", f"{payload.get('hook', '')} ({payload.get('type', '')})"))
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _clip(f"{_PHASE_EMOJI.get(phase, ':information_source:')} *{_esc(title)}*", _SLACK_TEXT_LIMIT),
            },
        },
        {
            "type": "section",
            "fields": [{"type": "mrkdwn", "text": _clip(f"*{k}*\n{_esc(v)}", _SLACK_FIELD_LIMIT)} for k, v in fields],
        },
    ]
    if reason:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(_esc(reason), _SLACK_TEXT_LIMIT)}})
    blocks.append(
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": _esc(f"canaryd · rollout {payload.get('rollout_id', '')} · {payload.get('at', '')}"),
                }
            ],
        }
    )
    return {"text": _clip(_esc(text), _SLACK_TEXT_LIMIT), "blocks": blocks}
