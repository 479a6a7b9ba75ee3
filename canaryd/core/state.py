"""The rollout state, persisted as one versioned JSON annotation (``canaryd.io/state``).

Pure codec: ``RolloutState.from_annotation`` / ``to_annotation``. Everything the engine needs to
resume after a SIGKILL is here: the pair (chosen once, when the rollout starts), the step index and
when it started, the counters, the weights it last wrote. History is trimmed so the annotation
stays small. A stored example::

    {"canary":"whoami-v2","canary_weight":25,"message":"step 3/5: whoami-v1 75 → whoami-v2 25",
     "next_at":"2026-12-01T10:03:00.000Z","phase":"Progressing","stable":"whoami-v1",
     "started_at":"2026-12-01T10:00:00.000Z","step":2,"step_started_at":"2026-12-01T10:02:00.000Z",
     "steps":[5,10,25,50,100],"updated_at":"2026-12-01T10:02:00.000Z","version":1}

Decoding validates everything the engine acts on (phase, step within steps, steps increasing to 100,
weights 0..100, timestamps): a hand-edited state that does not hold together is a ``StateError``,
never a reason to move weights.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from canaryd.core.errors import StateError
from canaryd.core.judge import SignalTally

STATE_VERSION = 1
HISTORY_LIMIT = 8
INTENT_LIMIT = 5


class Phase(StrEnum):
    PROGRESSING = "Progressing"
    WAITING = "WaitingForEndpoints"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.FAILED)


def ts(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(s: str | None) -> datetime | None:
    if not s:
        return None
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"timestamp {s!r} has no time zone")
    return t


class Failure(StrEnum):
    """Why a rollout is Failed, which says how it leaves that phase."""

    INPUT = "input"  # annotations or route invalid: leaves Failed by itself once the input is valid again
    STATE = "state"  # the state annotation was unreadable: only `retry`, a new canary or deleting it


@dataclass(frozen=True)
class AnalysisRecord:
    step: int
    at: str
    verdict: str
    signal: str
    reason: str
    canary_requests: float | None = None
    canary_success: float | None = None
    canary_latency_ms: float | None = None
    stable_requests: float | None = None
    stable_success: float | None = None
    stable_latency_ms: float | None = None
    evidence: float | None = None  # cumulative evidence of harm after this round
    threshold: float | None = None  # ... and where it rolls back


@dataclass(frozen=True)
class IntentRecord:
    intent: str
    at: str
    result: str


@dataclass(frozen=True)
class RolloutState:
    phase: Phase
    canary: str
    stable: str
    steps: tuple[int, ...]
    step: int  # index into steps; -1 = no traffic shifted yet
    canary_weight: int  # percent currently written
    started_at: str
    step_started_at: str | None  # when the current step's weights were written
    updated_at: str
    next_at: str | None = None  # when the next action (analysis/step) is due
    message: str = ""
    failures: int = 0  # consecutive failed rounds
    inconclusive: int = 0  # consecutive inconclusive rounds
    errors: int = 0  # consecutive analysis errors
    waiting_since: str | None = None  # canary without ready endpoints since
    paused_phase: str | None = None  # phase to return to on resume (Paused) or once the input is valid (Failed)
    failure: Failure | None = None  # set while Failed
    # Analysis: since when counts are cumulated (the first weight written), the latest cumulative counts per
    # signal (canaryd.core.judge.SignalTally lists) and when the next round is due.
    tallies: dict[str, list[float | None]] = field(default_factory=dict)
    counted_since: str | None = None
    hooks_done: tuple[str, ...] = ()  # "kind:step:name" of every gate that answered 2xx and trigger fired
    next_round_at: str | None = None
    history: tuple[AnalysisRecord, ...] = ()
    intents: tuple[IntentRecord, ...] = ()
    observed_generation: int | None = None
    # Someone else overwrote the two managed weights mid-rollout (a GitOps sync): how often in this rollout,
    # and whether the rollout is Paused for it (then canaryd leaves the weights alone until `resume`).
    drifts: int = 0
    drift_held: bool = False
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)

    def add_record(self, rec: AnalysisRecord) -> RolloutState:
        return replace(self, history=(*self.history, rec)[-HISTORY_LIMIT:])

    def add_intent(self, rec: IntentRecord) -> RolloutState:
        return replace(self, intents=(*self.intents, rec)[-INTENT_LIMIT:])

    def to_annotation(self) -> str:
        # Shallow field reads, not dataclasses.asdict (its deep copy was the codec's whole cost
        # at 1,000 routes); the records are flat, so their __dict__ is what they hold.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["phase"] = self.phase.value
        d["failure"] = None if self.failure is None else self.failure.value
        d["steps"] = list(self.steps)
        d["history"] = [_compact(dict(vars(h))) for h in self.history]
        d["intents"] = [dict(vars(i)) for i in self.intents]
        d["hooks_done"] = list(self.hooks_done)
        if not d["extra"]:
            del d["extra"]
        if not d["tallies"]:
            del d["tallies"]
        for name in ("drifts", "drift_held"):  # absent until a drift: older states and readers stay as they were
            if not d[name]:
                del d[name]
        return json.dumps(_compact(d), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_annotation(cls, raw: str) -> RolloutState:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            version = int(d.get("version", 0))
            if version > STATE_VERSION:
                raise StateError(
                    f"state annotation has version {version}, this canaryd reads up to {STATE_VERSION}; upgrade canaryd"
                )
            st = cls(
                phase=Phase(d["phase"]),
                canary=str(d.get("canary", "")),
                stable=str(d.get("stable", "")),
                steps=tuple(int(s) for s in d.get("steps", [])),
                step=int(d["step"]),
                canary_weight=int(d["canary_weight"]),
                started_at=str(d["started_at"]),
                step_started_at=d.get("step_started_at"),
                updated_at=str(d["updated_at"]),
                next_at=d.get("next_at"),
                message=str(d.get("message", "")),
                failures=int(d.get("failures", 0)),
                inconclusive=int(d.get("inconclusive", 0)),
                errors=int(d.get("errors", 0)),
                waiting_since=d.get("waiting_since"),
                paused_phase=_opt_phase(d.get("paused_phase")),
                failure=None if d.get("failure") is None else Failure(d["failure"]),
                tallies=_tallies(d.get("tallies", {})),
                counted_since=d.get("counted_since"),
                hooks_done=tuple(str(h) for h in d.get("hooks_done", [])),
                next_round_at=d.get("next_round_at"),
                history=tuple(AnalysisRecord(**h) for h in d.get("history", [])),
                intents=tuple(IntentRecord(**i) for i in d.get("intents", [])),
                observed_generation=d.get("observed_generation"),
                drifts=int(d.get("drifts", 0)),
                drift_held=_bool(d.get("drift_held", False)),
                version=STATE_VERSION,
                extra=dict(d.get("extra", {})),
            )
            st.validate()
            return st
        except StateError:
            raise
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            detail = str(exc)[:200]
            raise StateError(
                f"the state annotation is not valid canaryd state ({type(exc).__name__}: {detail}); the weights are "
                "held as they are: delete the annotation to start over, or run 'canaryd retry'"
            ) from exc

    def validate(self) -> None:
        """Raise ValueError unless the state holds together (what the engine would act on)."""
        steps = self.steps
        if steps and (steps[-1] != 100 or any(not 0 < a < b for a, b in itertools.pairwise(steps))):
            raise ValueError(f"steps {list(steps)[:20]} do not increase to 100")
        if steps and not 0 < steps[0] <= 100:
            raise ValueError(f"first step {steps[0]} outside 1..100")
        if not -1 <= self.step < max(len(steps), 1 if self.phase == Phase.FAILED else 0):
            raise ValueError(f"step {self.step} outside the {len(steps)} steps")
        if not 0 <= self.canary_weight <= 100:
            raise ValueError(f"canary_weight {self.canary_weight} outside 0..100")
        if self.phase != Phase.FAILED and not (self.canary and self.stable and steps):
            raise ValueError("canary, stable and steps are required")
        for name in (
            "started_at",
            "step_started_at",
            "updated_at",
            "next_at",
            "waiting_since",
            "counted_since",
            "next_round_at",
        ):
            parse_ts(getattr(self, name))
        for n in (self.failures, self.inconclusive, self.errors, self.drifts):
            if n < 0:
                raise ValueError("negative counter")


def _tallies(raw: Any) -> dict[str, list[float | None]]:
    if not isinstance(raw, dict):
        raise ValueError("tallies is not an object")
    return {str(k): SignalTally.from_list(v).to_list() for k, v in raw.items()}  # the judge's rule, once


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{str(v)[:40]!r} is not true or false")
    return v


def _opt_phase(v: Any) -> str | None:
    return None if v is None else Phase(v).value


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != () and v != []}
