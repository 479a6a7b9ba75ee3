"""Today's per-window judge, frozen as the baseline of ``devkit.bench.judge_sim`` (nothing else uses it).

A self-contained copy of ``canaryd/judge.py`` at the commit before the anytime-valid judge
(``canaryd.core.evidence``), with the few value types it needs defined here, so the bench keeps
measuring the old behaviour while canaryd's modules move and change. Pure: no I/O, no clock.

Checks, in order:
1. the query failed -> ERROR;
2. too few canary requests (``min_requests``) -> INCONCLUSIVE, never PASS or FAIL;
3. absolute: canary success rate >= ``success_rate_min``; latency quantile <= ``latency_max_ms``;
4. relative (stable measured with enough requests): a one-sided test that the canary's error
   ratio exceeds the stable's by more than ``tolerance_pct`` points at ``confidence``.
Any failed check -> FAIL; a latency limit that cannot be checked -> INCONCLUSIVE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"


@dataclass(frozen=True)
class BackendStats:
    """What one backend did in the window."""

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
    reason: str
    canary: BackendStats | None = None
    stable: BackendStats | None = None


@dataclass(frozen=True)
class AnalysisSpec:
    """The fields of canaryd's ``AnalysisSpec`` that the judge reads (defaults: the cluster's)."""

    success_rate_min: float = 99.0  # percent
    latency_max_ms: float | None = None
    latency_quantile: float = 0.99
    min_requests: int = 50
    confidence: float = 0.99
    tolerance_pct: float = 0.5


def combine(judgements: Iterable[Judgement]) -> Verdict:
    """One verdict for a round: error > fail > inconclusive > pass (nothing to judge = pass)."""
    verdicts = {j.verdict for j in judgements}
    for v in (Verdict.ERROR, Verdict.FAIL, Verdict.INCONCLUSIVE):
        if v in verdicts:
            return v
    return Verdict.PASS


def judge(obs: Observation, spec: AnalysisSpec) -> Judgement:  # noqa: C901 - kept as it was
    def out(verdict: Verdict, reason: str) -> Judgement:
        return Judgement(obs.signal, verdict, reason, canary=obs.canary, stable=obs.stable)

    if obs.error:
        return out(Verdict.ERROR, obs.error)
    if obs.canary is None:
        return out(Verdict.INCONCLUSIVE, "no canary data in the window")
    bad = _unusable(obs.canary, "canary") or (obs.stable and _unusable(obs.stable, "stable"))
    if bad:
        return out(Verdict.ERROR, bad)

    canary = _clamped(obs.canary)
    stable = _clamped(obs.stable) if obs.stable is not None else None
    if canary.requests < spec.min_requests:
        return out(
            Verdict.INCONCLUSIVE,
            f"only {_count(canary.requests)} canary requests in the window (need {_count(spec.min_requests)})",
        )

    rate = _success(canary)
    context = _context(stable, spec)
    failures: list[str] = []
    notes: list[str] = []
    if rate < spec.success_rate_min:
        failures.append(f"canary success rate {_pct(rate)}% < {_pct(spec.success_rate_min)}%{context}")
    else:
        notes.append(f"canary success rate {_pct(rate)}% >= {_pct(spec.success_rate_min)}%{context}")

    q = f"p{_pct(spec.latency_quantile * 100)}"
    latency_unknown = False
    if spec.latency_max_ms is not None:
        lat = canary.latency_ms
        if lat is None or not math.isfinite(lat):
            latency_unknown = True
            notes.append(f"canary {q} latency not measured (limit {_ms(spec.latency_max_ms)})")
        elif lat > spec.latency_max_ms:
            failures.append(f"canary {q} latency {_ms(lat)} > {_ms(spec.latency_max_ms)}{_stable_latency(stable)}")
        else:
            notes.append(f"canary {q} latency {_ms(lat)} <= {_ms(spec.latency_max_ms)}")

    if stable is not None and stable.requests >= spec.min_requests:
        worse = relative_failure(canary, stable, spec.tolerance_pct, spec.confidence)
        if worse:
            failures.append(worse)

    if failures:
        return out(Verdict.FAIL, "; ".join(failures))
    if latency_unknown:
        return out(Verdict.INCONCLUSIVE, "; ".join(notes))
    return out(Verdict.PASS, "; ".join(notes))


def relative_failure(canary: BackendStats, stable: BackendStats, tolerance_pct: float, confidence: float) -> str | None:
    """A reason when the canary's error ratio is worse than stable's + tolerance, else None.

    One-sided z-test of H0: p_canary - p_stable <= tolerance. Proportions use the
    Agresti-Caffo adjustment (+1 error, +1 success per side) so zero-error and small samples
    give a finite, conservative standard error instead of a 0/0 or a spurious certainty.
    """
    n_c, n_s = canary.requests, stable.requests
    if n_c <= 0 or n_s <= 0:
        return None
    p_c = (canary.errors + 1) / (n_c + 2)
    p_s = (stable.errors + 1) / (n_s + 2)
    se = math.sqrt(p_c * (1 - p_c) / (n_c + 2) + p_s * (1 - p_s) / (n_s + 2))
    tol = tolerance_pct / 100.0
    z = (p_c - p_s - tol) / se
    z_crit = NormalDist().inv_cdf(confidence)
    if not z > z_crit:
        return None
    return (
        f"canary error rate {_pct(100 * canary.errors / n_c)}% > stable "
        f"{_pct(100 * stable.errors / n_s)}% + {_pct(tolerance_pct)} points "
        f"(z={z:.2f} > {z_crit:.2f} at {_pct(confidence * 100)}% confidence; "
        f"{_count(n_c)} vs {_count(n_s)} requests)"
    )


def _unusable(stats: BackendStats, who: str) -> str | None:
    if not (math.isfinite(stats.requests) and math.isfinite(stats.errors)):
        return f"{who} numbers are not finite (requests={stats.requests}, errors={stats.errors})"
    if stats.requests < 0:
        return f"{who} request count is negative ({stats.requests:g}); counter reset?"
    return None


def _clamped(stats: BackendStats) -> BackendStats:
    # increase() extrapolates and counters are scraped at slightly different instants, so
    # errors can come out a hair below 0 or above the requests; clamp instead of failing.
    errors = min(max(stats.errors, 0.0), stats.requests)
    if errors == stats.errors:
        return stats
    return BackendStats(stats.requests, errors, stats.latency_ms)


def _success(stats: BackendStats) -> float:
    rate = stats.success_rate
    return 100.0 if rate is None else rate


def _context(stable: BackendStats | None, spec: AnalysisSpec) -> str:
    if stable is None:
        return ""
    if stable.requests < spec.min_requests or stable.success_rate is None:
        return f" (stable {_count(stable.requests)} requests, too few to compare)"
    return f" (stable {_pct(_success(stable))}%, {_count(stable.requests)} requests)"


def _stable_latency(stable: BackendStats | None) -> str:
    if stable is None or stable.latency_ms is None or not math.isfinite(stable.latency_ms):
        return ""
    return f" (stable {_ms(stable.latency_ms)})"


def _pct(value: float) -> str:
    # Up to 3 decimals, trailing zeros trimmed: 99 -> "99", 91.2 -> "91.2", 99.95 -> "99.95".
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


def _count(value: float) -> str:
    return f"{round(value):,}"


def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.2f} ms"
