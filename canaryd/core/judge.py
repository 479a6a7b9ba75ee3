"""Counts -> cumulative evidence -> a verdict, one signal at a time (pure: no I/O, no clock).

A round's ``Observation`` holds what each backend did since the rollout's first weight (one
``increase()`` over the whole stretch), and ``canaryd.core.evidence.assess`` judges those cumulative
counts with an anytime-valid test; the state keeps the latest counts per signal. The verdicts:

- ERROR: the query failed or returned numbers that are not counts;
- FAIL: evidence of harm crossed its threshold (absolute success rate, canary vs stable beyond the
  tolerance, or too many requests over the latency limit) — at most ``1 - confidence`` likely for a
  healthy canary over the whole rollout, however often it is looked at;
- INCONCLUSIVE: no harm shown, but fewer than ``min-requests`` canary requests so far (or latency
  limited but not measured);
- PASS: no harm shown on enough requests.

With several signals the error budget ``1 - confidence`` is split evenly between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from canaryd.core.analysis import BackendStats, Judgement, Observation, Verdict
from canaryd.core.evidence import Assessment, Outcome, Tally, assess
from canaryd.core.spec import AnalysisSpec

_VERDICT = {Outcome.HARM: Verdict.FAIL, Outcome.OK: Verdict.PASS, Outcome.INSUFFICIENT: Verdict.INCONCLUSIVE}


@dataclass(frozen=True)
class SignalTally:
    """One signal's counts since the rollout started; ``stable`` None = the signal cannot tell versions apart."""

    canary: Tally
    stable: Tally | None

    def to_list(self) -> list[float | None]:
        c, s = self.canary, self.stable
        return [c.requests, c.errors, c.slow, None if s is None else s.requests, None if s is None else s.errors]

    @classmethod
    def from_list(cls, raw: object) -> SignalTally:
        if not isinstance(raw, list) or len(raw) != 5:
            raise ValueError(f"a tally is a list of 5 numbers, not {str(raw)[:80]}")
        c_n, c_e, c_slow, s_n, s_e = (None if v is None else float(v) for v in raw)
        numbers = [v for v in (c_n, c_e, c_slow, s_n, s_e) if v is not None]
        if c_n is None or c_e is None or any(not math.isfinite(v) or v < 0 for v in numbers):
            raise ValueError("a tally holds counts: finite, not negative, the canary's always present")
        stable = None if s_n is None else Tally(s_n, s_e or 0.0)
        return cls(Tally(c_n, c_e, c_slow), stable)


def combine(judgements: Iterable[Judgement]) -> Verdict:
    """One verdict for a round: error > fail > inconclusive > pass (nothing to judge = pass)."""
    verdicts = {j.verdict for j in judgements}
    for v in (Verdict.ERROR, Verdict.FAIL, Verdict.INCONCLUSIVE):
        if v in verdicts:
            return v
    return Verdict.PASS


def judge_round(obs: Observation, spec: AnalysisSpec, *, signals: int = 1) -> tuple[Judgement, SignalTally | None]:
    """Judge a round's cumulative counts; returns the verdict and the counts to keep (None on error)."""
    if obs.error:
        return Judgement(obs.signal, Verdict.ERROR, obs.error), None
    bad = _unusable(obs.canary, "canary") or _unusable(obs.stable, "stable")
    if bad:
        return Judgement(obs.signal, Verdict.ERROR, bad, obs.canary, obs.stable), None
    tally = _tally(obs, spec)
    confidence = 1.0 - (1.0 - spec.confidence) / max(1, signals)
    try:
        a = assess(
            tally.canary,
            tally.stable,
            success_rate_min=spec.success_rate_min,
            tolerance_pct=spec.tolerance_pct,
            confidence=confidence,
            min_requests=spec.min_requests,
            latency_quantile=spec.latency_quantile if spec.latency_max_ms is not None else None,
        )
    except ValueError as exc:
        return Judgement(obs.signal, Verdict.ERROR, f"counts not usable: {exc}", obs.canary, obs.stable), None
    return _judgement(obs, a), tally


def _judgement(obs: Observation, a: Assessment) -> Judgement:
    return Judgement(
        obs.signal,
        _VERDICT[a.outcome],
        a.reason,
        canary=obs.canary,
        stable=obs.stable,
        evidence=a.evidence,
        threshold=a.threshold,
        canary_error_bounds=a.canary_error_bounds,
    )


def _tally(obs: Observation, spec: AnalysisSpec) -> SignalTally:
    c = obs.canary or BackendStats(0.0, 0.0)
    slow = c.slow if spec.latency_max_ms is not None else None
    canary = Tally(c.requests, min(max(c.errors, 0.0), c.requests), slow)
    s = obs.stable
    stable = None if s is None else Tally(s.requests, min(max(s.errors, 0.0), s.requests))
    return SignalTally(canary, stable)


def _unusable(stats: BackendStats | None, who: str) -> str | None:
    if stats is None:
        return None
    if not (math.isfinite(stats.requests) and math.isfinite(stats.errors)):
        return f"{who} numbers are not finite (requests={stats.requests}, errors={stats.errors})"
    if stats.requests < 0:
        return f"{who} request count is negative ({stats.requests:g}); counter reset?"
    return None
