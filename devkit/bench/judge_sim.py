"""Seeded Monte-Carlo comparison of two rollout judges: ``python -m devkit.bench.judge_sim``.

Simulates whole rollouts with Poisson traffic (Binomial errors) over a grid of total rates,
stable error rates and canary regressions, under two setting sets, and compares:

* baseline: today's per-window judge (``devkit.bench.baseline_judge``) and its policy: one round
  per step at the step's end over the last window (= interval), FAIL/INCONCLUSIVE retry after
  another interval, ``failure-threshold`` (2) FAIL rounds roll back, ``max-inconclusive`` (5)
  INCONCLUSIVE rounds in a row pause, and a paused rollout is never analysed again;
* new: ``canaryd.core.evidence.assess`` (the real code) on counts cumulated since the rollout
  started, with the policy the engine implements: a round every ``analysis_interval`` (10 s,
  capped at the step interval); HARM in ``failure-threshold`` (1) consecutive rounds rolls back
  at once, also while paused; at a step's end OK advances, INSUFFICIENT holds one more interval
  and counts an inconclusive step-end; ``max-inconclusive`` of those in a row pause, and rounds
  go on while paused; reaching 100 % is promotion.

Speed: a round can only matter if it is HARM (between step ends, and while paused), and HARM is
monotone in the counts (more canary errors or fewer canary requests, fewer stable errors or more
stable requests never lower the evidence). So a block of rounds is first judged on its most
pessimistic counts; only blocks where that could be HARM are split, down to single rounds, each
judged exactly. ``--exact`` judges every round instead (same results, much slower).

Writes JSON (``--out``), a Markdown summary next to it (``judge.md``) and a figure
(``docs/img/evidence-demo.png``). Deterministic for a given ``--seed`` and ``--rollouts``,
whatever the number of workers: every cell has its own seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from canaryd.core.evidence import Assessment, Outcome, Tally, assess
from devkit.bench import baseline_judge as bj

RATES = (1.0, 10.0, 100.0, 1000.0)  # total requests per second (stable + canary)
STABLE_ERROR_RATES = (0.0, 0.001, 0.01)
DELTAS_PP = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)  # canary error rate = p0 + delta
HORIZON_S = 7200.0
ORACLE_ALPHA = 0.01
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "devkit" / "bench" / "results" / "judge.json"
DEFAULT_PNG = ROOT / "docs" / "img" / "evidence-demo.png"


@dataclass(frozen=True)
class Settings:
    name: str
    steps: tuple[int, ...]
    interval_s: float  # = the baseline's analysis window
    min_requests: int
    success_rate_min: float = 99.0
    confidence: float = 0.99
    tolerance_pct: float = 0.5
    max_inconclusive: int = 5
    baseline_failure_threshold: int = 2
    new_failure_threshold: int = 1
    analysis_interval_s: float = 10.0

    @property
    def round_s(self) -> float:
        return min(self.analysis_interval_s, self.interval_s)


SETTINGS = (
    Settings("cluster-defaults", (5, 10, 25, 50, 100), 60.0, 50),
    Settings("demo", (10, 25, 50, 100), 3.0, 150),
)


@dataclass(frozen=True)
class Cell:
    setting: Settings
    rate: float
    p0: float
    delta_pp: float

    @property
    def pc(self) -> float:
        return self.p0 + self.delta_pp / 100.0

    @property
    def label(self) -> str:
        return f"{self.setting.name} R={self.rate:g} p0={self.p0 * 100:g}% d={self.delta_pp:g}pp"

    def harm_boundary(self) -> float | None:
        """The smallest canary error rate that the settings call harmful and this canary exceeds
        (the oracle's null), or None when the canary is within its limits."""
        s = self.setting
        limits = [1.0 - s.success_rate_min / 100.0, self.p0 + s.tolerance_pct / 100.0]
        violated = [b for b in limits if self.pc > b + 1e-12]
        return min(violated) if violated else None


@dataclass
class Run:
    outcome: str  # rolled_back | promoted | paused | running (at the horizon)
    t_end: float  # time of rollback / promotion / pause (horizon when running)
    exposure_requests: float = 0.0  # canary requests served before the rollback
    exposure_errors: float = 0.0  # canary errors served before the rollback
    errors_by_horizon: float = 0.0  # canary errors served in [0, horizon], whatever happened
    requests_by_horizon: float = 0.0  # canary requests in [0, horizon]
    rounds: int = 0  # analysis rounds the policy held (judged or provably not HARM)
    calls: int = 0  # assess()/judge() calls made


@dataclass
class _Cum:
    """Counts cumulated since the rollout started, one entry per analysis round."""

    times: list[float] = field(default_factory=list)
    nc: list[int] = field(default_factory=list)
    ec: list[int] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)
    es: list[int] = field(default_factory=list)


