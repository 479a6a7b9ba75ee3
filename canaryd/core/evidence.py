"""Anytime-valid evidence that a canary is harmful, from counts cumulated since the rollout started.

Pure: no I/O, no clock, standard library only. The engine may call ``assess`` as often as it
likes (every few seconds, while paused, ...): the chance that it *ever* answers HARM for a
canary that meets its limits is at most ``1 - confidence`` over the whole rollout. That is what
a per-window test cannot give (it spends its error rate again at every look and forgets the
evidence of earlier windows), and why the counts here are cumulative.

Method (Howard et al. 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences";
Johari et al., "Always valid inference"). For a Bernoulli rate and a hypothesised rate ``p``,
with ``n`` requests and ``e`` errors so far, the one-sided e-process against "rate <= p" is

    E+(p) = sum_k w_k * exp(lam_k * e - n * log(1 - p + p * exp(lam_k)))        lam_k > 0

a fixed-weight mixture over a grid of log-odds ratios ``lam_k`` of the likelihood ratio of
"rate = p tilted by lam_k" to "rate = p". Each term is a nonnegative supermartingale with
initial value 1 under every rate <= p, so by Ville's inequality P(ever E+(p) >= 1/alpha) <= alpha.
Because the grid does not depend on ``p``, E+ is strictly decreasing in ``p`` (and increasing in
``e``, decreasing in ``n``), and log E+ is convex in ``p``: the lower confidence sequence
``{p : E+(p) < 1/alpha}`` is an exact interval found by a monotone Newton iteration, and a test
at a data-dependent point (stable bound + tolerance) stays valid. The upper side uses ``-lam_k``.

Compared with the conjugate beta-binomial mixture (two-sided, its prior pinned to one rate),
the log-odds grid is one-sided (the whole alpha goes to the side that matters), scale-free
(as good at 0.1 % as at 10 %), and exactly monotone in the counts. On simulated small
regressions (1 % against a 0.55 % limit, 1.5 % against 1 %, looked at every 50 of 5,400
requests) it rejected in 79 % / 62 % of runs, a three-prior beta-binomial mixture in 70 % / 43 %.

Counts may be fractional (Prometheus ``increase()`` extrapolates); the formula takes them as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

# The grid of log-odds ratios. Core: 0.3 .. 6 (odds x1.35 .. x400), a ratio of 1.45 apart, so a
# true effect between two points still gets >= 94 % of the best growth rate; weights 1/lam, since
# subtle regressions need the most requests per nat of evidence. Tail: 0.14 .. 0.0034, twice as far
# apart, with weights falling as (1 + 2j)^-3: without it the bounds would stop shrinking at large n
# (with lam >= 0.3 only, the lower bound of a 1 % rate never exceeds 0.86 %); it costs < 0.04 nats.
_RATIO = 20.0 ** (1 / 8)
_CORE = tuple(0.3 * _RATIO**k for k in range(9))
_TAIL = tuple(0.3 * _RATIO ** (-2 * j) for j in range(1, 7))
_RAW_WEIGHTS = (*(2.0 / 0.3 * (1 + 2 * j) ** -3 for j in range(1, 7)), *(1.0 / lam for lam in _CORE))
_LAMBDAS: tuple[float, ...] = (*_TAIL, *_CORE)
_LOG_WEIGHTS: tuple[float, ...] = tuple(math.log(w / sum(_RAW_WEIGHTS)) for w in _RAW_WEIGHTS)
# (log weight, +-lam, expm1(+-lam)) for the lower (+1) and the upper (-1) side.
_TERMS: dict[int, tuple[tuple[float, float, float], ...]] = {
    s: tuple((lw, s * lam, math.expm1(s * lam)) for lw, lam in zip(_LOG_WEIGHTS, _LAMBDAS, strict=True))
    for s in (1, -1)
}

# Shares of alpha = 1 - confidence (union bound). The canary's error rate carries the power of
# both the absolute and the relative test, so it gets the largest share; the stable usually has
# far more requests, so a smaller share widens its bound little. Shares of absent tests are
# redistributed, which is valid because they depend only on the configuration, never on data.
_SHARE_CANARY_ERRORS = 4.0
_SHARE_STABLE_ERRORS = 1.0
_SHARE_CANARY_SLOW = 2.0

_MAX_LOG_EVIDENCE = 700.0  # exp(700) ~ 1e304: evidence is reported capped, decisions are not affected


@dataclass(frozen=True)
class Tally:
    """Counts cumulated since the rollout started (not per window)."""

    requests: float
    errors: float
    slow: float | None = None  # requests over the latency limit; None = not measured

    def __add__(self, other: Tally) -> Tally:
        slow = None if self.slow is None or other.slow is None else self.slow + other.slow
        return Tally(self.requests + other.requests, self.errors + other.errors, slow)


class Outcome(StrEnum):
    HARM = "harm"
    OK = "ok"
    INSUFFICIENT = "insufficient"


@dataclass(frozen=True)
class Assessment:
    outcome: Outcome
    reason: str  # one human line with the numbers
    evidence: float  # e-value of the test closest to rejecting; HARM iff evidence >= threshold
    threshold: float  # 1/alpha_i of that test
    canary_error_bounds: tuple[float, float] | None  # (lo, hi) fractions; each end one-sided at its alpha_i
    stable_error_bounds: tuple[float, float] | None
    canary_slow_bounds: tuple[float, float] | None


@dataclass(frozen=True)
class Alphas:
    """How ``1 - confidence`` is split; each field is the level of one time-uniform bound."""

    canary_errors: float
    stable_errors: float | None
    canary_slow: float | None


def split_alpha(confidence: float, *, with_stable: bool, with_latency: bool) -> Alphas:
    """The union-bound split: a false HARM needs a miss of the canary's error bound, the stable's
    bound or the canary's slow-fraction bound, so their levels may add up to ``1 - confidence``."""
    alpha = 1.0 - confidence
    total = (
        _SHARE_CANARY_ERRORS
        + (_SHARE_STABLE_ERRORS if with_stable else 0.0)
        + (_SHARE_CANARY_SLOW if with_latency else 0.0)
    )
    return Alphas(
        canary_errors=alpha * _SHARE_CANARY_ERRORS / total,
        stable_errors=alpha * _SHARE_STABLE_ERRORS / total if with_stable else None,
        canary_slow=alpha * _SHARE_CANARY_SLOW / total if with_latency else None,
    )


