"""The rollout state machine as one pure function: ``decide(facts) -> Decision``.

No I/O and no clock: ``canaryd.core.admit`` turns a route and a view of the cluster into ``Facts``;
the engine performs exactly what the decision names (one patch, Events, a wake-up time). When
analysis is due the first call returns ``analyze=True``; the engine measures and calls again with
the judgements.

The steps, each small, in order: an invalid input fails (holding the weights); the rollout is
established (fresh, resumed after a fixed input, or re-planned for new steps); a manual intent is
applied; weights someone else overwrote are handled by the drift policy; then the phase's handler
runs. Every path leaves through ``_Run.done``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from canaryd.core.analysis import Judgement, Observation, Verdict
from canaryd.core.hooks import HookCatalog, due
from canaryd.core.hooks import key as hook_key
from canaryd.core.judge import combine, judge_round
from canaryd.core.plan import pair_scale, weights_at
from canaryd.core.spec import DriftPolicy, Intent, RolloutSpec
from canaryd.core.state import AnalysisRecord, Failure, IntentRecord, Phase, RolloutState, parse_ts, ts


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Facts:
    now: datetime
    spec: RolloutSpec | None
    stable: str | None  # the stable backend of the pair (from the state once a rollout runs)
    error: str | None  # invalid spec, route or state: the message for Event and status
    state: RolloutState | None
    intent: Intent | None = None
    canary_ready: bool = True
    current_canary_pct: int = 0  # what the route holds now (for a fresh rollout's state)
    observations: Sequence[Observation] | None = None  # this round's counts, once measured
    error_kind: Failure = Failure.INPUT
    canary_gone: bool = False  # the canary Service was deleted while the rollout runs
    bad_intent: str | None = None  # an unreadable intent annotation: consumed, recorded as ignored
    canary_hint: str = ""  # the canary (and stable) named on the route, for a Failed state made from nothing
    stable_hint: str = ""
    catalog: HookCatalog = field(default_factory=HookCatalog)
    hooks: tuple[str, ...] = ()  # the hooks the route opted into
    hook_results: Mapping[str, tuple[bool, str]] | None = None  # key(kind, step, name) -> (2xx?, reason)
    observed: tuple[tuple[int, int], ...] | None = None  # (stable, canary) weights of each managed rule, as read
    # When this process last judged a quiet round it did not write (engine memory; None after a restart).
    quiet_round_at: datetime | None = None


@dataclass(frozen=True)
class Decision:
    state: RolloutState | None = None  # state to write; None = unchanged
    canary_pct: int | None = None  # weights to write; None = leave them
    events: tuple[Event, ...] = ()
    wake_at: datetime | None = None
    analyze: bool = False
    window_s: float | None = None  # with analyze: measure this many seconds back (since the last round)
    consume_intent: bool = False
    transitions: tuple[str, ...] = field(default=())  # phases entered, for metrics
    call_hooks: tuple[tuple[str, str], ...] = ()  # gates to call now, (kind, name); then decide again
    fire_hooks: tuple[tuple[str, str], ...] = ()  # triggers to call after the patch (recorded in the state)
    records: tuple[AnalysisRecord, ...] = ()  # the round judged by this call (written or not), for logs and metrics
    quiet: bool = False  # a round that changed nothing but the evidence: not written (see _next_round)


def weights_text(stable: str, canary: str, pct: int) -> str:
    return f"{stable} {100 - pct} → {canary} {pct}"


NOT_ANALYSED = "not analysed"


def _step_label(state: RolloutState) -> str:
    return f"step {state.step + 1}/{len(state.steps)}"


@dataclass
class _Run:
    """One call's working set: the facts, the Events so far, whether the state changed and an intent was used."""

    f: Facts
    events: list[Event] = field(default_factory=list)
    changed: bool = False
    consume: bool = False
    records: tuple[AnalysisRecord, ...] = ()

    @property
    def now(self) -> datetime:
        return self.f.now

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def done(
        self,
        state: RolloutState | None,
        *,
        pct: int | None = None,
        wake: datetime | None = None,
        enter: Phase | None = None,
        write: bool = True,
        fire: tuple[tuple[str, str], ...] = (),
        quiet: bool = False,
    ) -> Decision:
        """The single exit: write ``state`` when asked to or when this call changed it (never when ``quiet``:
        a round that changed only its evidence)."""
        if fire and state is not None:  # recorded in the same patch: a restart never fires them again
            state = state.with_(hooks_done=(*state.hooks_done, *(hook_key(k, state.step, n) for k, n in fire)))
        return Decision(
            state=state if (write or self.changed) and not quiet else None,
            canary_pct=pct,
            events=tuple(self.events),
            wake_at=wake,
            consume_intent=self.consume,
            transitions=() if enter is None else (enter.value,),
            fire_hooks=fire,
            records=self.records,
            quiet=quiet,
        )

    def triggers(self, kind: str, st: RolloutState) -> tuple[tuple[str, str], ...]:
        return tuple((kind, n) for n in due(self.f.catalog, self.f.hooks, kind, st.step, st.hooks_done))

    def hold(self, state: RolloutState, wake: datetime | None) -> Decision:
        return self.done(state, wake=wake, write=False)