def _draw(
    rng: np.random.Generator, rate: float, weight: int, p0: float, pc: float, durations: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], ...]:
    share = weight / 100.0
    nc = rng.poisson(rate * share * durations)
    ns = rng.poisson(rate * (1.0 - share) * durations)
    return nc, rng.binomial(nc, pc), ns, rng.binomial(ns, p0)


def _round_times(start: float, end: float, every: float) -> list[float]:
    out: list[float] = []
    k = 1
    while start + k * every < end - 1e-9:
        out.append(start + k * every)
        k += 1
    out.append(end)
    return out


class _NewJudge:
    """One rollout under the new policy; ``judge(i)`` is the real ``assess`` on round i's counts."""

    def __init__(self, cell: Cell, rng: np.random.Generator, exact: bool) -> None:
        self.cell, self.rng, self.exact = cell, rng, exact
        s = cell.setting
        self.kw: dict[str, Any] = {
            "success_rate_min": s.success_rate_min,
            "tolerance_pct": s.tolerance_pct,
            "confidence": s.confidence,
            "min_requests": s.min_requests,
        }
        self.calls = 0
        self.rounds = 0

    def _assess(self, nc: float, ec: float, ns: float, es: float) -> Assessment:
        self.calls += 1
        return assess(Tally(nc, ec), Tally(ns, es), **self.kw)

    def segment(self, start: float, end: float, weight: int, base: tuple[int, int, int, int]) -> _Cum:
        times = _round_times(start, end, self.cell.setting.round_s)
        durations = np.diff(np.array([start, *times]))
        draws = _draw(self.rng, self.cell.rate, weight, self.cell.p0, self.cell.pc, durations)
        cum = _Cum(times=times)
        for name, arr, b in zip(("nc", "ec", "ns", "es"), draws, base, strict=True):
            setattr(cum, name, (np.cumsum(arr) + b).tolist())
        self.rounds += len(times)
        return cum

    def first_harm(self, c: _Cum, lo: int, hi: int) -> int | None:
        """The first round in [lo, hi] judged HARM."""
        if self.exact:
            for i in range(lo, hi + 1):
                if self._assess(c.nc[i], c.ec[i], c.ns[i], c.es[i]).outcome is Outcome.HARM:
                    return i
            return None
        return self._search(c, lo, hi)

    def _search(self, c: _Cum, lo: int, hi: int) -> int | None:
        # Most pessimistic counts of the block: fewest canary requests with the most canary errors,
        # most stable requests with the fewest stable errors. When the canary errors at the end
        # exceed the requests at the start the bound does not exist (assess would clamp): split.
        if c.ec[hi] <= c.nc[lo] or lo == hi:
            worst = self._assess(c.nc[lo], c.ec[hi], c.ns[hi], c.es[lo])
            if worst.outcome is not Outcome.HARM:
                return None
            if lo == hi:
                return lo
        mid = (lo + hi) // 2
        found = self._search(c, lo, mid)
        return found if found is not None else self._search(c, mid + 1, hi)

    def rollback_round(self, c: _Cum, threshold: int, streak: int) -> tuple[int | None, int]:
        """(round of the rollback or None, HARM streak after the last round)."""
        i, n = 0, len(c.times)
        while i < n:
            if streak == 0:
                found = self.first_harm(c, i, n - 1)
                if found is None:
                    return None, 0
                i, streak = found, 1
            elif self._assess(c.nc[i], c.ec[i], c.ns[i], c.es[i]).outcome is Outcome.HARM:
                streak += 1
            else:
                streak = 0
            if streak >= threshold:
                return i, streak
            i += 1
        return None, streak


