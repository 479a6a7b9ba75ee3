"""Hooks (gates and triggers the engine waits on) and notifications (fire and forget).

The cluster admin names every endpoint in ``Settings.hooks`` (a ``HooksSettings``); a route only
opts in by name (``canaryd.io/hooks: smoke-test,load``, ``canaryd.io/notify: team-a``). No route
can make canaryd call a URL of its own. See docs/hooks.md for the settings and the semantics, and
docs/hook-payload-schema.json for the payload.

Interface for the engine::

    from canaryd.hooks import (
        HooksSettings, HookRunner, Notifier, HookResult,
        parse_route_hooks, parse_route_notify, hooks_for, payload_from_state,
    )

    # Parsing (pure; raise canaryd.core.errors.SpecError(annotation, message) -> route Failed):
    names = parse_route_hooks(annotations, settings.hooks)    # list[str]; [] when absent
    notify = parse_route_notify(annotations, settings.hooks)  # list[str] | None; None = cluster default
    hooks_for(settings.hooks, names, "confirm-step")          # the route's hooks taking that kind

    # Payload (pure): the state gives step (1-based), plan, pair, weights, rollout_id.
    p = payload_from_state(kind="HookCall", name=n, type="confirm-step",
                           namespace=ns, route=route, state=state, at=now)

    # I/O: one of each per process, closed on shutdown.
    runner = HookRunner(settings.hooks, metrics_registry=metrics.registry)
    result = await runner.call(n, "confirm-step", p)    # HookResult(ok, status, reason, duration_s, outcome)
    notifier = Notifier(settings.hooks, metrics_registry=metrics.registry)
    notifier.notify_soon(payload_from_state(kind="Notification", type="transition", ...), notify)
    await runner.aclose(); await notifier.aclose()

``HookRunner.call`` and ``Notifier.notify`` never raise (but for cancellation): an unknown hook,
an unreadable secret, a refusal, a timeout or an unreachable endpoint are all a ``HookResult`` with
``ok=False`` and the reason to show in the route's status. Only a 2xx is ``ok``.
"""

from canaryd.hooks.client import HookResult, HookRunner, Notifier, Outcome
from canaryd.hooks.config import (
    HOOK_KINDS,
    HOOKS_ANNOTATION,
    NOTIFY_ANNOTATION,
    HookConfig,
    HookKind,
    HooksSettings,
    NotifierConfig,
    hooks_for,
    notifiers_for,
    parse_route_hooks,
    parse_route_notify,
)
from canaryd.hooks.payload import API_VERSION, build_payload, payload_from_state, rollout_id, slack_message

__all__ = [
    "API_VERSION",
    "HOOKS_ANNOTATION",
    "HOOK_KINDS",
    "NOTIFY_ANNOTATION",
    "HookConfig",
    "HookKind",
    "HookResult",
    "HookRunner",
    "HooksSettings",
    "Notifier",
    "NotifierConfig",
    "Outcome",
    "build_payload",
    "hooks_for",
    "notifiers_for",
    "parse_route_hooks",
    "parse_route_notify",
    "payload_from_state",
    "rollout_id",
    "slack_message",
]