def decide(f: Facts) -> Decision:
    run = _Run(f, consume=f.intent is not None or f.bad_intent is not None)
    if f.bad_intent is not None and f.state is not None:
        f = _ignore_bad_intent(run, f)
    if f.canary_gone and f.state is not None and not f.state.phase.terminal:
        return _rollback(run, f.state, f"the canary Service {f.state.canary} was deleted", "CanaryGone")
    if f.error is not None or f.spec is None or f.stable is None:
        return _fail(run, f.error or "invalid spec")
    st = _establish(run, f.spec, f.stable)
    if f.intent is not None:
        st, final = _apply_intent(run, f.intent, st, f.spec)
        if final is not None:
            return final
    drift = drift_of(st, f.observed)
    if drift is not None and not st.drift_held:
        return DRIFT[f.spec.on_drift](run, st, f.spec, drift)
    return PHASES[st.phase](run, st, f.spec)


def _ignore_bad_intent(run: _Run, f: Facts) -> Facts:
    assert f.state is not None and f.bad_intent is not None
    run.changed = True
    run.event("Warning", "UnknownIntent", f"{f.bad_intent}; ignored and removed")
    rec = IntentRecord(intent="?", at=ts(f.now) or "", result=f"ignored: {f.bad_intent}"[:300])
    new = f.state.add_intent(rec)
    run.f = replace(f, state=new)
    return run.f


# --- failing and establishing the rollout ----------------------------------------------------------
def _fail(run: _Run, message: str) -> Decision:
    """Invalid input: Failed, weights held where they are, the rest of the route untouched."""
    st, kind = run.f.state, run.f.error_kind
    if st is not None and st.phase == Phase.FAILED and st.message == message:
        return run.done(None, write=False)  # already said; only consume a pending intent
    held = None  # the phase to return to once the input is valid again
    if st is not None and kind == Failure.INPUT:
        held = st.paused_phase if st.phase == Phase.FAILED else None if st.phase.terminal else st.phase.value
    base = st if st is not None and kind == Failure.INPUT else _blank(run)
    new = base.with_(
        phase=Phase.FAILED, message=message, updated_at=ts(run.now), next_at=None, paused_phase=held, failure=kind
    )
    run.event("Warning", "InvalidSpec" if kind == Failure.INPUT else "InvalidState", f"{message}; weights held")
    return run.done(new, enter=Phase.FAILED)


def _blank(run: _Run) -> RolloutState:
    now = ts(run.now) or ""
    return RolloutState(
        phase=Phase.FAILED,
        canary=run.f.canary_hint,
        stable=run.f.stable_hint,
        steps=(),
        step=-1,
        canary_weight=run.f.current_canary_pct,
        started_at=now,
        step_started_at=None,
        updated_at=now,
    )


def _establish(run: _Run, spec: RolloutSpec, stable: str) -> RolloutState:
    """The rollout this call continues: the stored one, or a fresh one when the canary changed."""
    st = run.f.state
    if st is None or st.canary != spec.canary or _fresh_from_failed(st):
        if st is not None and not st.phase.terminal:
            run.event("Normal", "Restarted", f"canary changed from {st.canary} to {spec.canary}; starting over")
        run.changed = True
        fresh = _fresh(spec, stable, run.now, run.f.current_canary_pct)
        if st is None or st.canary != spec.canary or st.phase != Phase.FAILED:
            _started(run, spec, stable)
        return fresh.with_(intents=st.intents if st is not None and st.canary == spec.canary else ())
    if st.phase == Phase.FAILED and st.failure == Failure.INPUT and st.paused_phase:
        run.changed = True
        run.event("Normal", "Resumed", f"the input is valid again; resuming at {_step_label(st)}")
        # A fresh window at the held step: time spent Failed is neither judged nor counted as the step's.
        nxt = ts(run.now + timedelta(seconds=spec.interval_s)) if st.step >= 0 else None
        st = st.with_(
            phase=Phase(st.paused_phase), paused_phase=None, failure=None, updated_at=ts(run.now), next_at=nxt
        )
    if st.steps != spec.steps and not st.phase.terminal:
        run.changed = True
        st = st.with_(steps=spec.steps, step=_step_at_or_below(spec.steps, st.canary_weight))
    return st