def run_new(cell: Cell, rng: np.random.Generator, exact: bool = False) -> Run:
    s = cell.setting
    j = _NewJudge(cell, rng, exact)
    t, step, inconclusive, streak = 0.0, 0, 0, 0
    base = (0, 0, 0, 0)
    paused, pause_at = False, 0.0
    while True:
        weight = s.steps[step]
        end = HORIZON_S if paused else min(t + s.interval_s, HORIZON_S)
        c = j.segment(t, end, weight, base)
        base = (c.nc[-1], c.ec[-1], c.ns[-1], c.es[-1])
        r, streak = j.rollback_round(c, s.new_failure_threshold, streak)
        if r is not None:
            run = Run("rolled_back", c.times[r], c.nc[r], c.ec[r], c.ec[r], c.nc[r])
            break
        if paused or end >= HORIZON_S:
            run = Run("paused" if paused else "running", HORIZON_S, 0, 0, base[1], base[0])
            break
        at_end = j._assess(*base)
        t = end
        if at_end.outcome is Outcome.OK:
            inconclusive = 0
            step += 1
            if s.steps[step] >= 100:
                run = Run("promoted", t)
                _after_promotion(run, cell, rng, base)
                break
        elif at_end.outcome is Outcome.INSUFFICIENT:
            inconclusive += 1
            if inconclusive >= s.max_inconclusive:
                paused = True
                pause_at = t
        # HARM below the failure threshold at a step's end: hold one more interval.
    if run.outcome == "paused":
        run.t_end = pause_at
    run.rounds, run.calls = j.rounds, j.calls
    return run


def _after_promotion(run: Run, cell: Cell, rng: np.random.Generator, base: tuple[int, int, int, int]) -> None:
    rest = max(HORIZON_S - run.t_end, 0.0)
    more = int(rng.poisson(cell.rate * rest))
    run.requests_by_horizon = base[0] + more
    run.errors_by_horizon = base[1] + int(rng.binomial(more, cell.pc))


def run_baseline(cell: Cell, rng: np.random.Generator) -> Run:
    s = cell.setting
    spec = bj.AnalysisSpec(
        success_rate_min=s.success_rate_min,
        min_requests=s.min_requests,
        confidence=s.confidence,
        tolerance_pct=s.tolerance_pct,
    )
    t, step, failures, inconclusive, calls = 0.0, 0, 0, 0, 0
    served_n, served_e = 0, 0
    while True:
        weight = s.steps[step]
        if t + s.interval_s > HORIZON_S:
            return Run("running", HORIZON_S, 0, 0, served_e, served_n, calls, calls)
        t += s.interval_s
        nc, ec, ns, es = (int(x[0]) for x in _draw(rng, cell.rate, weight, cell.p0, cell.pc, np.array([s.interval_s])))
        served_n, served_e = served_n + nc, served_e + ec
        obs = bj.Observation("sim", bj.BackendStats(nc, ec), bj.BackendStats(ns, es))
        verdict = bj.judge(obs, spec).verdict
        calls += 1
        if verdict is bj.Verdict.PASS:
            failures = inconclusive = 0
            step += 1
            if s.steps[step] >= 100:
                run = Run("promoted", t, rounds=calls, calls=calls)
                _after_promotion(run, cell, rng, (served_n, served_e, 0, 0))
                return run
        elif verdict is bj.Verdict.FAIL:
            failures, inconclusive = failures + 1, 0
            if failures >= s.baseline_failure_threshold:
                return Run("rolled_back", t, served_n, served_e, served_e, served_n, calls, calls)
        else:
            inconclusive += 1
            if inconclusive >= s.max_inconclusive:  # paused, never analysed again
                more = int(rng.poisson(cell.rate * weight / 100.0 * (HORIZON_S - t)))
                e_more = int(rng.binomial(more, cell.pc))
                return Run("paused", t, 0, 0, served_e + e_more, served_n + more, calls, calls)


