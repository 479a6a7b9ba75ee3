"""What ``canaryd status`` shows: rows, the detail view and the ``-o json|yaml`` document.

Owns: turning HTTPRoute dicts (and their Events, as dicts) into text or a JSON-able document
for a given ``now``. Must not: do I/O, read the clock, or import kubernetes_asyncio — the
command module fetches the objects and passes ``now`` in, so the output is reproducible.
The document's shape is the public contract documented in ``docs/status-schema.json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from canaryd.core import spec as ann
from canaryd.core.admit import is_managed
from canaryd.core.backends import resolve_pair
from canaryd.core.errors import CanarydError, SpecError
from canaryd.core.plan import canary_percent
from canaryd.core.spec import RolloutDefaults
from canaryd.core.state import AnalysisRecord, Phase, RolloutState, parse_ts, ts

SCHEMA_VERSION = "canaryd.io/v1"
PENDING = "Pending"  # annotated for canaryd, no state written yet
UNKNOWN = "Unknown"  # the state annotation cannot be decoded

_RESET = "\x1b[0m"
_COLORS = {
    Phase.PROGRESSING.value: "\x1b[36m",  # cyan
    Phase.WAITING.value: "\x1b[33m",  # yellow
    Phase.PAUSED.value: "\x1b[33m",
    Phase.PROMOTED.value: "\x1b[32m",  # green
    Phase.ROLLED_BACK.value: "\x1b[31m",  # red
    Phase.FAILED.value: "\x1b[31m",
    PENDING: "\x1b[2m",  # dim
    UNKNOWN: "\x1b[31m",
}
_SYMBOLS = {
    Phase.PROGRESSING.value: "▶",
    Phase.WAITING.value: "⏳",
    Phase.PAUSED.value: "⏸",
    Phase.PROMOTED.value: "✓",
    Phase.ROLLED_BACK.value: "↩",
    Phase.FAILED.value: "✗",
    PENDING: "…",
    UNKNOWN: "?",
}
_VERDICT_COLORS = {"pass": "\x1b[32m", "fail": "\x1b[31m", "error": "\x1b[31m", "inconclusive": "\x1b[33m"}
_VERDICT_SYMBOLS = {"pass": "✓", "fail": "✗", "error": "!", "inconclusive": "?"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class RouteStatus:
    """One route as ``status`` sees it (decoded from the route dict, nothing fetched)."""

    namespace: str
    name: str
    annotations: Mapping[str, str]
    state: RolloutState | None
    state_error: str | None
    weights: tuple[str, int, str, int] | None  # stable, stable %, canary, canary % as on the route now
    pending_intent: str | None

    @property
    def phase(self) -> str:
        if self.state_error is not None:
            return UNKNOWN
        return PENDING if self.state is None else self.state.phase.value

    @classmethod
    def from_route(cls, obj: Mapping[str, Any]) -> RouteStatus:
        meta = obj["metadata"]
        a: dict[str, str] = dict(meta.get("annotations") or {})
        state: RolloutState | None = None
        error: str | None = None
        if ann.STATE in a:
            try:
                state = RolloutState.from_annotation(a[ann.STATE])
            except CanarydError as exc:
                error = str(exc)
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta["name"],
            annotations=a,
            state=state,
            state_error=error,
            weights=_route_weights(obj, a, state),
            pending_intent=a.get(ann.INTENT),
        )


def _route_weights(
    obj: Mapping[str, Any], a: Mapping[str, str], st: RolloutState | None
) -> tuple[str, int, str, int] | None:
    canary = st.canary if st and st.canary else a.get(ann.CANARY, "").strip()
    stable = st.stable if st and st.stable else (a.get(ann.STABLE, "").strip() or None)
    if not canary:
        return None
    try:
        pair = resolve_pair(obj, canary, stable)
    except (CanarydError, KeyError, TypeError, ValueError):
        if st is not None and st.stable:
            return (st.stable, 100 - st.canary_weight, st.canary, st.canary_weight)
        return None
    r0 = pair.rules[0]
    pct = round(canary_percent(r0.stable_weight, r0.canary_weight))
    return (pair.stable, 100 - pct, pair.canary, pct)


# --- formatting helpers -------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """kubectl-style short duration: 45s, 3m20s, 2h5m, 3d4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m}m{r}s" if r and m < 10 else f"{m}m"
    if s < 86400:
        h, r = divmod(s, 3600)
        return f"{h}h{r // 60}m" if r // 60 and h < 10 else f"{h}h"
    d, r = divmod(s, 86400)
    return f"{d}d{r // 3600}h" if r // 3600 and d < 10 else f"{d}d"