def _started(run: _Run, spec: RolloutSpec, stable: str) -> None:
    plan = f"in steps {','.join(map(str, spec.steps))} every {spec.interval_s:g}s"
    if spec.analysis.enabled:
        run.event("Normal", "RolloutStarted", f"rolling out {spec.canary} over {stable} {plan}")
        return
    run.event("Normal", "RolloutStarted", f"rolling out {spec.canary} over {stable} {plan}, {NOT_ANALYSED}")
    run.event(
        "Normal",
        "NotAnalysed",
        f"{spec.canary} is {NOT_ANALYSED} (canaryd.io/analysis is none): each step advances after "
        f"{spec.interval_s:g}s whatever the canary does, up to 100%, and nothing rolls back by itself; "
        "set canaryd.io/analysis to envoy, dapr or custom:<name> to judge it (docs/analysis.md)",
    )


def _fresh_from_failed(st: RolloutState) -> bool:
    # A rollout that failed before it ran (nothing held) starts once its input is valid.
    return st.phase == Phase.FAILED and st.failure != Failure.STATE and not st.paused_phase


def _step_at_or_below(steps: tuple[int, ...], weight: int) -> int:
    """The highest step not above ``weight``: continuing from there never lowers the canary's weight."""
    return max((i for i, s in enumerate(steps) if s <= weight), default=-1)


def _fresh(spec: RolloutSpec, stable: str, now: datetime, current_pct: int) -> RolloutState:
    return RolloutState(
        phase=Phase.PROGRESSING,
        canary=spec.canary,
        stable=stable,
        steps=spec.steps,
        step=_step_at_or_below(spec.steps[:-1], current_pct),
        canary_weight=current_pct,
        started_at=ts(now) or "",
        step_started_at=None,
        updated_at=ts(now) or "",
        next_at=None,
        message="rollout started",
    )


# --- outcomes --------------------------------------------------------------------------------------
def _rollback(run: _Run, st: RolloutState, why: str, reason: str = "RolledBack", *, weights: bool = True) -> Decision:
    new = st.with_(
        phase=Phase.ROLLED_BACK,
        canary_weight=0,
        updated_at=ts(run.now),
        next_at=None,
        message=f"rolled back: {why}",
        paused_phase=None,
        failure=None,
    )
    run.event("Warning", reason, f"rolled back to {st.stable}: {why}")
    if not weights:  # nothing was shifted yet: the route keeps the weights it has
        new = new.with_(canary_weight=st.canary_weight)
    return run.done(new, pct=0 if weights else None, enter=Phase.ROLLED_BACK, fire=run.triggers("rollback", new))


def _promote(run: _Run, st: RolloutState, why: str) -> Decision:
    new = st.with_(
        phase=Phase.PROMOTED,
        canary_weight=100,
        step=len(st.steps) - 1,
        updated_at=ts(run.now),
        step_started_at=ts(run.now),
        next_at=None,
        waiting_since=None,
        message=f"promoted: {why}",
        paused_phase=None,
        failure=None,
    )
    run.event("Normal", "Promoted", f"{st.canary} promoted ({why}); {weights_text(st.stable, st.canary, 100)}")
    return run.done(new, pct=100, enter=Phase.PROMOTED, fire=run.triggers("post-rollout", new))


# --- intents ---------------------------------------------------------------------------------------
IntentRule = Callable[[_Run, RolloutState, RolloutSpec], "tuple[RolloutState, Decision | None]"]


def _apply_intent(
    run: _Run, intent: Intent, st: RolloutState, spec: RolloutSpec
) -> tuple[RolloutState, Decision | None]:
    """Apply a manual intent; returns the state to continue with, or a final decision."""
    run.changed = True
    return INTENTS[intent](run, st, spec)


def _record(run: _Run, st: RolloutState, result: str) -> RolloutState:
    intent = run.f.intent or ""
    return st.add_intent(IntentRecord(intent=intent, at=ts(run.now) or "", result=result))


def ignored_reason(intent: Intent, phase: Phase) -> str | None:
    """Why ``intent`` does nothing in ``phase`` (None: it applies). The CLI predicts with the same rule."""
    if intent == "promote" and phase == Phase.PROMOTED:
        return "already promoted"
    if intent == "abort" and phase == Phase.ROLLED_BACK:
        return "already rolled back"
    if intent == "pause" and (phase.terminal or phase == Phase.PAUSED):
        return f"rollout is {phase.value}"
    if intent == "resume" and phase != Phase.PAUSED:
        return f"rollout is {phase.value}"
    if intent == "retry" and phase not in (Phase.ROLLED_BACK, Phase.FAILED):
        return f"retry needs a rolled-back or failed rollout, this one is {phase.value}"
    return None


def _intent_promote(run: _Run, st: RolloutState, spec: RolloutSpec) -> tuple[RolloutState, Decision | None]:
    return st, _promote(run, _record(run, st, "applied"), "promoted by user")