def _log_e_slope(n: float, e: float, p: float, side: int) -> tuple[float, float]:
    """log E(p) and d/dp log E(p); ``side`` +1 = evidence that the rate is above ``p``, -1 below."""
    exps: list[float] = []
    slopes: list[float] = []
    for lw, lam, c in _TERMS[side]:
        exps.append(lw + lam * e - n * math.log1p(p * c))
        slopes.append(c / (1.0 + p * c))
    top = max(exps)
    total = 0.0
    slope = 0.0
    for x, d in zip(exps, slopes, strict=True):
        w = math.exp(x - top)
        total += w
        slope += w * d
    return top + math.log(total), -n * slope / total


def log_evidence(n: float, e: float, p: float, side: int = 1) -> float:
    """log E+(p) (``side=1``: evidence that the rate exceeds ``p``) or log E-(p) (``side=-1``)."""
    return _log_e_slope(n, e, min(max(p, 0.0), 1.0), side)[0]


def lower_bound(n: float, e: float, alpha: float) -> float:
    """Time-uniform lower confidence bound for the rate: P(ever rate < bound) <= alpha."""
    if n <= 0 or e <= 0:
        return 0.0
    return _root(n, e, math.log(1.0 / alpha), 1)


def upper_bound(n: float, e: float, alpha: float) -> float:
    """Time-uniform upper confidence bound for the rate: P(ever rate > bound) <= alpha."""
    if n <= 0 or e >= n:
        return 1.0
    return _root(n, e, math.log(1.0 / alpha), -1)