def _num(v: float | None, suffix: str = "") -> str:
    if v is None:
        return "-"
    text = f"{v:.3f}".rstrip("0").rstrip(".")
    return text + suffix


def _count(v: float | None) -> str:
    return "-" if v is None else f"{round(v):,}"


def weights_text(w: tuple[str, int, str, int] | None) -> str:
    if w is None:
        return "-"
    return f"{w[0]} {w[1]} → {w[2]} {w[3]}"


def step_text(st: RolloutState | None) -> str:
    if st is None or not st.steps:
        return "-"
    return f"{st.step + 1}/{len(st.steps)}"


def record_numbers(r: AnalysisRecord, *, evidence: bool = False) -> str:
    """'canary 99.5% vs stable 99.9%, 1,200 vs 4,800 req' (what is known of it)."""
    parts: list[str] = []
    if r.canary_success is not None or r.stable_success is not None:
        parts.append(f"canary {_num(r.canary_success, '%')} vs stable {_num(r.stable_success, '%')}")
    if r.canary_requests is not None:
        req = _count(r.canary_requests)
        if r.stable_requests is not None:
            req += f" vs {_count(r.stable_requests)}"
        parts.append(f"{req} req")
    if r.canary_latency_ms is not None:
        parts.append(f"{_num(r.canary_latency_ms)}ms vs {_num(r.stable_latency_ms)}ms")
    ev = evidence_text(r) if evidence else ""
    if ev:
        parts.append(ev)
    return ", ".join(parts)


def evidence_text(r: AnalysisRecord) -> str:
    """'evidence of harm 12.4 (rolls back at 125)', the cumulative test's standing after this round."""
    if r.evidence is None or r.threshold is None:
        return ""
    return f"evidence of harm {_sig(r.evidence)} (rolls back at {_sig(r.threshold)})"


def _sig(v: float) -> str:
    if v >= 1e6:
        return f"{v:.2g}"
    return f"{v:,.3g}" if v < 100 else f"{v:,.0f}"


def last_round(st: RolloutState | None) -> list[AnalysisRecord]:
    """The records of the latest analysis round (same step and time)."""
    if st is None or not st.history:
        return []
    last = st.history[-1]
    return [r for r in st.history if r.at == last.at and r.step == last.step]


def verdict_text(st: RolloutState | None, color: bool = False, *, evidence: bool = False) -> str:
    rnd = last_round(st)
    if not rnd:
        return "-"
    worst = next((r for v in ("error", "fail", "inconclusive", "pass") for r in rnd if r.verdict == v), rnd[0])
    nums = record_numbers(worst, evidence=evidence)
    label = worst.verdict
    if color:
        label = f"{_VERDICT_COLORS.get(label, '')}{_VERDICT_SYMBOLS.get(label, '')} {label}{_RESET}"
    if not nums:
        return f"{label} ({worst.signal})"
    return f"{label} {nums}"


def next_text(st: RolloutState | None, now: datetime) -> str:
    if st is None or st.phase.terminal or st.phase == Phase.PAUSED:
        return "-"
    due = parse_ts(st.next_at)
    if due is None:
        return "-"
    left = (due - now).total_seconds()
    return "due" if left <= 0 else duration(left)


def age_text(st: RolloutState | None, now: datetime) -> str:
    started = parse_ts(st.started_at) if st else None
    return "-" if started is None else duration((now - started).total_seconds())


