"""The daemon's analysis series (pure: a fresh in-memory registry): what a round shows, and that nothing is
left behind when a signal, a rollout or a route goes."""

from __future__ import annotations

import pytest

from canaryd.core.state import AnalysisRecord
from canaryd.observability import Metrics

ENVOY = AnalysisRecord(
    step=0,
    at="2026-01-01T00:00:10.000Z",
    verdict="pass",
    signal="envoy",
    reason="ok",
    canary_requests=200.0,
    canary_success=99.5,
    canary_latency_ms=40.0,
    stable_requests=800.0,
    stable_success=99.9,
    stable_latency_ms=20.0,
    evidence=0.3,
    threshold=125.0,
)
DAPR = AnalysisRecord(  # a signal that cannot tell versions apart: no stable numbers
    step=0, at=ENVOY.at, verdict="inconclusive", signal="dapr", reason="few", canary_requests=10.0, canary_success=100.0
)


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"namespace": "shop", "route": "r", **labels})


def names(m: Metrics) -> set[str]:
    return {s.name for fam in m.registry.collect() for s in fam.samples if s.labels.get("route") == "r"}


def test_a_round_shows_canary_and_stable_side_by_side() -> None:
    m = Metrics.create()
    m.set_analysis("shop", "r", [ENVOY, DAPR], window_s=40.0)
    assert value(m, "canaryd_analysis_success_ratio", signal="envoy", role="canary") == pytest.approx(0.995)
    assert value(m, "canaryd_analysis_success_ratio", signal="envoy", role="stable") == pytest.approx(0.999)
    assert value(m, "canaryd_analysis_request_rate", signal="envoy", role="canary") == 5.0
    assert value(m, "canaryd_analysis_request_rate", signal="envoy", role="stable") == 20.0
    assert value(m, "canaryd_analysis_requests", signal="envoy", role="stable") == 800.0
    assert value(m, "canaryd_analysis_latency_seconds", signal="envoy", role="canary") == 0.04
    assert value(m, "canaryd_analysis_evidence", signal="envoy") == 0.3
    assert value(m, "canaryd_analysis_evidence_threshold", signal="envoy") == 125.0
    # No number, no series (not a NaN): dapr has no stable, and no evidence yet.
    assert value(m, "canaryd_analysis_success_ratio", signal="dapr", role="stable") is None
    assert value(m, "canaryd_analysis_evidence", signal="dapr") is None
    assert value(m, "canaryd_analysis_requests", signal="dapr", role="canary") == 10.0


def test_a_signal_dropped_from_the_analysis_loses_its_series() -> None:
    m = Metrics.create()
    m.set_analysis("shop", "r", [ENVOY, DAPR], window_s=40.0)
    m.set_analysis("shop", "r", [ENVOY], window_s=50.0)
    assert value(m, "canaryd_analysis_requests", signal="dapr", role="canary") is None
    assert value(m, "canaryd_analysis_request_rate", signal="envoy", role="canary") == 4.0


def test_a_finished_rollout_or_a_deleted_route_leaves_nothing() -> None:
    m = Metrics.create()
    m.set_analysis("shop", "r", [ENVOY, DAPR], window_s=40.0)
    m.set_analysis("shop", "other", [ENVOY], window_s=40.0)
    m.forget_analysis("shop", "r")  # the rollout ended
    assert not {n for n in names(m) if n.startswith("canaryd_analysis_")}
    assert m.registry.get_sample_value(
        "canaryd_analysis_evidence", {"namespace": "shop", "route": "other", "signal": "envoy"}
    )
    m.set_analysis("shop", "r", [ENVOY], window_s=40.0)
    m.overwrites.labels("shop", "r").inc()
    m.set_phase("shop", "r", "Progressing")
    m.forget("shop", "r")  # the route was deleted
    assert names(m) == set()