def _intent_abort(run: _Run, st: RolloutState, spec: RolloutSpec) -> tuple[RolloutState, Decision | None]:
    return st, _rollback(run, _record(run, st, "applied"), "aborted by user", reason="Aborted")


def _intent_pause(run: _Run, st: RolloutState, spec: RolloutSpec) -> tuple[RolloutState, Decision | None]:
    new = _record(run, st, "applied").with_(
        phase=Phase.PAUSED, paused_phase=st.phase.value, message="paused by user", updated_at=ts(run.now), next_at=None
    )
    run.event("Normal", "Paused", f"paused at {_step_label(st)} by user")
    return st, run.done(new, enter=Phase.PAUSED)


def _intent_resume(run: _Run, st: RolloutState, spec: RolloutSpec) -> tuple[RolloutState, Decision | None]:
    phase = Phase(st.paused_phase or Phase.PROGRESSING.value)
    drift = drift_of(st, run.f.observed)
    # A fresh window at the current step: what happened while paused is not judged.
    nxt = run.now + timedelta(seconds=spec.interval_s) if st.step >= 0 else run.now
    new = _record(run, st, "applied").with_(
        phase=phase,
        paused_phase=None,
        message="resumed by user",
        updated_at=ts(run.now),
        next_at=ts(nxt),
        inconclusive=0,
        errors=0,
        drift_held=False,
    )
    if drift is not None:  # the weights someone else wrote while paused are put back, and not judged
        again = f"weights re-asserted: {_expected_text(st, drift)}"
        new = _restart_counting(run, new, spec).with_(message=f"resumed by user; {again}")
        run.event("Normal", "Resumed", f"resumed at {_step_label(st)} by user; {again}")
        return st, run.done(new, pct=st.canary_weight, wake=_wake_of(new, spec), enter=phase)
    if spec.analysis.enabled and st.step >= 0:
        new = new.with_(next_round_at=ts(_round_after(run.now, new, spec)))
        nxt = parse_ts(new.next_round_at) or nxt
    run.event("Normal", "Resumed", f"resumed at {_step_label(st)} by user")
    return st, run.done(new, wake=nxt, enter=phase)


def _intent_retry(run: _Run, st: RolloutState, spec: RolloutSpec) -> tuple[RolloutState, Decision | None]:
    fresh = _fresh(spec, st.stable or (run.f.stable or ""), run.now, run.f.current_canary_pct)
    run.event("Normal", "Retry", f"retrying {spec.canary} from the first step")
    return _record(run, fresh.with_(intents=st.intents), "applied"), None


INTENTS: dict[Intent, IntentRule] = {
    "promote": _intent_promote,
    "abort": _intent_abort,
    "pause": _intent_pause,
    "resume": _intent_resume,
    "retry": _intent_retry,
}


def _guarded_intent(rule: IntentRule, intent: Intent) -> IntentRule:
    def apply(run: _Run, st: RolloutState, spec: RolloutSpec) -> tuple[RolloutState, Decision | None]:
        why = ignored_reason(intent, st.phase)
        if why is not None:
            return _record(run, st, f"ignored: {why}"), None
        return rule(run, st, spec)

    return apply


INTENTS = {name: _guarded_intent(rule, name) for name, rule in INTENTS.items()}


# --- phases ----------------------------------------------------------------------------------------
def _idle(run: _Run, st: RolloutState, spec: RolloutSpec) -> Decision:
    return run.hold(st, None)


def _analysing(st: RolloutState, spec: RolloutSpec) -> bool:
    return spec.analysis.enabled and st.step >= 0


def _progressing(run: _Run, st: RolloutState, spec: RolloutSpec) -> Decision:
    step_end = parse_ts(st.next_at)
    if st.phase == Phase.PROGRESSING and _analysing(st, spec):
        due = _round_due(run, st, spec, step_end)  # rounds inside the step; the last one at its end
        if due is not None and run.now < due:
            return run.hold(st, due)
        if run.f.observations is None:
            return _measure(st, spec, run.now)
        st, outcome = _judged(run, st, spec, run.f.observations, at_end=step_end is None or run.now >= step_end)
        if outcome is not None:
            return outcome
    elif step_end is not None and run.now < step_end and st.phase != Phase.WAITING:
        return run.hold(st, step_end)
    if not run.f.canary_ready:
        return _not_ready(run, st, spec)
    return _advance(run, st, spec)