def phase_text(phase: str, color: bool) -> str:
    if not color:
        return phase
    return f"{_COLORS.get(phase, '')}{_SYMBOLS.get(phase, '')} {phase}{_RESET}"


def message_of(rs: RouteStatus) -> str:
    if rs.state_error is not None:
        return rs.state_error
    msg = rs.state.message if rs.state else "waiting for the controller to pick the route up"
    if rs.pending_intent:
        msg = f"[intent {rs.pending_intent} pending] {msg}"
    return msg


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart; widths ignore colour codes; no trailing spaces."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(_ANSI.sub("", cell)))
    lines = []
    for row in (header, *rows):
        cells = [c + " " * (widths[i] - len(_ANSI.sub("", c))) for i, c in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines) + "\n"


# --- list view ----------------------------------------------------------------------------------
LIST_HEADER = ("NAMESPACE", "ROUTE", "PHASE", "STEP", "WEIGHTS", "VERDICT", "NEXT", "AGE", "MESSAGE")


def row(rs: RouteStatus, now: datetime, color: bool = False) -> tuple[str, ...]:
    st = rs.state
    return (
        rs.namespace,
        rs.name,
        phase_text(rs.phase, color),
        step_text(st),
        weights_text(rs.weights),
        verdict_text(st, color),
        next_text(st, now),
        age_text(st, now),
        message_of(rs),
    )


# -o wide: the plan, the timing and the signals as annotated ("default" = the daemon's default), and
# how long ago the controller last changed the state; MESSAGE stays last.
WIDE_HEADER = (*LIST_HEADER[:-1], "STEPS", "INTERVAL", "ANALYSIS", "UPDATED", LIST_HEADER[-1])


def wide_row(rs: RouteStatus, now: datetime, color: bool = False) -> tuple[str, ...]:
    st = rs.state
    steps = ",".join(map(str, st.steps)) if st is not None and st.steps else rs.annotations.get(ann.STEPS, "default")
    updated = parse_ts(st.updated_at) if st else None
    base = row(rs, now, color)
    return (
        *base[:-1],
        steps,
        rs.annotations.get(ann.INTERVAL, "default"),
        rs.annotations.get(ann.ANALYSIS, "default"),
        "-" if updated is None else duration((now - updated).total_seconds()),
        base[-1],
    )


def render_list(routes: Sequence[Mapping[str, Any]], now: datetime, *, color: bool = False, wide: bool = False) -> str:
    """The table of every managed route in ``routes`` (others are left out), sorted by namespace/name."""
    managed = sorted((RouteStatus.from_route(o) for o in routes if is_managed(o)), key=lambda r: (r.namespace, r.name))
    if not managed:
        return "no routes with canaryd annotations found\n"
    if wide:
        return table(WIDE_HEADER, [wide_row(r, now, color) for r in managed])
    return table(LIST_HEADER, [row(r, now, color) for r in managed])


