"""Values shared by the metrics layer, the judge and the engine (no I/O, no logic).

A *signal* (envoy, dapr, custom:<name>) measured over one window yields an ``Observation``;
the judge turns it into a ``Judgement``; the engine only reads ``Judgement.verdict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from canaryd.spec import AnalysisSpec


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


@dataclass(frozen=True)
class Judgement:
    signal: str
    verdict: Verdict
    reason: str  # one human line with the numbers, e.g. "canary 91.2% < 99% (stable 99.9%, 4,210 req)"
    canary: BackendStats | None = None
    stable: BackendStats | None = None


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
    """Measures and judges every signal named in ``target.spec.signals``; one Judgement each."""

    async def analyze(self, target: AnalysisTarget) -> list[Judgement]: ...