def _paused(run: _Run, st: RolloutState, spec: RolloutSpec) -> Decision:
    """Paused holds the weights, but the test keeps running: evidence of harm rolls back even now."""
    if not _analysing(st, spec):
        return run.hold(st, None)
    due = _round_due(run, st, spec, run.now)
    if due is not None and run.now < due:
        return run.hold(st, due)
    if run.f.observations is None:
        return _measure(st, spec, run.now)
    st, judged = _tallied(run, st, spec, run.f.observations)
    verdict = combine(judged)
    if verdict == Verdict.FAIL and st.failures + 1 >= spec.analysis.failure_threshold:
        return _rollback(run, st, f"{_worst(judged, verdict)} (while paused)", "RolledBackWhilePaused")
    failures = st.failures + 1 if verdict == Verdict.FAIL else 0
    return _next_round(run, st.with_(failures=failures), spec)


def _measure(st: RolloutState, spec: RolloutSpec, now: datetime) -> Decision:
    """Ask the engine for the counts since the rollout's first weight (at most the window).

    One ``increase()`` over the whole stretch, not a sum of short windows: extrapolation noise of
    short windows would add up round after round (and a window shorter than two scrapes is empty)."""
    since = parse_ts(st.counted_since) or parse_ts(st.step_started_at) or now
    seconds = (now - since).total_seconds()
    window = min(max(round(seconds), 1.0), spec.analysis.window_s)
    return Decision(analyze=True, window_s=window)


def _tallied(
    run: _Run, st: RolloutState, spec: RolloutSpec, observations: Sequence[Observation]
) -> tuple[RolloutState, tuple[Judgement, ...]]:
    """Judge the cumulative counts of the round (recorded in the history; the tallies keep the latest)."""
    n = len(spec.analysis.signals)
    tallies = dict(st.tallies)
    judged: list[Judgement] = []
    for obs in observations:
        j, after = judge_round(obs, spec.analysis, signals=n)
        judged.append(j)
        if after is not None:
            tallies[obs.signal] = after.to_list()
    run.changed = True
    run.records = tuple(_analysis_record(st.step, run.now, j) for j in judged)
    for rec in run.records:
        st = st.add_record(rec)
    return st.with_(tallies=tallies, updated_at=ts(run.now)), tuple(judged)


def _worst(judged: Sequence[Judgement], verdict: Verdict) -> str:
    worst = next((j for j in judged if j.verdict == verdict), None)
    return f"{worst.signal}: {worst.reason}" if worst else verdict.value


def _judged(
    run: _Run, st: RolloutState, spec: RolloutSpec, observations: Sequence[Observation], *, at_end: bool
) -> tuple[RolloutState, Decision | None]:
    """Judge the round; the verdict's rule says whether to roll back, hold, pause or advance (None)."""
    st, judged = _tallied(run, st, spec, observations)
    verdict = combine(judged)
    return VERDICTS[verdict](run, st, spec, _worst(judged, verdict), at_end)


VerdictRule = Callable[[_Run, RolloutState, RolloutSpec, str, bool], "tuple[RolloutState, Decision | None]"]


def _round_after(now: datetime, st: RolloutState, spec: RolloutSpec) -> datetime:
    """The next round: one analysis interval on, but no later than a step's end still ahead (the last round is there).

    Never sooner than an interval: a round held past the step's end (a failure or an error below its limit)
    would otherwise be re-run at once on the same Prometheus answer and count the same harm twice."""
    nxt = now + timedelta(seconds=spec.analysis.interval_s)
    step_end = parse_ts(st.next_at)
    if step_end is not None and step_end > now and st.phase == Phase.PROGRESSING:
        nxt = min(nxt, step_end)
    return nxt


def _round_due(run: _Run, st: RolloutState, spec: RolloutSpec, default: datetime | None) -> datetime | None:
    """When the next round is due: as written, or later when this process has judged a quiet round since."""
    due = parse_ts(st.next_round_at) or default
    quiet = run.f.quiet_round_at
    if quiet is None or (due is not None and quiet < due):
        return due  # none since the written schedule (a quiet round is never judged before it is due)
    after = _round_after(quiet, st, spec)
    return after if due is None else max(due, after)


def _next_round(
    run: _Run, st: RolloutState, spec: RolloutSpec, message: str | None = None, enter: Phase | None = None
) -> Decision:
    """Schedule the next round. A round that changed nothing but the evidence (no harm, no error, no
    counter moved) is not written: the counts are cumulative from ``counted_since`` and re-measured each
    round, so nothing is lost on a restart but the round's record, and a step costs one write."""
    nxt = _round_after(run.now, st, spec)
    new = st.with_(next_round_at=ts(nxt), message=message or st.message, updated_at=ts(run.now))
    base = run.f.state
    quiet = enter is None and not run.events and not run.consume and base is not None and _only_evidence(base, new)
    return run.done(new, wake=nxt, enter=enter, quiet=quiet)


_EVIDENCE = ("history", "tallies", "updated_at", "message", "next_round_at")