# ---------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def quantile(values: Sequence[float], q: float, z: float = 1.96) -> dict[str, float] | None:
    """Sample quantile with a distribution-free 95 % interval from order statistics."""
    n = len(values)
    if n == 0:
        return None
    v = sorted(values)
    sd = math.sqrt(n * q * (1 - q))
    lo = min(max(math.floor(n * q - z * sd) - 1, 0), n - 1)
    hi = min(max(math.ceil(n * q + z * sd) - 1, 0), n - 1)
    return {"value": float(v[min(max(math.ceil(n * q) - 1, 0), n - 1)]), "lo": float(v[lo]), "hi": float(v[hi])}


def fraction(k: int, n: int) -> dict[str, float]:
    lo, hi = wilson(k, n)
    return {"value": k / n if n else 0.0, "lo": lo, "hi": hi, "k": k, "n": n}


def oracle_power(cell: Cell, n: float) -> float | None:
    """Power of a fixed-sample one-sided exact binomial test at ORACLE_ALPHA that knows the stable's
    rate, on ``n`` canary requests: what a judge could hope for with that much data, looked at once."""
    b = cell.harm_boundary()
    if b is None:
        return None
    return _oracle(int(n), b, cell.pc)


@functools.cache
def _oracle(n: int, null: float, alt: float) -> float:
    if n <= 0:
        return 0.0
    if n * max(null, alt) > 500:  # normal approximation, with a continuity correction
        crit = n * null + NormalDist().inv_cdf(1 - ORACLE_ALPHA) * math.sqrt(n * null * (1 - null)) + 0.5
        return NormalDist().cdf((n * alt - crit) / math.sqrt(n * alt * (1 - alt)))
    k, tail = 0, 1.0  # tail = P_null(X >= k)
    pmf = math.exp(n * math.log1p(-null)) if null < 1 else 0.0
    while tail > ORACLE_ALPHA and k <= n:
        tail -= pmf
        pmf *= (n - k) / (k + 1) * null / (1 - null)
        k += 1
    # k = the smallest count with P_null(X >= k) <= alpha; power = P_alt(X >= k)
    cdf, pmf = 0.0, math.exp(n * math.log1p(-alt))
    for i in range(k):
        cdf += pmf
        pmf *= (n - i) / (i + 1) * alt / (1 - alt)
    return max(0.0, 1.0 - cdf)


def summarize(cell: Cell, judge: str, runs: list[Run]) -> dict[str, Any]:
    n = len(runs)
    by = {o: [r for r in runs if r.outcome == o] for o in ("rolled_back", "promoted", "paused", "running")}
    rb = by["rolled_back"]
    paused = by["paused"]
    powers = [oracle_power(cell, r.requests_by_horizon) for r in paused]
    measurable = sum(1 for p in powers if p is not None and p >= 0.5)
    return {
        "setting": cell.setting.name,
        "rate": cell.rate,
        "p0": cell.p0,
        "delta_pp": cell.delta_pp,
        "pc": cell.pc,
        "harmful": cell.harm_boundary() is not None,
        "judge": judge,
        "rollouts": n,
        "rolled_back": fraction(len(rb), n),
        "promoted": fraction(len(by["promoted"]), n),
        "paused_at_horizon": fraction(len(paused), n),
        "running_at_horizon": fraction(len(by["running"]), n),
        "paused_while_measurably_worse": fraction(measurable, n),
        "oracle_power_when_paused_median": _median_or_none([p for p in powers if p is not None]),
        "exposure_errors_median": quantile([r.exposure_errors for r in rb], 0.5),
        "exposure_errors_p90": quantile([r.exposure_errors for r in rb], 0.9),
        "exposure_requests_median": quantile([r.exposure_requests for r in rb], 0.5),
        "exposure_requests_p90": quantile([r.exposure_requests for r in rb], 0.9),
        "time_to_rollback_s_median": quantile([r.t_end for r in rb], 0.5),
        "time_to_promotion_s_median": quantile([r.t_end for r in by["promoted"]], 0.5),
        "time_to_pause_s_median": quantile([r.t_end for r in paused], 0.5),
        "errors_by_horizon_median": quantile([r.errors_by_horizon for r in runs], 0.5),
        "errors_by_horizon_p90": quantile([r.errors_by_horizon for r in runs], 0.9),
        "calls_per_rollout": sum(r.calls for r in runs) / n,
        "rounds_per_rollout": sum(r.rounds for r in runs) / n,
    }