def _root(n: float, e: float, level: float, side: int) -> float:
    """The p where log E(p) = level. log E is convex and monotone in p (decreasing for side +1,
    increasing for -1), so Newton steps taken from the rejected side approach the root from
    that side without overshooting: every iterate is a conservative bound, stopping early is safe."""
    edge = 0.0 if side == 1 else 1.0
    f_edge, _ = _log_e_slope(n, e, edge, side)
    if f_edge <= level:
        return edge  # nothing rejected: the bound is the edge of [0, 1]
    p = _start(n, e, level, side)
    f, slope = _log_e_slope(n, e, p, side)
    if f < level:  # guessed past the root: one tangent step lands on the rejected side (convexity)
        p = min(max(p - (f - level) / slope, 0.0), 1.0) if slope != 0 else edge
        f, slope = _log_e_slope(n, e, p, side)
    for _ in range(100):
        if slope == 0 or f <= level:
            break
        step = (f - level) / slope  # towards the root, never past it
        nxt = min(max(p - step, 0.0), 1.0)
        if abs(nxt - p) <= 1e-13 + 1e-10 * min(p, 1.0 - p):
            return nxt if _log_e_slope(n, e, nxt, side)[0] >= level - 1e-9 else p
        p = nxt
        f, slope = _log_e_slope(n, e, p, side)
    return p


def _start(n: float, e: float, level: float, side: int) -> float:
    # Wilson-score interval with z^2 = 2 * (level + 2): usually within a few percent of the root.
    phat = e / n
    z2 = 2.0 * (level + 2.0)
    centre = (phat + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2 * (phat * (1 - phat) / n + z2 / (4 * n * n))) / (1 + z2 / n)
    return min(max(centre - side * half, 0.0), 1.0)


@dataclass(frozen=True)
class _Test:
    log_e: float
    alpha: float
    reason: str

    @property
    def margin(self) -> float:
        """>= 0 iff this test rejects (log E >= log 1/alpha)."""
        return self.log_e - math.log(1.0 / self.alpha)


def assess(
    canary: Tally,
    stable: Tally | None,
    *,
    success_rate_min: float,
    tolerance_pct: float,
    confidence: float,
    min_requests: int,
    latency_quantile: float | None = None,
) -> Assessment:
    """HARM as soon as any test rejects; INSUFFICIENT while canary.requests < min_requests and no harm; else OK.

    ``stable`` None = the signal can never tell versions apart (no relative test, its alpha share
    goes to the canary); a stable with zero requests so far is a ``Tally(0, 0)``, not None.
    latency_quantile None = no latency test (canary.slow is ignored); set but ``canary.slow`` None
    = the limit cannot be checked, so never OK (INSUFFICIENT unless an error test shows harm).
    Raises ValueError on non-finite numbers, negative request counts or out-of-range settings;
    errors and slow counts are clamped to [0, requests] (``increase()`` extrapolation noise).
    """
    _check_settings(success_rate_min, tolerance_pct, confidence, min_requests, latency_quantile)
    c = _clean(canary if latency_quantile is not None else Tally(canary.requests, canary.errors), "canary")
    s = _clean(stable, "stable") if stable is not None else None
    alphas = split_alpha(confidence, with_stable=s is not None, with_latency=latency_quantile is not None)
    conf_txt = f"{_num(confidence * 100)} % time-uniform"

    a_c = alphas.canary_errors
    c_bounds = (lower_bound(c.requests, c.errors, a_c), upper_bound(c.requests, c.errors, a_c))
    limit = 1.0 - success_rate_min / 100.0
    tests = [
        _Test(
            log_evidence(c.requests, c.errors, limit),
            a_c,
            f"canary error rate ≥ {_pct(c_bounds[0])} % > {_pct(limit)} % allowed "
            f"(success-rate-min {_num(success_rate_min)} %; {conf_txt}; {_counts(c.errors, c.requests)})",
        )
    ]
    s_bounds = None
    if s is not None and alphas.stable_errors is not None:
        a_s = alphas.stable_errors
        s_bounds = (lower_bound(s.requests, s.errors, a_s), upper_bound(s.requests, s.errors, a_s))
        tol = tolerance_pct / 100.0
        tests.append(
            _Test(
                log_evidence(c.requests, c.errors, s_bounds[1] + tol),
                a_c,
                f"canary error rate ≥ {_pct(c_bounds[0])} % > stable ≤ {_pct(s_bounds[1])} % + "
                f"{_num(tolerance_pct)} pp ({conf_txt}; canary {_counts(c.errors, c.requests)}, "
                f"stable {_counts(s.errors, s.requests)})",
            )
        )
    slow_bounds = None
    slow_unknown = latency_quantile is not None and c.slow is None
    if latency_quantile is not None and c.slow is not None and alphas.canary_slow is not None:
        a_l = alphas.canary_slow
        slow_bounds = (lower_bound(c.requests, c.slow, a_l), upper_bound(c.requests, c.slow, a_l))
        allowed = 1.0 - latency_quantile
        tests.append(
            _Test(
                log_evidence(c.requests, c.slow, allowed),
                a_l,
                f"canary requests over the latency limit ≥ {_pct(slow_bounds[0])} % > {_pct(allowed)} % allowed "
                f"(p{_num(latency_quantile * 100)}; {conf_txt}; {_count(c.slow)} of {_count(c.requests)} slow)",
            )
        )

    worst = max(tests, key=lambda t: t.margin)
    evidence = math.exp(min(worst.log_e, _MAX_LOG_EVIDENCE))
    threshold = 1.0 / worst.alpha

    def out(outcome: Outcome, reason: str) -> Assessment:
        return Assessment(outcome, reason, evidence, threshold, c_bounds, s_bounds, slow_bounds)

    if worst.margin >= 0:
        return out(Outcome.HARM, worst.reason)
    summary = _summary(c_bounds, limit, s_bounds, tolerance_pct, slow_bounds, latency_quantile)
    summary += f"; evidence of harm {_num(evidence)} < {_num(threshold)}"
    if c.requests < min_requests:
        return out(
            Outcome.INSUFFICIENT,
            f"only {_count(c.requests)} canary requests (need {_count(min_requests)}); no harm shown yet: {summary}",
        )
    if slow_unknown:
        return out(Outcome.INSUFFICIENT, f"canary latency not measured; no harm shown yet: {summary}")
    return out(Outcome.OK, f"no harm shown: {summary}; {_count(c.requests)} canary requests")