def _only_evidence(before: RolloutState, after: RolloutState) -> bool:
    """Whether ``after`` differs from ``before`` only in what a round records about its evidence."""
    return replace(after, **{f: getattr(before, f) for f in _EVIDENCE}) == before


def _on_fail(
    run: _Run, st: RolloutState, spec: RolloutSpec, why: str, at_end: bool
) -> tuple[RolloutState, Decision | None]:
    a = spec.analysis
    st = st.with_(failures=st.failures + 1, errors=0)
    if st.failures >= a.failure_threshold:
        return st, _rollback(run, st, why)
    run.event("Warning", "AnalysisFailed", f"{_step_label(st)}: {why} (failure {st.failures}/{a.failure_threshold})")
    return st, _next_round(run, st, spec, f"harm shown {st.failures}/{a.failure_threshold}: {why}")


def _on_error(
    run: _Run, st: RolloutState, spec: RolloutSpec, why: str, at_end: bool
) -> tuple[RolloutState, Decision | None]:
    a = spec.analysis
    st = st.with_(errors=st.errors + 1)
    if st.errors >= a.max_errors:
        return st, _rollback(run, st, f"analysis errored {st.errors} times in a row: {why}", "AnalysisError")
    run.event("Warning", "AnalysisError", f"{_step_label(st)}: {why} (error {st.errors}/{a.max_errors}; holding)")
    return st, _next_round(run, st, spec, f"analysis error {st.errors}/{a.max_errors}: {why}")


def _on_inconclusive(
    run: _Run, st: RolloutState, spec: RolloutSpec, why: str, at_end: bool
) -> tuple[RolloutState, Decision | None]:
    a = spec.analysis
    st = st.with_(failures=0, errors=0)
    if not at_end:
        return st, _next_round(run, st, spec, f"{_step_label(st)}: {why}")
    st = st.with_(inconclusive=st.inconclusive + 1)
    if st.inconclusive < a.max_inconclusive:
        # Too little evidence to advance: hold the step for another interval, still testing every round.
        longer = st.with_(next_at=ts(run.now + timedelta(seconds=spec.interval_s)))
        return longer, _next_round(run, longer, spec, f"inconclusive {st.inconclusive}/{a.max_inconclusive}: {why}")
    why_all = f"{st.inconclusive} inconclusive steps in a row: {why}"
    if a.on_inconclusive == "rollback":
        return st, _rollback(run, st, why_all, "Inconclusive")
    paused = st.with_(
        phase=Phase.PAUSED, paused_phase=Phase.PROGRESSING.value, next_at=None, message=f"paused: {why_all}"
    )
    run.event(
        "Warning",
        "Inconclusive",
        f"paused at {_step_label(st)}: {why_all}; analysis goes on and rolls back on evidence of harm; "
        "'canaryd resume' to continue or 'canaryd abort'",
    )
    return st, _next_round(run, paused, spec, enter=Phase.PAUSED)


def _on_pass(
    run: _Run, st: RolloutState, spec: RolloutSpec, why: str, at_end: bool
) -> tuple[RolloutState, Decision | None]:
    st = st.with_(failures=0, errors=0)
    if not at_end:
        return st, _next_round(run, st, spec, f"{_step_label(st)}: {why}")
    return st.with_(inconclusive=0), None


VERDICTS: dict[Verdict, VerdictRule] = {
    Verdict.FAIL: _on_fail,
    Verdict.ERROR: _on_error,
    Verdict.INCONCLUSIVE: _on_inconclusive,
    Verdict.PASS: _on_pass,
}


def _not_ready(run: _Run, st: RolloutState, spec: RolloutSpec) -> Decision:
    """Gate the next step on the canary's ready endpoints, up to the ready deadline."""
    since = parse_ts(st.waiting_since) or run.now
    deadline = since + timedelta(seconds=spec.ready_deadline_s)
    if run.now >= deadline:
        return _rollback(run, st, f"{st.canary} had no ready endpoints for {spec.ready_deadline_s:g}s", "NotReady")
    if st.phase == Phase.WAITING:
        return run.hold(st, deadline)
    run.event(
        "Warning",
        "WaitingForEndpoints",
        f"{st.canary} has no ready endpoints; holding {_step_label(st)} (rollback in {spec.ready_deadline_s:g}s)",
    )
    waiting = st.with_(
        phase=Phase.WAITING,
        waiting_since=ts(since),
        updated_at=ts(run.now),
        message=f"waiting for ready endpoints of {st.canary}",
    )
    return run.done(waiting, wake=deadline, enter=Phase.WAITING)