def _median_or_none(values: list[float]) -> float | None:
    q = quantile(values, 0.5)
    return None if q is None else q["value"]


# ---------------------------------------------------------------- running the grid


def cells() -> list[Cell]:
    return [Cell(s, r, p0, d) for s in SETTINGS for r in RATES for p0 in STABLE_ERROR_RATES for d in DELTAS_PP]


def _seed(seed: int, cell: Cell, judge: str) -> np.random.SeedSequence:
    key = (
        SETTINGS.index(cell.setting),
        RATES.index(cell.rate),
        STABLE_ERROR_RATES.index(cell.p0),
        DELTAS_PP.index(cell.delta_pp),
        ("baseline", "new").index(judge),
    )
    return np.random.SeedSequence([seed, *key])


def run_cell(task: tuple[Cell, str, int, int, bool]) -> dict[str, Any]:
    cell, judge, rollouts, seed, exact = task
    rng = np.random.default_rng(_seed(seed, cell, judge))
    t0 = time.process_time()
    if judge == "new":
        runs = [run_new(cell, rng, exact) for _ in range(rollouts)]
    else:
        runs = [run_baseline(cell, rng) for _ in range(rollouts)]
    out = summarize(cell, judge, runs)
    out["cpu_s"] = time.process_time() - t0
    return out


def run_grid(
    rollouts: int, seed: int, workers: int, exact: bool, only: str | None, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    tasks = [(c, j, rollouts, seed, exact) for c in cells() for j in ("new", "baseline")]
    if only:
        tasks = [t for t in tasks if re.search(only, f"{t[0].label} {t[1]}")]
    # Slow tasks first (the new judge at low rates runs to the horizon while paused): better packing.
    tasks.sort(key=lambda t: (t[1] != "new", t[0].rate, t[0].setting.round_s))
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for task in tasks:
            results.append(run_cell(task))
            progress(f"{len(results)}/{len(tasks)} {task[0].label} {task[1]}")
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for res in pool.imap_unordered(run_cell, tasks, chunksize=1):
                results.append(res)
                progress(f"{len(results)}/{len(tasks)} {res['setting']} R={res['rate']:g} {res['judge']}")
    order = {(c.setting.name, c.rate, c.p0, c.delta_pp): i for i, c in enumerate(cells())}
    results.sort(key=lambda r: (order[(r["setting"], r["rate"], r["p0"], r["delta_pp"])], r["judge"]))
    return results


# ---------------------------------------------------------------- report


def _f(x: dict[str, float] | None, pct: bool = True, digits: int = 1) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x['value']:.{digits}f} [{100 * x['lo']:.{digits}f}, {100 * x['hi']:.{digits}f}]"
    return f"{x['value']:,.0f} [{x['lo']:,.0f}, {x['hi']:,.0f}]"


Pairs = dict[tuple[str, float, float, float], dict[str, dict[str, Any]]]
Target = tuple[str, str, bool]


def _pair(results: list[dict[str, Any]]) -> Pairs:
    out: Pairs = {}
    for r in results:
        out.setdefault((r["setting"], r["rate"], r["p0"], r["delta_pp"]), {})[r["judge"]] = r
    return out


def targets(results: list[dict[str, Any]]) -> list[Target]:
    """(target, numbers, met?) per setting set, straight from the results (nothing tuned)."""
    rows: list[Target] = []
    for s in SETTINGS:
        mine = {k: v for k, v in _pair(results).items() if k[0] == s.name and "new" in v}
        if mine:
            for check in (_t_false_rollback, _t_big_at_1rps, _t_paused, _t_exposure, _t_small_at_100rps):
                rows += check(s.name, mine)
    return rows


def _t_false_rollback(name: str, mine: Pairs) -> list[Target]:
    null = [v["new"]["rolled_back"]["value"] for k, v in mine.items() if k[3] == 0]
    edge = [v["new"]["rolled_back"]["value"] for k, v in mine.items() if k[3] > 0 and not v["new"]["harmful"]]
    if not null:
        return []
    text = f"max {100 * max(null):.2f} % (cells within limits with δ > 0: max {100 * max(edge, default=0):.2f} %)"
    return [(f"{name}: false rollback ≤ 1 % in every δ = 0 cell", text, max(null) <= 0.01)]


