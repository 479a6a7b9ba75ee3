"""An ``AnalysisSpec`` for tests that exercise the judge or the providers without annotations."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from canaryd.core.spec import AnalysisSpec

BASE = AnalysisSpec(
    signals=("envoy",),
    window_s=60.0,
    interval_s=10.0,
    success_rate_min=99.0,
    latency_max_ms=None,
    latency_quantile=0.99,
    min_requests=50,
    max_inconclusive=5,
    on_inconclusive="pause",
    confidence=0.99,
    tolerance_pct=0.5,
    failure_threshold=1,
    max_errors=3,
    app_id=None,
    stable_app_id=None,
    caller_app_id=None,
)


def analysis_spec(**overrides: Any) -> AnalysisSpec:
    return replace(BASE, **overrides)