def _gate(run: _Run, st: RolloutState, spec: RolloutSpec, kind: str) -> Decision | None:
    """Gates (pre-rollout, confirm-step, confirm-promotion) must answer 2xx before the weights move.

    Each answer is written to the state in a patch of its own before anything moves, so a restart
    does not ask again; a refusal or a timeout holds (pre-rollout: rolls back, weights untouched)."""
    pending = due(run.f.catalog, run.f.hooks, kind, st.step, st.hooks_done)
    if not pending:
        return None
    results = run.f.hook_results
    if results is None:  # (the state rides along for the payload; the engine calls, then decides again)
        return Decision(state=st, call_hooks=tuple((kind, n) for n in pending))
    answers = {n: results.get(hook_key(kind, st.step, n), (False, "not called")) for n in pending}
    passed = tuple(hook_key(kind, st.step, n) for n, (ok, _) in answers.items() if ok)
    refused = [(n, why) for n, (ok, why) in answers.items() if not ok]
    run.changed = True
    st = st.with_(hooks_done=(*st.hooks_done, *passed), updated_at=ts(run.now))
    if not refused:
        return run.done(st, wake=run.now)  # the answers are on record; the weights move on the next pass
    name, why = refused[0]
    if kind == "pre-rollout":
        return _rollback(run, st, f"pre-rollout hook {name}: {why}", "HookFailed", weights=False)
    message = f"waiting for {kind} hook {name}: {why}"
    if message != st.message:
        run.event("Warning", "HookHold", f"{_step_label(st)}: {message}")
    retry = run.now + timedelta(seconds=min(spec.interval_s, 10.0))
    return run.done(st.with_(message=message), wake=retry)


def _advance(run: _Run, st: RolloutState, spec: RolloutSpec) -> Decision:
    nxt = st.step + 1
    pct = st.steps[nxt]
    gate_kind = "pre-rollout" if st.step < 0 else "confirm-promotion" if pct >= 100 else "confirm-step"
    gated = _gate(run, st, spec, gate_kind)
    if gated is not None:
        return gated
    if pct >= 100:
        return _promote(run, st, "all steps passed" if spec.analysis.enabled else f"all steps held, {NOT_ANALYSED}")
    wake = _step_base(run, st, spec) + timedelta(seconds=spec.interval_s)
    new = st.with_(
        phase=Phase.PROGRESSING,
        step=nxt,
        canary_weight=pct,
        step_started_at=ts(run.now),
        next_at=ts(wake),
        updated_at=ts(run.now),
        waiting_since=None,
        message=f"{_step_label(st.with_(step=nxt))}: {weights_text(st.stable, st.canary, pct)}"
        + ("" if spec.analysis.enabled else f" ({NOT_ANALYSED})"),
    )
    if spec.analysis.enabled:  # evidence is counted from the first weight on, across steps
        since = st.counted_since or ts(run.now)
        new = new.with_(counted_since=since, next_round_at=ts(_round_after(run.now, new, spec)))
        wake = parse_ts(new.next_round_at) or wake
    run.event("Normal", "StepAdvanced", new.message)
    enter = Phase.PROGRESSING if st.phase != Phase.PROGRESSING else None
    return run.done(new, pct=pct, wake=wake, enter=enter, fire=run.triggers("step", new))


GRID_SLACK_S = 2.0


def _step_base(run: _Run, st: RolloutState, spec: RolloutSpec) -> datetime:
    """Where the next step's interval counts from: the step's due time when it advances on time (at most
    ``GRID_SLACK_S`` late, and never more than half an interval), else now. Steps keep to their grid, so
    the daemon's own processing time does not accumulate step after step, and routes that step together
    stay due together (one Prometheus answer serves their rounds). A held step (waiting, inconclusive,
    a gate, a restart) starts its successor from when it really advanced."""
    due = parse_ts(st.next_at)
    if st.phase != Phase.PROGRESSING or due is None or due > run.now:
        return run.now
    late = (run.now - due).total_seconds()
    return due if late <= min(GRID_SLACK_S, spec.interval_s / 2) else run.now


# --- weights someone else overwrote (docs/gitops.md) --------------------------------------------------
@dataclass(frozen=True)
class Drift:
    """The first managed rule whose weights are not what canaryd last wrote."""

    observed: tuple[int, int]  # (stable, canary) as the route holds them
    expected: tuple[int, int]  # what canaryd wrote, in the same scale


_HOLDS_WEIGHTS = (Phase.PROGRESSING, Phase.WAITING, Phase.PAUSED)


def drift_of(st: RolloutState, observed: Sequence[tuple[int, int]] | None) -> Drift | None:
    """Whether the route's managed weights differ from the state's (None: they agree, or nothing to compare).

    Only while the rollout holds weights canaryd wrote: a phase that holds them, and the current step's
    weights written (``step_started_at``; a fresh rollout records the route's weights without writing)."""
    if observed is None or st.phase not in _HOLDS_WEIGHTS or st.step < 0 or st.step_started_at is None:
        return None
    for sw, cw in observed:
        w = weights_at(st.canary_weight, pair_scale(sw, cw))
        if (w.stable, w.canary) != (sw, cw):
            return Drift(observed=(sw, cw), expected=(w.stable, w.canary))
    return None


