"""The ``canaryd.io/*`` annotations on an HTTPRoute, parsed into a typed ``RolloutSpec``.

Pure: no I/O. Every failure is a ``SpecError`` naming the annotation and the fix.
See docs/annotations.md for the user-facing reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from canaryd.core.errors import SpecError

DriftPolicy = Literal["reassert", "hold"]
DRIFT_POLICIES: tuple[DriftPolicy, ...] = ("reassert", "hold")

PREFIX = "canaryd.io/"
CANARY = PREFIX + "canary"
STABLE = PREFIX + "stable"
STEPS = PREFIX + "steps"
STEP_WEIGHT = PREFIX + "step-weight"
MAX_WEIGHT = PREFIX + "max-weight"
INTERVAL = PREFIX + "interval"
ANALYSIS = PREFIX + "analysis"
ANALYSIS_WINDOW = PREFIX + "analysis-window"
ANALYSIS_INTERVAL = PREFIX + "analysis-interval"
SUCCESS_RATE_MIN = PREFIX + "success-rate-min"
LATENCY_MAX = PREFIX + "latency-max"
LATENCY_QUANTILE = PREFIX + "latency-quantile"
MIN_REQUESTS = PREFIX + "min-requests"
MAX_INCONCLUSIVE = PREFIX + "max-inconclusive"
ON_INCONCLUSIVE = PREFIX + "on-inconclusive"
CONFIDENCE = PREFIX + "confidence"
TOLERANCE = PREFIX + "tolerance"
FAILURE_THRESHOLD = PREFIX + "failure-threshold"
MAX_ERRORS = PREFIX + "max-errors"
READY_DEADLINE = PREFIX + "ready-deadline"
APP_ID = PREFIX + "app-id"
STABLE_APP_ID = PREFIX + "stable-app-id"
CALLER_APP_ID = PREFIX + "caller-app-id"
PORT = PREFIX + "port"
COUNT_4XX = PREFIX + "count-4xx"
HOOKS = PREFIX + "hooks"  # names of hooks the cluster admin configured (canaryd.core.hooks)
NOTIFY = PREFIX + "notify"
ON_DRIFT = PREFIX + "on-drift"
# Controller-owned / CLI-written:
STATE = PREFIX + "state"
INTENT = PREFIX + "intent"
PHASE_LABEL = PREFIX + "phase"  # a label, not an annotation: `kubectl get httproute -L canaryd.io/phase`

USER_ANNOTATIONS = (
    CANARY,
    STABLE,
    STEPS,
    STEP_WEIGHT,
    MAX_WEIGHT,
    INTERVAL,
    ANALYSIS,
    ANALYSIS_WINDOW,
    ANALYSIS_INTERVAL,
    SUCCESS_RATE_MIN,
    LATENCY_MAX,
    LATENCY_QUANTILE,
    MIN_REQUESTS,
    MAX_INCONCLUSIVE,
    ON_INCONCLUSIVE,
    CONFIDENCE,
    TOLERANCE,
    FAILURE_THRESHOLD,
    MAX_ERRORS,
    READY_DEADLINE,
    APP_ID,
    STABLE_APP_ID,
    CALLER_APP_ID,
    PORT,
    COUNT_4XX,
    HOOKS,
    NOTIFY,
    ON_DRIFT,
)


class RolloutDefaults(BaseModel):
    """Defaults for every rollout; each has a ``canaryd.io/*`` annotation that overrides it."""

    steps: list[int] = Field(default=[5, 10, 25, 50, 100])
    """Canary weight in percent at each step: strictly increasing within 1..100, 100 added when the last is lower."""

    @field_validator("steps")
    @classmethod
    def _steps_as_annotated(cls, v: list[int]) -> list[int]:
        """The rule of the ``canaryd.io/steps`` annotation (``parse_steps``), checked when the daemon starts."""
        try:
            parse_steps(",".join(map(str, v)))
        except SpecError as exc:
            raise ValueError(f"{exc.message} (the rule of {STEPS})") from None
        return v

    interval_s: float = 60.0
    """Seconds to hold each step (and the analysis window when none is set)."""
    failure_threshold: int = 1
    """Consecutive analysis rounds showing harm that trigger a rollback (the test is anytime-valid: 1 suffices)."""
    analysis_interval_s: float = 10.0
    """Seconds between analysis rounds inside a step (capped at the step interval)."""
    ready_deadline_s: float = 300.0
    """How long the canary may lack ready endpoints before the rollout rolls back."""
    analysis: str = "none"
    """Signals to judge between steps: ``none``, ``envoy``, ``dapr``, ``custom:<name>``, comma-joined."""
    success_rate_min: float = 99.0
    """Minimum canary success rate in percent (absolute check)."""
    latency_max_ms: float | None = None
    """Maximum canary latency quantile in milliseconds (absolute check), unset = no check."""
    latency_quantile: float = 0.99
    min_requests: int = 50
    """Below this many canary requests since the rollout started a step does not advance (inconclusive)."""
    max_inconclusive: int = 5
    """Inconclusive rounds in a row before ``on_inconclusive`` happens."""
    on_inconclusive: Literal["pause", "rollback"] = "pause"
    confidence: float = 0.99
    """Confidence of the canary-vs-stable test on error proportions."""
    tolerance_pct: float = 0.5
    """Tolerated extra error rate of the canary over the stable, in percentage points."""
    max_errors: int = 3
    """Consecutive analysis errors (Prometheus down, bad answer) before rolling back."""
    count_4xx: bool = False
    """Count 4xx responses as errors too (by default only 5xx, and for Dapr non-OK gRPC codes, are errors)."""
    on_drift: DriftPolicy = "reassert"
    """When someone else (a GitOps sync) overwrites the two managed weights mid-rollout: ``reassert``
    writes them back once and pauses on a second overwrite; ``hold`` pauses at once (docs/gitops.md)."""


Intent = Literal["promote", "abort", "pause", "resume", "retry"]
INTENTS: tuple[Intent, ...] = ("promote", "abort", "pause", "resume", "retry")

# DNS-1123 label: what a Service (and so a backendRef) name may be. Anything else is refused,
# which also keeps these values safe to place inside PromQL label matchers.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_DURATION = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,9})?)\s*(ms|s|m|h|d)?\s*$", re.ASCII)
# Numbers as the docs say: ASCII digits only (Python's int()/float() also take '٣', '５' and '1_000').
_INT = re.compile(r"^[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, None: 1.0}
_SIGNAL = re.compile(r"^(none|envoy|dapr|custom:[a-z0-9]([-a-z0-9_]{0,61}[a-z0-9])?)\Z")


@dataclass(frozen=True)
class AnalysisSpec:
    signals: tuple[str, ...]  # () = time-based rollout
    window_s: float  # the longest stretch one round measures (counts since the first weight, at most this)
    interval_s: float  # seconds between rounds inside a step
    success_rate_min: float  # percent
    latency_max_ms: float | None
    latency_quantile: float
    min_requests: int
    max_inconclusive: int
    on_inconclusive: Literal["pause", "rollback"]
    confidence: float
    tolerance_pct: float
    failure_threshold: int
    max_errors: int
    app_id: str | None
    stable_app_id: str | None
    caller_app_id: str | None
    count_4xx: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.signals)


@dataclass(frozen=True)
class RolloutSpec:
    canary: str
    stable: str | None  # None = the other backendRef of the rule
    steps: tuple[int, ...]  # percent, strictly increasing, last == 100
    interval_s: float
    ready_deadline_s: float
    port: int | None
    analysis: AnalysisSpec
    on_drift: DriftPolicy = "reassert"

    def fingerprint(self) -> str:
        """Identity of the rollout: a change of canary (or stable) starts a new rollout."""
        return f"{self.stable or ''}->{self.canary}"


QUOTE_LIMIT = 200

# The documented range of every duration (seconds): outside it the route is Failed, never retried forever.
DURATION_RANGES: dict[str, tuple[float, float]] = {
    INTERVAL: (0.1, 86_400.0),  # up to 24 h
    ANALYSIS_WINDOW: (1.0, 86_400.0),
    ANALYSIS_INTERVAL: (1.0, 3_600.0),
    READY_DEADLINE: (1.0, 7 * 86_400.0),  # up to 7 d
    LATENCY_MAX: (0.001, 3_600.0),
}


def quote(raw: str) -> str:
    """``repr`` of a user's value, cut to ``QUOTE_LIMIT`` characters: a huge value must not make a huge message."""
    if len(raw) <= QUOTE_LIMIT:
        return repr(raw)
    return repr(raw[:QUOTE_LIMIT]) + f"… ({len(raw):,} characters)"


def parse_duration(annotation: str, raw: str) -> float:
    m = _DURATION.match(raw)
    if not m:
        raise SpecError(annotation, f"cannot parse duration {quote(raw)}; write e.g. '30s', '2m', '500ms'")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    lo, hi = DURATION_RANGES.get(annotation, (0.001, 7 * 86_400.0))
    if not (math.isfinite(value) and lo <= value <= hi):
        raise SpecError(annotation, f"duration {quote(raw)} is out of range; use {_secs(lo)}..{_secs(hi)}")
    return value


def _secs(v: float) -> str:
    for unit, size in (("d", 86_400.0), ("h", 3_600.0), ("m", 60.0), ("s", 1.0)):
        if v >= size and v % size == 0:
            return f"{v / size:g}{unit}"
    return f"{v * 1000:g}ms"


def _int(annotation: str, raw: str, lo: int, hi: int) -> int:
    try:
        if not _INT.match(raw.strip()):
            raise ValueError(raw)
        value = int(raw.strip())
    except ValueError:
        raise SpecError(annotation, f"{quote(raw)} is not a whole number; write e.g. '{lo}'") from None
    if not lo <= value <= hi:
        raise SpecError(annotation, f"{quote(str(value))} is out of range; use {lo}..{hi}")
    return value


def _float(annotation: str, raw: str, lo: float, hi: float) -> float:
    try:
        text = raw.strip().rstrip("%")
        if not _FLOAT.match(text):
            raise ValueError(raw)
        value = float(text)
    except ValueError:
        raise SpecError(annotation, f"{quote(raw)} is not a number") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise SpecError(annotation, f"{value:g} is out of range; use {lo:g}..{hi:g}")
    return value


def _name(annotation: str, raw: str) -> str:
    value = raw.strip()
    if not _DNS_LABEL.match(value):
        raise SpecError(
            annotation,
            f"{quote(raw)} is not a valid backend/app name (lowercase letters, digits and '-', at most 63 characters)",
        )
    return value


def parse_steps(raw: str) -> tuple[int, ...]:
    parts = [p.strip().rstrip("%") for p in raw.split(",") if p.strip()]
    if not parts:
        raise SpecError(STEPS, "no steps given; write e.g. '5,10,25,50,100'")
    steps: list[int] = []
    for p in parts:
        try:
            if not _INT.match(p):
                raise ValueError(p)
            v = int(p)
        except ValueError:
            raise SpecError(STEPS, f"step {quote(p)} is not a whole percent; write e.g. '5,10,25,50,100'") from None
        if not 0 < v <= 100:
            raise SpecError(STEPS, f"step {quote(str(v))} is outside 1..100")
        if steps and v <= steps[-1]:
            raise SpecError(STEPS, f"steps must increase: {steps[-1]} then {v}")
        steps.append(v)
    if steps[-1] != 100:
        steps.append(100)
    return tuple(steps)


def steps_from_increment(step: int, maximum: int) -> tuple[int, ...]:
    out = list(range(step, maximum + 1, step))
    if not out or out[-1] != 100:
        out.append(100)
    return tuple(dict.fromkeys(out))


def parse_spec(annotations: Mapping[str, str], defaults: RolloutDefaults) -> RolloutSpec | None:  # noqa: C901 - one branch per annotation, each a single range check
    """Return the spec, ``None`` when the route is not annotated for canaryd, or raise ``SpecError``."""
    a = annotations
    if CANARY not in a:
        return None
    canary = _name(CANARY, a[CANARY])
    stable = _name(STABLE, a[STABLE]) if a.get(STABLE, "").strip() else None
    if stable == canary:
        raise SpecError(STABLE, f"stable and canary are both {canary!r}; name two different backends")

    if STEPS in a and (STEP_WEIGHT in a or MAX_WEIGHT in a):
        raise SpecError(STEPS, f"set either {STEPS} or {STEP_WEIGHT}/{MAX_WEIGHT}, not both")
    if STEPS in a:
        steps = parse_steps(a[STEPS])
    elif STEP_WEIGHT in a:
        inc = _int(STEP_WEIGHT, a[STEP_WEIGHT], 1, 100)
        mx = _int(MAX_WEIGHT, a[MAX_WEIGHT], inc, 100) if MAX_WEIGHT in a else 100
        steps = steps_from_increment(inc, mx)
    elif MAX_WEIGHT in a:
        raise SpecError(MAX_WEIGHT, f"{MAX_WEIGHT} needs {STEP_WEIGHT}")
    else:
        steps = parse_steps(",".join(str(s) for s in defaults.steps))

    interval = parse_duration(INTERVAL, a[INTERVAL]) if INTERVAL in a else defaults.interval_s
    deadline = parse_duration(READY_DEADLINE, a[READY_DEADLINE]) if READY_DEADLINE in a else defaults.ready_deadline_s
    port = _int(PORT, a[PORT], 1, 65535) if PORT in a else None

    raw_signals = a.get(ANALYSIS, defaults.analysis)
    signals: list[str] = []
    for s in (x.strip() for x in raw_signals.split(",")):
        if not s:
            continue
        if not _SIGNAL.match(s):
            raise SpecError(ANALYSIS, f"unknown signal {quote(s)}; use none, envoy, dapr or custom:<template-name>")
        if s != "none" and s not in signals:
            signals.append(s)
    latency_max: float | None = defaults.latency_max_ms
    if LATENCY_MAX in a:
        latency_max = parse_duration(LATENCY_MAX, a[LATENCY_MAX]) * 1000.0
    app_id = _name(APP_ID, a[APP_ID]) if APP_ID in a else None
    if "dapr" in signals and app_id is None:
        raise SpecError(APP_ID, f"the dapr signal needs {APP_ID} (the Dapr app-id of the service)")

    analysis = AnalysisSpec(
        signals=tuple(signals),
        window_s=parse_duration(ANALYSIS_WINDOW, a[ANALYSIS_WINDOW]) if ANALYSIS_WINDOW in a else 86_400.0,
        interval_s=min(
            parse_duration(ANALYSIS_INTERVAL, a[ANALYSIS_INTERVAL])
            if ANALYSIS_INTERVAL in a
            else defaults.analysis_interval_s,
            interval,
        ),
        success_rate_min=_float(SUCCESS_RATE_MIN, a[SUCCESS_RATE_MIN], 0, 100)
        if SUCCESS_RATE_MIN in a
        else defaults.success_rate_min,
        latency_max_ms=latency_max,
        latency_quantile=_float(LATENCY_QUANTILE, a[LATENCY_QUANTILE], 0.5, 0.999)
        if LATENCY_QUANTILE in a
        else defaults.latency_quantile,
        min_requests=_int(MIN_REQUESTS, a[MIN_REQUESTS], 1, 10**9) if MIN_REQUESTS in a else defaults.min_requests,
        max_inconclusive=_int(MAX_INCONCLUSIVE, a[MAX_INCONCLUSIVE], 1, 10**6)
        if MAX_INCONCLUSIVE in a
        else defaults.max_inconclusive,
        on_inconclusive=_on_inconclusive(a.get(ON_INCONCLUSIVE, defaults.on_inconclusive)),
        confidence=_float(CONFIDENCE, a[CONFIDENCE], 0.5, 0.9999) if CONFIDENCE in a else defaults.confidence,
        tolerance_pct=_float(TOLERANCE, a[TOLERANCE], 0, 100) if TOLERANCE in a else defaults.tolerance_pct,
        failure_threshold=_int(FAILURE_THRESHOLD, a[FAILURE_THRESHOLD], 1, 1000)
        if FAILURE_THRESHOLD in a
        else defaults.failure_threshold,
        max_errors=_int(MAX_ERRORS, a[MAX_ERRORS], 1, 1000) if MAX_ERRORS in a else defaults.max_errors,
        app_id=app_id,
        stable_app_id=_name(STABLE_APP_ID, a[STABLE_APP_ID]) if STABLE_APP_ID in a else None,
        caller_app_id=_name(CALLER_APP_ID, a[CALLER_APP_ID]) if CALLER_APP_ID in a else None,
        count_4xx=_bool(COUNT_4XX, a[COUNT_4XX]) if COUNT_4XX in a else defaults.count_4xx,
    )
    return RolloutSpec(
        canary=canary,
        stable=stable,
        steps=steps,
        interval_s=interval,
        ready_deadline_s=deadline,
        port=port,
        analysis=analysis,
        on_drift=_on_drift(a.get(ON_DRIFT, defaults.on_drift)),
    )


def _bool(annotation: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0"):
        return False
    raise SpecError(annotation, f"{quote(raw)} is not 'true' or 'false'")


def _on_inconclusive(raw: str) -> Literal["pause", "rollback"]:
    v = raw.strip()
    if v == "pause":
        return "pause"
    if v == "rollback":
        return "rollback"
    raise SpecError(ON_INCONCLUSIVE, f"{quote(raw)} is not 'pause' or 'rollback'")


def _on_drift(raw: str) -> DriftPolicy:
    v = raw.strip()
    for policy in DRIFT_POLICIES:
        if v == policy:
            return policy
    raise SpecError(ON_DRIFT, f"{quote(raw)} is not 'reassert' or 'hold'")


def parse_intent(raw: str | None) -> Intent | None:
    if raw is None or not raw.strip():
        return None
    v = raw.strip().split("@", 1)[0]
    for i in INTENTS:
        if v == i:
            return i
    raise SpecError(INTENT, f"unknown intent {quote(raw)}; use one of {', '.join(INTENTS)}")