# --- --wait: one line per change ----------------------------------------------------------------
def progress_key(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """What a ``--wait`` line reports, without the clock: a new line is printed when this changes."""
    rs = RouteStatus.from_route(obj)
    st = rs.state
    return (rs.phase, step_text(st), weights_text(rs.weights), verdict_text(st), message_of(rs))


def progress_line(obj: Mapping[str, Any], now: datetime) -> str:
    """'2025-03-01T12:00:00Z  shop/whoami  Progressing  step 2/4  v1 75 → v2 25  next 1m30s  verdict: …  message: …'."""
    rs = RouteStatus.from_route(obj)
    phase, step, weights, verdict, message = progress_key(obj)
    return (
        f"{_clock(now)}  {rs.namespace}/{rs.name}  {phase}  step {step}  {weights}  next {next_text(rs.state, now)}  "
        f"verdict: {verdict}  message: {message}\n"
    )


def _clock(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def outcome_line(obj: Mapping[str, Any], now: datetime) -> str:
    """The last line of ``--wait``: 'httproute shop/whoami Promoted after 10m (v1 0 → v2 100): message'."""
    rs = RouteStatus.from_route(obj)
    return (
        f"httproute {rs.namespace}/{rs.name} {rs.phase} after {age_text(rs.state, now)} "
        f"({weights_text(rs.weights)}): {message_of(rs)}\n"
    )


# --- detail view --------------------------------------------------------------------------------
def plan(st: RolloutState) -> list[tuple[int, str]]:
    """(weight, status) per step: done, current, next, pending; rolled-back/failed mark where it stopped."""
    out: list[tuple[int, str]] = []
    for i, w in enumerate(st.steps):
        if st.phase == Phase.PROMOTED:
            status = "done"
        elif st.phase in (Phase.ROLLED_BACK, Phase.FAILED):
            status = (
                "done"
                if i < st.step
                else (
                    "rolled back"
                    if i == st.step and st.phase == Phase.ROLLED_BACK
                    else "failed"
                    if i == st.step
                    else "skipped"
                )
            )
        elif i < st.step:
            status = "done"
        elif i == st.step:
            status = "current"
        elif i == st.step + 1:
            status = "next"
        else:
            status = "pending"
        out.append((w, status))
    return out


def _event_time(ev: Mapping[str, Any]) -> str | None:
    v = (
        ev.get("lastTimestamp")
        or ev.get("eventTime")
        or ev.get("firstTimestamp")
        or (ev.get("metadata") or {}).get("creationTimestamp")
    )
    return None if v is None else str(v)


def _ago(at: str | None, now: datetime) -> str:
    t = parse_ts(at)
    return "-" if t is None else f"{duration((now - t).total_seconds())} ago"


def effective_settings(annotations: Mapping[str, str], defaults: RolloutDefaults) -> list[tuple[str, str, str]]:
    """(setting, value, source) of a route's rollout, as ``parse_spec`` resolves it; [] if it does not parse."""
    try:
        spec = ann.parse_spec(annotations, defaults)
    except SpecError:
        return []
    if spec is None:
        return []
    a = spec.analysis
    rows = [
        ("steps", ",".join(map(str, spec.steps)), (ann.STEPS, ann.STEP_WEIGHT, ann.MAX_WEIGHT)),
        ("interval", _secs(spec.interval_s), (ann.INTERVAL,)),
        ("analysis", ",".join(a.signals) or "none (not analysed)", (ann.ANALYSIS,)),
        ("analysis-interval", _secs(a.interval_s), (ann.ANALYSIS_INTERVAL,)),
        ("success-rate-min", f"{a.success_rate_min:g}%", (ann.SUCCESS_RATE_MIN,)),
        ("latency-max", "-" if a.latency_max_ms is None else f"{a.latency_max_ms:g}ms", (ann.LATENCY_MAX,)),
        ("min-requests", str(a.min_requests), (ann.MIN_REQUESTS,)),
        ("confidence", f"{a.confidence:g}", (ann.CONFIDENCE,)),
        (
            "max-inconclusive",
            f"{a.max_inconclusive} then {a.on_inconclusive}",
            (ann.MAX_INCONCLUSIVE, ann.ON_INCONCLUSIVE),
        ),
        ("ready-deadline", _secs(spec.ready_deadline_s), (ann.READY_DEADLINE,)),
        ("on-drift", spec.on_drift, (ann.ON_DRIFT,)),
    ]
    return [
        (name, value, "annotation" if any(k in annotations for k in keys) else "default") for name, value, keys in rows
    ]


def _secs(seconds: float) -> str:
    return f"{seconds:g}s" if seconds < 60 else duration(seconds)


def _settings_table(annotations: Mapping[str, str], defaults: RolloutDefaults) -> str:
    rows = effective_settings(annotations, defaults)
    if not rows:
        return "  <the annotations do not parse; see Message>" if ann.CANARY in annotations else "  <not annotated>"
    return table(("SETTING", "VALUE", "SOURCE"), rows, indent="  ").rstrip("\n")


def render_detail(
    obj: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    now: datetime,
    *,
    color: bool = False,
    defaults: RolloutDefaults | None = None,
) -> str:
    rs = RouteStatus.from_route(obj)
    st = rs.state
    out: list[str] = []
    kv: list[tuple[str, str]] = [
        ("Route", f"{rs.namespace}/{rs.name}"),
        ("Phase", phase_text(rs.phase, color)),
    ]
    if st is not None:
        kv += [("Canary", st.canary or "-"), ("Stable", st.stable or "-")]
    else:
        kv += [("Canary", rs.annotations.get(ann.CANARY, "-"))]
    kv += [
        ("Step", step_text(st)),
        ("Weights", weights_text(rs.weights)),
        ("Verdict", verdict_text(st, color, evidence=True)),
        ("Next", next_text(st, now)),
        ("Started", "-" if st is None else f"{st.started_at} ({age_text(st, now)} ago)"),
        ("Updated", "-" if st is None else f"{st.updated_at} ({_ago(st.updated_at, now)})"),
        ("Message", message_of(rs)),
    ]
    if rs.pending_intent:
        kv.append(("Intent", f"{rs.pending_intent} (not yet applied by the controller)"))
    width = max(len(k) for k, _ in kv) + 2
    out += [f"{(k + ':').ljust(width)}{v}" for k, v in kv]

    spec_ann = sorted(
        (k, v) for k, v in rs.annotations.items() if k.startswith(ann.PREFIX) and k not in (ann.STATE, ann.INTENT)
    )
    out.append("")
    out.append("Annotations:")
    out.append(table(("NAME", "VALUE"), spec_ann, indent="  ").rstrip("\n") if spec_ann else "  <none>")
    if defaults is not None:
        out += [
            "",
            "Settings (effective; a default is this CLI's CANARYD_* / settings file, as the daemon reads them):",
        ]
        out.append(_settings_table(rs.annotations, defaults))

    out.append("")
    out.append("Plan:")
    if st is None or not st.steps:
        out.append("  <not started>")
    else:
        out.append(
            table(
                ("STEP", "CANARY", "STATUS"),
                [(str(i + 1), f"{w}%", s) for i, (w, s) in enumerate(plan(st))],
                indent="  ",
            ).rstrip("\n")
        )

    out.append("")
    out.append("Analysis:")
    if st is None or not st.history:
        out.append("  <none>")
    else:
        rows = [
            (r.at, str(r.step + 1), r.signal, r.verdict, record_numbers(r, evidence=True) or "-", r.reason)
            for r in st.history
        ]
        out.append(table(("AT", "STEP", "SIGNAL", "VERDICT", "NUMBERS", "REASON"), rows, indent="  ").rstrip("\n"))

    out.append("")
    out.append("Intents:")
    if st is None or not st.intents:
        out.append("  <none>")
    else:
        out.append(
            table(("AT", "INTENT", "RESULT"), [(i.at, i.intent, i.result) for i in st.intents], indent="  ").rstrip(
                "\n"
            )
        )

    out.append("")
    out.append("Events:")
    if not events:
        out.append("  <none>")
    else:
        ev_rows = [
            (_ago(_event_time(e), now), str(e.get("type", "")), str(e.get("reason", "")), str(e.get("message", "")))
            for e in sort_events(events)
        ]
        out.append(table(("LAST SEEN", "TYPE", "REASON", "MESSAGE"), ev_rows, indent="  ").rstrip("\n"))
    return "\n".join(out) + "\n"


def render_watch(
    obj: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    now: datetime,
    *,
    color: bool = False,
    every_s: float = 1.0,
    defaults: RolloutDefaults | None = None,
) -> str:
    """The live view of ``status ROUTE --watch`` on a terminal: a clock line, then the detail view."""
    meta = obj["metadata"]
    route = f"{meta.get('namespace', '')}/{meta['name']}"
    head = f"{_clock(now)}  httproute {route}, redrawn every {every_s:g}s (Ctrl-C to stop)"
    return f"{head}\n\n{render_detail(obj, events, now, color=color, defaults=defaults)}"


def sort_events(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(
        events,
        key=lambda e: (
            parse_ts(_event_time(e)) or datetime.min.replace(tzinfo=UTC),
            str((e.get("metadata") or {}).get("name", "")),
        ),
    )


# --- document (-o json|yaml) --------------------------------------------------------------------
def _record_doc(r: AnalysisRecord) -> dict[str, Any]:
    return {
        "step": r.step + 1,
        "at": r.at,
        "signal": r.signal,
        "verdict": r.verdict,
        "reason": r.reason,
        "canary": {"requests": r.canary_requests, "successRate": r.canary_success, "latencyMs": r.canary_latency_ms},
        "stable": {"requests": r.stable_requests, "successRate": r.stable_success, "latencyMs": r.stable_latency_ms},
        "evidence": r.evidence,
        "threshold": r.threshold,
    }


def route_document(
    obj: Mapping[str, Any], now: datetime, *, events: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """One route's status as documented in docs/status-schema.json (``$defs/rollout``)."""
    rs = RouteStatus.from_route(obj)
    st = rs.state
    due = parse_ts(st.next_at) if st else None
    started = parse_ts(st.started_at) if st else None
    w = rs.weights
    rnd = last_round(st)
    doc: dict[str, Any] = {
        "namespace": rs.namespace,
        "route": rs.name,
        "phase": rs.phase,
        "terminal": bool(st and st.phase.terminal),
        "canary": (st.canary if st else None) or rs.annotations.get(ann.CANARY) or None,
        "stable": (st.stable if st else None) or rs.annotations.get(ann.STABLE) or None,
        "step": None if st is None or not st.steps else {"number": st.step + 1, "total": len(st.steps)},
        "weights": None
        if w is None
        else {"stable": {"backend": w[0], "percent": w[1]}, "canary": {"backend": w[2], "percent": w[3]}},
        "verdict": None
        if not rnd
        else {
            "at": rnd[0].at,
            "step": rnd[0].step + 1,
            "verdict": next(
                (v for v in ("error", "fail", "inconclusive", "pass") if any(r.verdict == v for r in rnd)),
                rnd[0].verdict,
            ),
            "signals": [_record_doc(r) for r in rnd],
        },
        "nextAt": st.next_at if st and not st.phase.terminal and st.phase != Phase.PAUSED else None,
        "nextInSeconds": None
        if due is None or st is None or st.phase.terminal or st.phase == Phase.PAUSED
        else max(0.0, round((due - now).total_seconds(), 3)),
        "startedAt": st.started_at if st else None,
        "ageSeconds": None if started is None else max(0.0, round((now - started).total_seconds(), 3)),
        "updatedAt": st.updated_at if st else None,
        "message": message_of(rs),
        "pendingIntent": rs.pending_intent,
        "stateError": rs.state_error,
        "plan": []
        if st is None
        else [{"step": i + 1, "canaryPercent": wt, "status": s} for i, (wt, s) in enumerate(plan(st))],
        "history": [] if st is None else [_record_doc(r) for r in st.history],
        "intents": [] if st is None else [{"intent": i.intent, "at": i.at, "result": i.result} for i in st.intents],
        "annotations": {
            k: v
            for k, v in sorted(rs.annotations.items())
            if k.startswith(ann.PREFIX) and k not in (ann.STATE, ann.INTENT)
        },
    }
    if events is not None:
        doc["events"] = [
            {
                "type": str(e.get("type", "")),
                "reason": str(e.get("reason", "")),
                "message": str(e.get("message", "")),
                "at": _event_time(e),
                "count": int(e.get("count") or 1),
            }
            for e in sort_events(events)
        ]
    return doc


def list_document(routes: Sequence[Mapping[str, Any]], now: datetime) -> dict[str, Any]:
    items = sorted(
        (o for o in routes if is_managed(o)), key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
    )
    return {
        "apiVersion": SCHEMA_VERSION,
        "kind": "RolloutStatusList",
        "generatedAt": ts(now),
        "items": [route_document(o, now) for o in items],
    }


def single_document(obj: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime) -> dict[str, Any]:
    return {
        "apiVersion": SCHEMA_VERSION,
        "kind": "RolloutStatus",
        "generatedAt": ts(now),
        **route_document(obj, now, events=events),
    }
