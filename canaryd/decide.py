"""The rollout state machine as one pure function: ``decide(facts) -> Decision``.

No I/O and no clock: the engine gathers the facts (the route's spec and state, the intent,
whether the canary has ready endpoints, analysis results, ``now``) and performs exactly what
the decision names (one patch, events, a wake-up time). When analysis is due the first call
returns ``analyze=True``; the engine measures and calls again with the judgements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from canaryd.analysis import Judgement, Verdict
from canaryd.judge import combine
from canaryd.spec import Intent, RolloutSpec
from canaryd.state import AnalysisRecord, IntentRecord, Phase, RolloutState, parse_ts, ts


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Facts:
    now: datetime
    spec: RolloutSpec | None
    stable: str | None  # resolved stable backend (from the route)
    error: str | None  # invalid spec or route: the message for Event and status
    state: RolloutState | None
    intent: Intent | None = None
    canary_ready: bool = True
    current_canary_pct: int = 0  # what the route holds now (for a fresh rollout's state)
    judgements: Sequence[Judgement] | None = None


@dataclass(frozen=True)
class Decision:
    state: RolloutState | None = None  # state to write; None = unchanged
    canary_pct: int | None = None  # weights to write; None = leave them
    events: tuple[Event, ...] = ()
    wake_at: datetime | None = None
    analyze: bool = False
    consume_intent: bool = False
    transitions: tuple[str, ...] = field(default=())  # phases entered, for metrics


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _step_label(state: RolloutState) -> str:
    return f"step {state.step + 1}/{len(state.steps)}"


def weights_text(stable: str, canary: str, pct: int) -> str:
    return f"{stable} {100 - pct} → {canary} {pct}"


def _fresh(spec: RolloutSpec, stable: str, now: datetime, current_pct: int) -> RolloutState:
    return RolloutState(
        phase=Phase.PROGRESSING,
        canary=spec.canary,
        stable=stable,
        steps=spec.steps,
        step=-1,
        canary_weight=current_pct,
        started_at=ts(now) or "",
        step_started_at=None,
        updated_at=ts(now) or "",
        next_at=None,
        message="rollout started",
    )


def _rollback(st: RolloutState, now: datetime, why: str, events: list[Event], reason: str = "RolledBack") -> Decision:
    new = st.with_(
        phase=Phase.ROLLED_BACK,
        canary_weight=0,
        updated_at=ts(now),
        next_at=None,
        message=f"rolled back: {why}",
        paused_phase=None,
    )
    events.append(Event("Warning", reason, f"rolled back to {st.stable}: {why}"))
    return Decision(state=new, canary_pct=0, events=tuple(events), transitions=(Phase.ROLLED_BACK.value,))


def _promote(st: RolloutState, now: datetime, why: str, events: list[Event]) -> Decision:
    new = st.with_(
        phase=Phase.PROMOTED,
        canary_weight=100,
        step=len(st.steps) - 1,
        updated_at=ts(now),
        step_started_at=ts(now),
        next_at=None,
        message=f"promoted: {why}",
        paused_phase=None,
    )
    events.append(
        Event("Normal", "Promoted", f"{st.canary} promoted ({why}); {weights_text(st.stable, st.canary, 100)}")
    )
    return Decision(state=new, canary_pct=100, events=tuple(events), transitions=(Phase.PROMOTED.value,))


def _apply_intent(
    intent: Intent, st: RolloutState, spec: RolloutSpec, now: datetime, events: list[Event]
) -> tuple[RolloutState, Decision | None]:
    """Apply a manual intent; returns the state to continue with, or a final decision."""

    def record(s: RolloutState, result: str) -> RolloutState:
        return s.add_intent(IntentRecord(intent=intent, at=ts(now) or "", result=result))

    if intent == "promote":
        if st.phase == Phase.PROMOTED:
            return record(st, "ignored: already promoted"), None
        d = _promote(record(st, "applied"), now, "promoted by user", events)
        return st, d
    if intent == "abort":
        if st.phase == Phase.ROLLED_BACK:
            return record(st, "ignored: already rolled back"), None
        return st, _rollback(record(st, "applied"), now, "aborted by user", events, reason="Aborted")
    if intent == "pause":
        if st.phase.terminal or st.phase == Phase.PAUSED:
            return record(st, f"ignored: rollout is {st.phase.value}"), None
        new = record(st, "applied").with_(
            phase=Phase.PAUSED, paused_phase=st.phase.value, message="paused by user", updated_at=ts(now), next_at=None
        )
        events.append(Event("Normal", "Paused", f"paused at {_step_label(st)} by user"))
        return st, Decision(state=new, events=tuple(events), transitions=(Phase.PAUSED.value,))
    if intent == "resume":
        if st.phase != Phase.PAUSED:
            return record(st, f"ignored: rollout is {st.phase.value}"), None
        phase = Phase(st.paused_phase or Phase.PROGRESSING.value)
        # A fresh window at the current step: what happened while paused is not judged.
        nxt = now + timedelta(seconds=spec.interval_s) if st.step >= 0 else now
        new = record(st, "applied").with_(
            phase=phase,
            paused_phase=None,
            message="resumed by user",
            updated_at=ts(now),
            next_at=ts(nxt),
            inconclusive=0,
            errors=0,
        )
        events.append(Event("Normal", "Resumed", f"resumed at {_step_label(st)} by user"))
        return st, Decision(state=new, events=tuple(events), wake_at=nxt, transitions=(phase.value,))
    # retry
    if st.phase not in (Phase.ROLLED_BACK, Phase.FAILED):
        return record(st, f"ignored: retry needs a rolled-back rollout, this one is {st.phase.value}"), None
    fresh = record(_fresh(spec, st.stable, now, st.canary_weight).with_(intents=st.intents), "applied")
    events.append(Event("Normal", "Retry", f"retrying {st.canary} from the first step"))
    return fresh, None


def decide(f: Facts) -> Decision:
    now = f.now
    events: list[Event] = []
    st = f.state

    if f.error is not None or f.spec is None or f.stable is None:
        message = f.error or "invalid spec"
        if st is not None and st.phase == Phase.FAILED and st.message == message:
            return Decision(consume_intent=f.intent is not None)
        base = st or RolloutState(
            phase=Phase.FAILED,
            canary="",
            stable="",
            steps=(),
            step=-1,
            canary_weight=f.current_canary_pct,
            started_at=ts(now) or "",
            step_started_at=None,
            updated_at=ts(now) or "",
        )
        new = base.with_(phase=Phase.FAILED, message=message, updated_at=ts(now), next_at=None)
        return Decision(
            state=new,
            events=(Event("Warning", "InvalidSpec", f"{message}; the route was left untouched"),),
            consume_intent=f.intent is not None,
            transitions=(Phase.FAILED.value,),
        )

    spec, stable = f.spec, f.stable
    changed = False
    if st is None or st.canary != spec.canary or st.stable != stable or st.phase == Phase.FAILED:
        if st is not None and st.phase != Phase.FAILED and not st.phase.terminal:
            events.append(
                Event(
                    "Normal",
                    "Restarted",
                    f"canary changed from {st.canary} to {spec.canary}; restarting from the first step",
                )
            )
        st = _fresh(spec, stable, now, f.current_canary_pct)
        if not events:
            events.append(
                Event(
                    "Normal",
                    "RolloutStarted",
                    f"rolling out {spec.canary} over {stable} in steps "
                    f"{','.join(map(str, spec.steps))} every {spec.interval_s:g}s",
                )
            )
        changed = True
    elif st.steps != spec.steps and not st.phase.terminal:
        # New steps mid-rollout: continue from the highest new step not above the current weight.
        idx = max((i for i, s in enumerate(spec.steps) if s <= st.canary_weight), default=-1)
        st = st.with_(steps=spec.steps, step=idx)
        changed = True

    consume = False
    if f.intent is not None:
        consume = True
        st, final = _apply_intent(f.intent, st, spec, now, events)
        changed = True
        if final is not None:
            return Decision(
                state=final.state,
                canary_pct=final.canary_pct,
                events=final.events,
                wake_at=final.wake_at,
                consume_intent=True,
                transitions=final.transitions,
            )

    def hold(new: RolloutState, wake: datetime | None) -> Decision:
        # Nothing to do now; write the state only if this call changed it (new rollout, intent).
        return Decision(
            state=new if changed else None,
            events=tuple(events),
            wake_at=wake,
            consume_intent=consume,
        )

    if st.phase.terminal or st.phase == Phase.PAUSED:
        return hold(st, None)

    due = parse_ts(st.next_at)
    if due is not None and now < due and st.phase != Phase.WAITING:
        return hold(st, due)

    a = spec.analysis
    if st.step >= 0 and a.enabled and st.phase == Phase.PROGRESSING:
        if f.judgements is None:
            return Decision(analyze=True)
        verdict = combine(list(f.judgements))
        for j in f.judgements:
            st = st.add_record(_record(st.step, now, j))
        worst = next((j for j in f.judgements if j.verdict == verdict), None)
        why = worst.reason if worst else verdict.value
        retry_at = now + timedelta(seconds=spec.interval_s)
        if verdict == Verdict.FAIL:
            st = st.with_(failures=st.failures + 1, inconclusive=0, errors=0, updated_at=ts(now))
            if st.failures >= a.failure_threshold:
                return _with_consume(_rollback(st, now, why, events, reason="RolledBack"), consume)
            events.append(
                Event(
                    "Warning",
                    "AnalysisFailed",
                    f"{_step_label(st)}: {why} (failure {st.failures}/{a.failure_threshold})",
                )
            )
            st = st.with_(next_at=ts(retry_at), message=f"analysis failed {st.failures}/{a.failure_threshold}: {why}")
            return Decision(state=st, events=tuple(events), wake_at=retry_at, consume_intent=consume)
        if verdict == Verdict.ERROR:
            st = st.with_(errors=st.errors + 1, updated_at=ts(now))
            if st.errors >= a.max_errors:
                return _with_consume(
                    _rollback(
                        st, now, f"analysis errored {st.errors} times in a row: {why}", events, reason="AnalysisError"
                    ),
                    consume,
                )
            events.append(
                Event(
                    "Warning", "AnalysisError", f"{_step_label(st)}: {why} (error {st.errors}/{a.max_errors}; holding)"
                )
            )
            st = st.with_(next_at=ts(retry_at), message=f"analysis error {st.errors}/{a.max_errors}: {why}")
            return Decision(state=st, events=tuple(events), wake_at=retry_at, consume_intent=consume)
        if verdict == Verdict.INCONCLUSIVE:
            st = st.with_(inconclusive=st.inconclusive + 1, errors=0, updated_at=ts(now))
            if st.inconclusive >= a.max_inconclusive:
                why_all = f"{st.inconclusive} inconclusive rounds in a row: {why}"
                if a.on_inconclusive == "rollback":
                    return _with_consume(_rollback(st, now, why_all, events, reason="Inconclusive"), consume)
                st = st.with_(
                    phase=Phase.PAUSED, paused_phase=Phase.PROGRESSING.value, next_at=None, message=f"paused: {why_all}"
                )
                events.append(
                    Event(
                        "Warning",
                        "Inconclusive",
                        f"paused at {_step_label(st)}: {why_all}; 'canaryd resume' to continue or 'canaryd abort'",
                    )
                )
                return Decision(
                    state=st, events=tuple(events), consume_intent=consume, transitions=(Phase.PAUSED.value,)
                )
            st = st.with_(next_at=ts(retry_at), message=f"inconclusive {st.inconclusive}/{a.max_inconclusive}: {why}")
            return Decision(state=st, events=tuple(events), wake_at=retry_at, consume_intent=consume)
        st = st.with_(failures=0, inconclusive=0, errors=0)

    # Advance: gate on the canary's ready endpoints first.
    if not f.canary_ready:
        since = parse_ts(st.waiting_since) or now
        deadline = since + timedelta(seconds=spec.ready_deadline_s)
        if now >= deadline:
            return _with_consume(
                _rollback(
                    st,
                    now,
                    f"{st.canary} had no ready endpoints for {spec.ready_deadline_s:g}s",
                    events,
                    reason="NotReady",
                ),
                consume,
            )
        if st.phase != Phase.WAITING:
            events.append(
                Event(
                    "Warning",
                    "WaitingForEndpoints",
                    f"{st.canary} has no ready endpoints; holding "
                    f"{_step_label(st)} (rollback in {spec.ready_deadline_s:g}s)",
                )
            )
            st = st.with_(
                phase=Phase.WAITING,
                waiting_since=ts(since),
                updated_at=ts(now),
                message=f"waiting for ready endpoints of {st.canary}",
            )
            return Decision(
                state=st,
                events=tuple(events),
                wake_at=deadline,
                consume_intent=consume,
                transitions=(Phase.WAITING.value,),
            )
        return hold(st, deadline)

    nxt = st.step + 1
    pct = st.steps[nxt]
    if pct >= 100:
        return _with_consume(_promote(st.with_(waiting_since=None), now, "all steps passed", events), consume)
    wake = now + timedelta(seconds=spec.interval_s)
    new = st.with_(
        phase=Phase.PROGRESSING,
        step=nxt,
        canary_weight=pct,
        step_started_at=ts(now),
        next_at=ts(wake),
        updated_at=ts(now),
        waiting_since=None,
        message=f"{_step_label(st.with_(step=nxt))}: {weights_text(st.stable, st.canary, pct)}",
    )
    events.append(Event("Normal", "StepAdvanced", new.message))
    transitions = (Phase.PROGRESSING.value,) if st.phase != Phase.PROGRESSING else ()
    return Decision(
        state=new, canary_pct=pct, events=tuple(events), wake_at=wake, consume_intent=consume, transitions=transitions
    )


def _with_consume(d: Decision, consume: bool) -> Decision:
    return Decision(
        state=d.state,
        canary_pct=d.canary_pct,
        events=d.events,
        wake_at=d.wake_at,
        analyze=d.analyze,
        consume_intent=consume or d.consume_intent,
        transitions=d.transitions,
    )


def _record(step: int, now: datetime, j: Judgement) -> AnalysisRecord:
    c, s = j.canary, j.stable
    return AnalysisRecord(
        step=step,
        at=ts(now) or "",
        verdict=j.verdict.value,
        signal=j.signal,
        reason=j.reason,
        canary_requests=None if c is None else round(c.requests, 1),
        canary_success=None if c is None or c.success_rate is None else round(c.success_rate, 3),
        canary_latency_ms=None if c is None or c.latency_ms is None else round(c.latency_ms, 1),
        stable_requests=None if s is None else round(s.requests, 1),
        stable_success=None if s is None or s.success_rate is None else round(s.success_rate, 3),
        stable_latency_ms=None if s is None or s.latency_ms is None else round(s.latency_ms, 1),
    )