def _t_big_at_1rps(name: str, mine: Pairs) -> list[Target]:
    big = [(k, v["new"]["rolled_back"]["value"]) for k, v in mine.items() if k[1] == 1 and k[3] == 20]
    if not big:
        return []
    text = ", ".join(f"p0 {k[2]:.1%}: {x:.1%}" for k, x in big)
    return [(f"{name}: +20 pp at 1 rps caught ≥ 95 %", text, min(x for _, x in big) >= 0.95)]


def _t_paused(name: str, mine: Pairs) -> list[Target]:
    worse = [(k, v) for k, v in mine.items() if v["new"]["harmful"] and k[3] > 0]
    if not worse:
        return []
    pm = max(v["new"]["paused_at_horizon"]["value"] for _, v in worse)
    pmm = max(v["new"]["paused_while_measurably_worse"]["value"] for _, v in worse)
    base = max((v["baseline"]["paused_at_horizon"]["value"] for _, v in worse if "baseline" in v), default=0.0)
    text = (
        f"max paused at horizon {100 * pm:.1f} % (baseline {100 * base:.1f} %, never analysed again); "
        f"paused with oracle power ≥ 50 %: max {100 * pmm:.1f} %"
    )
    return [(f"{name}: nothing paused forever while measurably worse", text, pmm <= 0.01)]


def _t_exposure(name: str, mine: Pairs) -> list[Target]:
    ratios: list[tuple[tuple[str, float, float, float], float]] = []
    never = 0
    for k, v in mine.items():
        if k[1] >= 100 and k[3] >= 2 and v["new"]["harmful"] and "baseline" in v:
            a, b = v["new"]["exposure_errors_median"], v["baseline"]["exposure_errors_median"]
            if b is None:
                never += 1  # the baseline never rolled back (paused forever or promoted)
            elif a is not None and b["value"] > 0:
                ratios.append((k, a["value"] / b["value"]))
    if not ratios:
        return []
    worst_k, worst_r = max(ratios, key=lambda x: x[1])
    text = (
        f"max ratio {worst_r:.2f} (R={worst_k[1]:g}, p0 {worst_k[2]:.1%}, +{worst_k[3]:g} pp); "
        f"{sum(1 for _, r in ratios if r <= 0.5)}/{len(ratios)} cells ≤ 0.5"
        + (f"; {never} more cells where the baseline never rolled back" if never else "")
    )
    return [
        (
            f"{name}: exposure (median canary errors before rollback) for ≥ +2 pp at ≥ 100 rps ≤ ½ baseline",
            text,
            worst_r <= 0.5,
        )
    ]


def _t_small_at_100rps(name: str, mine: Pairs) -> list[Target]:
    one = [
        (k, v["new"]["rolled_back"]["value"]) for k, v in mine.items() if k[1] == 100 and k[3] == 1 and k[2] <= 0.001
    ]
    if not one:
        return []
    text = ", ".join(f"p0 {k[2]:.1%}: {x:.1%}" for k, x in one)
    return [(f"{name}: +1 pp at 100 rps, p0 ≤ 0.1 %, caught ≥ 95 %", text, min(x for _, x in one) >= 0.95)]