def _observed_text(st: RolloutState, d: Drift) -> str:
    return f"{st.stable} {d.observed[0]}, {st.canary} {d.observed[1]}"


def _expected_text(st: RolloutState, d: Drift) -> str:
    return f"{st.stable} {d.expected[0]}, {st.canary} {d.expected[1]}"


def _restart_counting(run: _Run, st: RolloutState, spec: RolloutSpec) -> RolloutState:
    """The weights are (re)written now: the stretch that saw other weights counts neither as the step's
    time nor as evidence, so the step's interval and the analysis counts start again from now."""
    now = run.now
    new = st.with_(
        step_started_at=ts(now),
        next_at=None if st.phase == Phase.PAUSED else ts(now + timedelta(seconds=spec.interval_s)),
        inconclusive=0,
        errors=0,
        failures=0,
        updated_at=ts(now),
    )
    if not spec.analysis.enabled:
        return new
    new = new.with_(counted_since=ts(now), tallies={}, next_round_at=None)
    return new.with_(next_round_at=ts(_round_after(now, new, spec)))


def _wake_of(st: RolloutState, spec: RolloutSpec) -> datetime | None:
    if _analysing(st, spec):
        return parse_ts(st.next_round_at)
    return None if st.phase == Phase.PAUSED else parse_ts(st.next_at)


def _reassert(run: _Run, st: RolloutState, spec: RolloutSpec, d: Drift) -> Decision:
    """Policy ``reassert``: write the expected weights back once; a second overwrite in the rollout holds."""
    if st.drifts >= 1:
        return _hold_drift(run, st, spec, d)
    run.changed = True
    label = _step_label(st)
    new = _restart_counting(run, st.with_(drifts=st.drifts + 1), spec).with_(
        message=f"{label}: weights overwritten ({_observed_text(st, d)}); re-asserted {_expected_text(st, d)}"
        + (" (still paused)" if st.phase == Phase.PAUSED else "")
    )
    run.event(
        "Warning",
        "WeightsOverwritten",
        f"{label}: the route's weights were changed by someone else: {_observed_text(st, d)}, canaryd wrote "
        f"{_expected_text(st, d)} (a GitOps sync or kubectl apply?); re-asserting them once and restarting "
        "the step's interval and analysis counts; another overwrite pauses the rollout (docs/gitops.md)",
    )
    return run.done(new, pct=st.canary_weight, wake=_wake_of(new, spec))


def _hold_drift(run: _Run, st: RolloutState, spec: RolloutSpec, d: Drift) -> Decision:
    """Policy ``hold`` (or a second overwrite): pause, leaving the weights as they are, until ``resume``."""
    run.changed = True
    again = " again" if st.drifts else ""
    todo = "let canaryd own the two weights in your GitOps tool (docs/gitops.md), then run 'canaryd resume'"
    new = st.with_(
        phase=Phase.PAUSED,
        paused_phase=st.paused_phase if st.phase == Phase.PAUSED else st.phase.value,
        next_at=None,
        drifts=st.drifts + 1,
        drift_held=True,
        updated_at=ts(run.now),
        message=f"paused: weights overwritten{again} ({_observed_text(st, d)}, canaryd wrote "
        f"{_expected_text(st, d)}); {todo}",
    )
    run.event(
        "Warning",
        "WeightsOverwritten",
        f"{_step_label(st)}: the route's weights were changed by someone else{again}: {_observed_text(st, d)}, "
        f"canaryd wrote {_expected_text(st, d)}; pausing, the weights left as they are: {todo}",
    )
    enter = None if st.phase == Phase.PAUSED else Phase.PAUSED
    return run.done(new, wake=_wake_of(new, spec), enter=enter)


DRIFT: dict[DriftPolicy, Callable[[_Run, RolloutState, RolloutSpec, Drift], Decision]] = {
    "reassert": _reassert,
    "hold": _hold_drift,
}


PHASES: dict[Phase, Callable[[_Run, RolloutState, RolloutSpec], Decision]] = {
    Phase.PROGRESSING: _progressing,
    Phase.WAITING: _progressing,
    Phase.PAUSED: _paused,
    Phase.PROMOTED: _idle,
    Phase.ROLLED_BACK: _idle,
    Phase.FAILED: _idle,
}


def _analysis_record(step: int, now: datetime, j: Judgement) -> AnalysisRecord:
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
        evidence=None if j.evidence is None else float(f"{j.evidence:.4g}"),
        threshold=j.threshold,
    )