def _summary(
    c_bounds: tuple[float, float],
    limit: float,
    s_bounds: tuple[float, float] | None,
    tolerance_pct: float,
    slow_bounds: tuple[float, float] | None,
    latency_quantile: float | None,
) -> str:
    text = f"canary error rate ≤ {_pct(c_bounds[1])} % (limit {_pct(limit)} %"
    if s_bounds is not None:
        text += f"; stable ≤ {_pct(s_bounds[1])} % + {_num(tolerance_pct)} pp"
    text += ")"
    if slow_bounds is not None and latency_quantile is not None:
        text += f", slow ≤ {_pct(slow_bounds[1])} % (limit {_pct(1.0 - latency_quantile)} %)"
    return text


def _check_settings(
    success_rate_min: float, tolerance_pct: float, confidence: float, min_requests: int, latency_quantile: float | None
) -> None:
    checks = (
        ("success_rate_min", success_rate_min, 0.0 <= success_rate_min <= 100.0),
        ("tolerance_pct", tolerance_pct, 0.0 <= tolerance_pct <= 100.0),
        ("confidence", confidence, 0.0 < confidence < 1.0),
        ("min_requests", min_requests, min_requests >= 0),
        ("latency_quantile", latency_quantile, latency_quantile is None or 0.0 < latency_quantile < 1.0),
    )
    for name, value, ok in checks:
        # NaN fails every comparison, so it lands here too.
        if not ok:
            raise ValueError(f"{name}={value!r} is out of range")


def _clean(t: Tally, who: str) -> Tally:
    """Refuse what cannot be repaired (non-finite, negative requests); clamp what is only noise."""
    numbers = (t.requests, t.errors) if t.slow is None else (t.requests, t.errors, t.slow)
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError(f"{who} counts are not finite ({t})")
    if t.requests < 0:
        raise ValueError(f"{who} request count is negative ({t.requests:g}); a counter reset?")
    errors = min(max(t.errors, 0.0), t.requests)
    slow = None if t.slow is None else min(max(t.slow, 0.0), t.requests)
    if errors == t.errors and slow == t.slow:
        return t
    return Tally(t.requests, errors, slow)


def _pct(fraction: float) -> str:
    return _num(100.0 * fraction)


def _num(value: float) -> str:
    # 3 significant digits without an exponent for the values seen here: 4.12, 0.0431, 99, 125.
    if value == 0 or not math.isfinite(value) or abs(value) >= 1e6:
        return f"{value:.3g}"
    text = f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _count(value: float) -> str:
    return f"{round(value):,}"


def _counts(errors: float, requests: float) -> str:
    return f"{_count(errors)} errors in {_count(requests)} requests"
