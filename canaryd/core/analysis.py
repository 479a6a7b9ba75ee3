"""Values shared by the metrics layer, the judge and the engine (no I/O, no logic).

A *signal* (envoy, dapr, custom:<name>) measured over one window yields an ``Observation``;
the judge turns it into a ``Judgement``; the engine only reads ``Judgement.verdict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from canaryd.core.spec import AnalysisSpec


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"


@dataclass(frozen=True)
class BackendStats:
    """What one backend (or one app-id) did in the window."""

    requests: float
    errors: float
    latency_ms: float | None = None  # the configured quantile; None = not measured
    slow: float | None = None  # requests slower than the latency limit (bucket edge at or above it); None = unknown

    @property
    def success_rate(self) -> float | None:
        """Percent of requests that succeeded; None when there were none."""
        if self.requests <= 0:
            return None
        return 100.0 * (self.requests - self.errors) / self.requests


@dataclass(frozen=True)
class Observation:
    signal: str
    canary: BackendStats | None
    stable: BackendStats | None  # None when the signal cannot tell versions apart
    error: str | None = None  # set when the query failed; the judge returns ERROR
    series: int | None = None
    """Series the answer held for these backends (None = not counted). 0 means Prometheus has no
    data for them at all — wrong metric names, or the source is not scraped — not "no traffic"."""


@dataclass(frozen=True)
class Judgement:
    signal: str
    verdict: Verdict
    reason: str  # one human line with the numbers, e.g. "canary error rate ≥ 4.1 % > 1 % allowed (...)"
    canary: BackendStats | None = None  # this round's counts
    stable: BackendStats | None = None
    evidence: float | None = None  # cumulative evidence of harm (an e-value); FAIL once it reaches threshold
    threshold: float | None = None
    canary_error_bounds: tuple[float, float] | None = None  # time-uniform bounds of the canary's error rate


@dataclass(frozen=True)
class AnalysisTarget:
    """Everything a provider needs to measure one route's stable and canary."""

    namespace: str
    route: str
    service: str  # the GAMMA parent Service
    port: int  # backend port (for envoy cluster names)
    stable: str
    canary: str
    spec: AnalysisSpec


class Analyzer(Protocol):
    """Measures every signal named in ``target.spec.signals`` over ``target.spec.window_s``; one Observation each.

    Measuring only: judging is ``canaryd.core.judge`` on the cumulative counts."""

    async def analyze(self, target: AnalysisTarget) -> list[Observation]: ...
