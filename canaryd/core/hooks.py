"""Which hooks a route uses and which of them are still due (pure: the I/O is ``canaryd.hooks``).

The cluster admin configures named hooks and notifiers; ``HookCatalog`` is what the core needs to
know of them (names and kinds). A route names hooks with ``canaryd.io/hooks`` and notifiers with
``canaryd.io/notify``; it can never give a URL. The state records every hook that answered (gates)
or was fired (triggers) as ``kind:step:name`` in ``RolloutState.hooks_done``, so a restart neither
repeats an answered gate nor fires a trigger twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from canaryd.core.errors import SpecError
from canaryd.core.spec import HOOKS, NOTIFY

NOTIFY_NONE = "none"


@dataclass(frozen=True)
class HookCatalog:
    """The configured hooks (name -> kinds it takes) and notifiers, as the core sees them."""

    hooks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notifiers: tuple[str, ...] = ()
    default_notifiers: tuple[str, ...] = ()


def _known(names: Sequence[str]) -> str:
    return ", ".join(sorted(names)) if names else "none configured"


def _names(annotation: str, raw: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    items = [x.strip() for x in raw.split(",") if x.strip()]
    for item in items:  # a URL anywhere is the thing to say first: routes never choose endpoints
        if "/" in item or ":" in item:
            raise SpecError(
                annotation,
                f"{item[:200]!r} is not a {what} name: routes name {what}s the cluster admin configured, "
                f"they cannot give URLs; configured {what}s: {_known(known)}",
            )
    out: list[str] = []
    for item in items:
        if item not in known:
            raise SpecError(annotation, f"unknown {what} {item[:200]!r}; configured {what}s: {_known(known)}")
        if item not in out:
            out.append(item)
    return tuple(out)


def route_hooks(annotations: Mapping[str, str], catalog: HookCatalog) -> tuple[str, ...]:
    """The hooks a route opted into (in order, deduplicated); () when absent. SpecError for unknown names."""
    raw = annotations.get(HOOKS)
    return () if raw is None else _names(HOOKS, raw, tuple(catalog.hooks), "hook")


def route_notifiers(annotations: Mapping[str, str], catalog: HookCatalog) -> tuple[str, ...] | None:
    """The notifiers a route chose: None = absent (the cluster default), () = ``none``."""
    raw = annotations.get(NOTIFY)
    if raw is None:
        return None
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not items:
        raise SpecError(NOTIFY, f"empty; name notifiers, write {NOTIFY_NONE} to opt out, or remove it")
    if NOTIFY_NONE in items:
        if len(items) > 1:
            raise SpecError(NOTIFY, f"{NOTIFY_NONE} opts out and cannot be combined with notifier names")
        return ()
    return _names(NOTIFY, raw, catalog.notifiers, "notifier")


def key(kind: str, step: int, name: str) -> str:
    return f"{kind}:{step}:{name}"


def due(catalog: HookCatalog, names: Sequence[str], kind: str, step: int, done: Sequence[str]) -> tuple[str, ...]:
    """The route's hooks taking ``kind`` that have not answered (or fired) for ``step`` yet."""
    return tuple(n for n in names if kind in catalog.hooks.get(n, ()) and key(kind, step, n) not in done)
