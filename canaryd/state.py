"""The rollout state, persisted as one versioned JSON annotation (``canaryd.io/state``).

Pure codec: ``RolloutState.from_annotation`` / ``to_annotation``. Everything the engine needs to
resume after a SIGKILL is here: the step index and when it started, the counters, the weights
it last wrote. History is trimmed so the annotation stays small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from canaryd.errors import StateError

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


def now_utc() -> datetime:
    return datetime.now(UTC)


def ts(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


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
    paused_phase: str | None = None  # phase to return to on resume
    history: tuple[AnalysisRecord, ...] = ()
    intents: tuple[IntentRecord, ...] = ()
    observed_generation: int | None = None
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def current_step_weight(self) -> int:
        return 0 if self.step < 0 else self.steps[self.step]

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
        d["steps"] = list(self.steps)
        d["history"] = [_compact(dict(vars(h))) for h in self.history]
        d["intents"] = [dict(vars(i)) for i in self.intents]
        if not d["extra"]:
            del d["extra"]
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
            return cls(
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
                paused_phase=d.get("paused_phase"),
                history=tuple(AnalysisRecord(**h) for h in d.get("history", [])),
                intents=tuple(IntentRecord(**i) for i in d.get("intents", [])),
                observed_generation=d.get("observed_generation"),
                version=STATE_VERSION,
                extra=dict(d.get("extra", {})),
            )
        except StateError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"state annotation is not valid canaryd state ({exc}); remove it to restart the rollout"
            ) from exc


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != () and v != []}