def markdown(doc: dict[str, Any]) -> str:
    results: list[dict[str, Any]] = doc["cells"]
    meta = doc["meta"]
    lines = [
        "# Judge simulation: per-window baseline vs anytime-valid evidence",
        "",
        f"`{meta['command']}` — seed {meta['seed']}, {meta['rollouts']} rollouts per cell and judge, "
        f"horizon {meta['horizon_s']:g} s, wall {meta['wall_s']:.0f} s on {meta['cpus']} CPUs, "
        f"{meta['workers']} workers.",
        "Fractions in % with 95 % Wilson intervals; medians/p90 with distribution-free 95 % intervals. "
        "Exposure = canary errors served before the rollback (rolled-back rollouts only). "
        "*harmful*: the canary breaks success-rate-min or the stable + tolerance. "
        "*oracle*: power of a fixed-sample one-sided test at α = 1 % that knows the stable's rate, on the "
        "canary requests a paused rollout had by the horizon (≥ 50 % = measurably worse).",
        "",
        "## Targets",
        "",
        "| target | result | met |",
        "| --- | --- | --- |",
    ]
    for name, numbers, ok in targets(results):
        lines.append(f"| {name} | {numbers} | {'yes' if ok else 'no'} |")
    pairs = _pair(results)
    for s in SETTINGS:
        mine = {k: v for k, v in pairs.items() if k[0] == s.name}
        if not mine:
            continue
        lines += [
            "",
            f"## {s.name}: steps {','.join(map(str, s.steps))}, interval {s.interval_s:g} s, "
            f"min-requests {s.min_requests}, success-rate-min {s.success_rate_min:g}, confidence {s.confidence:g}, "
            f"tolerance {s.tolerance_pct:g} pp, max-inconclusive {s.max_inconclusive}, "
            f"failure-threshold {s.baseline_failure_threshold} (baseline) / {s.new_failure_threshold} (new), "
            f"new rounds every {s.round_s:g} s",
            "",
            "### Healthy canary (δ = 0)",
            "",
            "| rps | p0 | false rollback: baseline | new | false pause: baseline | new | promoted: baseline | new | "
            "time to promote (new) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for k, v in mine.items():
            if k[3] != 0:
                continue
            b, n = v.get("baseline"), v.get("new")
            lines.append(
                f"| {k[1]:g} | {k[2]:.1%} | {_g(b, 'rolled_back')} | {_g(n, 'rolled_back')} | "
                f"{_g(b, 'paused_at_horizon')} | {_g(n, 'paused_at_horizon')} | {_g(b, 'promoted')} | "
                f"{_g(n, 'promoted')} | {_g(n, 'time_to_promotion_s_median', pct=False)} s |"
            )
        lines += [
            "",
            "### Worse canary (δ > 0): power = rolled back before promotion; paused = paused at the horizon",
            "",
            "| rps | p0 | δ pp | harmful | power: baseline | new | paused: baseline | new | "
            "new paused, oracle ≥ 50 % | exposure med (p90): baseline | new | time to rollback med: baseline | new |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for k, v in mine.items():
            if k[3] == 0:
                continue
            b, n = v.get("baseline"), v.get("new")
            harmful = (n or b or {}).get("harmful")
            lines.append(
                f"| {k[1]:g} | {k[2]:.1%} | {k[3]:g} | {'yes' if harmful else 'no'} | {_g(b, 'rolled_back')} | "
                f"{_g(n, 'rolled_back')} | {_g(b, 'paused_at_horizon')} | {_g(n, 'paused_at_horizon')} | "
                f"{_g(n, 'paused_while_measurably_worse')} | {_exp(b)} | {_exp(n)} | "
                f"{_g(b, 'time_to_rollback_s_median', pct=False)} | {_g(n, 'time_to_rollback_s_median', pct=False)} |"
            )
    return "\n".join(lines) + "\n"


def _g(r: dict[str, Any] | None, key: str, pct: bool = True) -> str:
    if r is None:
        return "–"
    return _f(r.get(key), pct=pct)


def _exp(r: dict[str, Any] | None) -> str:
    if r is None or r.get("exposure_errors_median") is None:
        return "–"
    med, p90 = r["exposure_errors_median"]["value"], r["exposure_errors_p90"]["value"]
    req = r["exposure_requests_median"]["value"]
    return f"{med:,.0f} ({p90:,.0f}); {req:,.0f} req"


# ---------------------------------------------------------------- figure


def demo_figure(path: Path, seed: int) -> dict[str, Any]:
    """Evidence of harm over time for the demo's bad release (10 % errors vs 0.1 %, 50 rps), one seeded run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = SETTINGS[1]
    span = 60.0
    series: dict[str, tuple[list[float], list[float], float | None]] = {}
    threshold = 1.0
    for name, pc in (("bad release: canary 10 % errors", 0.10), ("healthy release: canary 0.1 %", 0.001)):
        cell = Cell(s, 50.0, 0.001, (pc - 0.001) * 100)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 99, int(pc * 1000)]))
        times = _round_times(0.0, span, s.round_s)
        durations = np.diff(np.array([0.0, *times]))
        cum = [np.cumsum(a).tolist() for a in _draw(rng, cell.rate, s.steps[0], cell.p0, cell.pc, durations)]
        ev: list[float] = []
        rolled: float | None = None
        for i, t in enumerate(times):
            a = assess(
                Tally(cum[0][i], cum[1][i]),
                Tally(cum[2][i], cum[3][i]),
                success_rate_min=s.success_rate_min,
                tolerance_pct=s.tolerance_pct,
                confidence=s.confidence,
                min_requests=s.min_requests,
            )
            ev.append(a.evidence)
            threshold = a.threshold
            if rolled is None and a.outcome is Outcome.HARM:
                rolled = t
        series[name] = (times, ev, rolled)
    base_cell = Cell(s, 50.0, 0.001, 9.9)
    base = run_baseline(base_cell, np.random.default_rng(np.random.SeedSequence([seed, 98])))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for (name, (times, ev, rolled)), colour in zip(series.items(), ("tab:red", "tab:grey"), strict=True):
        if rolled is None:
            ax.plot(times, ev, marker=".", color=colour, label=name)
            continue
        k = times.index(rolled) + 1
        ax.plot(times[:k], ev[:k], marker="o", color=colour, label=f"{name} (rolled back at {rolled:g} s)")
        ax.plot(times[k - 1 :], ev[k - 1 :], ls=":", color=colour, alpha=0.6, label="  (had it kept serving at 10 %)")
        ax.axvline(rolled, color=colour, ls="--", lw=0.8)
    ax.axhline(threshold, color="black", lw=1.2, label=f"threshold 1/α_canary = {threshold:.0f} (HARM at or above)")
    ax.set_yscale("log")
    ax.set_ylim(0.1, 1e14)
    ax.set_xlabel("seconds since the rollout started (canary at 10 %)")
    ax.set_ylabel("evidence of harm (e-value)")
    ax.set_title(
        f"canaryd.core.evidence on the demo's bad release: 50 rps, steps {','.join(map(str, s.steps))}, "
        f"interval {s.interval_s:g} s",
        fontsize=9,
    )
    ax.text(
        0.99,
        0.95,
        f"baseline (per-window judge, same settings): {base.outcome.replace('_', ' ')} at {base.t_end:g} s",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="major", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {
        "png": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "rolled_back_at_s": series["bad release: canary 10 % errors"][2],
        "baseline": f"{base.outcome} at {base.t_end:g} s",
    }


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.judge_sim", description=__doc__.split("\n")[0])
    p.add_argument("--rollouts", type=int, default=2000, help="rollouts per cell and judge (default 2000)")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results; judge.md is written beside it")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 rollouts per cell")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--png", type=Path, default=DEFAULT_PNG, help="figure path ('' = no figure)")
    p.add_argument("--exact", action="store_true", help="judge every round (no block skipping; slow)")
    p.add_argument("--only", help="regex on 'setting R=.. p0=..% d=..pp judge' to run a subset")
    p.add_argument("--report-only", action="store_true", help="rewrite judge.md and the figure from the JSON at --out")
    args = p.parse_args(argv)
    md_path = args.out.with_suffix(".md")
    if args.report_only:
        if str(args.png):
            demo_figure(args.png, args.seed)
        md_path.write_text(markdown(json.loads(args.out.read_text())))
        return 0
    rollouts = 200 if args.quick else args.rollouts
    t0 = time.monotonic()
    results = run_grid(rollouts, args.seed, args.workers, args.exact, args.only, lambda m: print(m, file=sys.stderr))
    wall = time.monotonic() - t0
    doc: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python -m devkit.bench.judge_sim", *(sys.argv[1:] if argv is None else argv)]),
            "seed": args.seed,
            "rollouts": rollouts,
            "horizon_s": HORIZON_S,
            "wall_s": wall,
            "cpu_s": sum(r["cpu_s"] for r in results),
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "exact": args.exact,
            "settings": [asdict(s) for s in SETTINGS],
        },
        "cells": results,
    }
    if str(args.png):
        doc["meta"]["figure"] = demo_figure(args.png, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    for name, numbers, ok in targets(results):
        print(f"{'MET ' if ok else 'MISS'} {name}: {numbers}", file=sys.stderr)
    print(f"wrote {args.out} and {md_path} in {wall:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
